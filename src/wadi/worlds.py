"""Embedded worlds: small, real text-to-image settings that plug into the core.

A world registers an object under the entry-point group `wadi.worlds` (see
pyproject.toml) with
- `presets`: {name: function returning that preset's settings} for `wadi distill`;
- `evaluation(num, cache_dir) -> WorldEval`: what `wadi eval --world NAME` uses.
The core never imports a world by name: worlds are found when they are asked for, so a
world's own dependencies (a text encoder package, say) are needed only by its users.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from .backbones import BackboneSpec
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


@functools.lru_cache(maxsize=None)
def worlds() -> dict[str, object]:
    """Every installed world by name."""
    return {ep.name: ep.load() for ep in entry_points(group="wadi.worlds")}


def get_world(name: str):
    found = worlds()
    if name not in found:
        raise ValueError(f"unknown world {name!r}; installed: {', '.join(found) or 'none'}")
    return found[name]


def world_presets() -> dict[str, Callable[[], dict]]:
    return {name: make for world in worlds().values() for name, make in world.presets.items()}
