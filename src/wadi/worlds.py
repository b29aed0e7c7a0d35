"""Embedded worlds: small, real text-to-image settings that plug into the core.

A world registers an object under the entry-point group `wadi.worlds` (see
pyproject.toml) with
- `presets`: {name: function returning that preset's settings} for `wadi distill`;
- `evaluation(num, cache_dir) -> WorldEval`: what `wadi eval --world NAME` uses;
- `commands`: modules whose `register(subparsers)` adds the world's own tools to `wadi`;
- `requires`: {module: pip package} it needs beyond the core, and `extra`, the
  pyproject extra that installs them.
The core never imports a world by name: worlds are found when they are asked for, so a
world's own dependencies (a text encoder package, say) are needed only by its users, and
every way into a world (its presets, its evaluation, its tools) checks them first.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from .backbones import BackboneSpec
from .errors import install_hint
from .prompts import PromptSet


@dataclass
class WorldEval:
    """How a world is evaluated: its prompts, reference images, metrics and teacher."""

    prompts: PromptSet
    reference: Path  # a folder of real images
    alignment: str  # module:function of (images, prompts) -> fraction
    features: str  # module:function of images -> (N, d) features for FID and precision/recall
    metrics: str  # the default --metrics
    teacher: BackboneSpec

    def metric_settings(self, cache_dir: Path, metrics: str | None = None, reference: Path | None = None,
                        features: str | None = None, alignment: str | None = None, **options):
        """The world's metrics (evaluate.MetricSettings), each setting given here replacing the world's
        own; `options` are further MetricSettings fields."""
        from .evaluate import metric_settings

        return metric_settings(metrics or self.metrics, reference or self.reference, cache_dir,
                               features or self.features, alignment=alignment or self.alignment, **options)


@functools.lru_cache(maxsize=None)
def worlds() -> dict[str, object]:
    """Every installed world by name."""
    return {ep.name: ep.load() for ep in entry_points(group="wadi.worlds")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ValueError, AttributeError):  # in sys.modules without a spec: blocked, or half-imported
        return False


def check_installed(name: str) -> None:
    """Raise one line naming what to install when the world's extra is missing."""
    world = worlds()[name]
    missing = [package for module, package in world.requires.items() if not _installed(module)]
    if missing:
        raise ValueError(f"the {name} world needs {', '.join(missing)}, not installed here: "
                         f"{install_hint(world.extra)}")


def get_world(name: str):
    """An installed world whose extra is installed too."""
    found = worlds()
    if name not in found:
        raise ValueError(f"unknown world {name!r}; installed: {', '.join(found) or 'none'}")
    check_installed(name)
    return found[name]


def world_presets() -> dict[str, Callable[[], dict]]:
    """Every world's presets; each checks its world's extra before it is made."""
    def checked(name, make):
        def make_checked() -> dict:
            check_installed(name)
            return make()
        return make_checked

    return {preset: checked(name, make) for name, world in worlds().items() for preset, make in world.presets.items()}
