"""Which nn.Linear layers an adapter takes (the authors' rules; docs/method.md).

A rule is a pair of substring lists: a layer is taken when its qualified name contains
one of `include` (or `include` is empty) and none of `exclude`. Presets name the
authors' choices; users may give their own substrings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from wadi.errors import brief

_UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
_FAKE_EXCLUDE = ("proj_in", "proj_out", "time_emb_proj")


@dataclass(frozen=True)
class TargetRule:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        taken = not self.include or any(k in name for k in self.include)
        return taken and not any(k in name for k in self.exclude)

    def to_dict(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude)}


PRESETS: dict[str, TargetRule] = {
    # Student UNet (SD 1.5 / 2.1): every Linear in the down, mid and up blocks.
    "unet-student": TargetRule(include=_UNET_BLOCKS),
    # Fake score UNet: the same set without the transformer projections and time embeddings.
    "unet-fake": TargetRule(include=_UNET_BLOCKS, exclude=_FAKE_EXCLUDE),
    # Student DiT (PixArt-alpha): every Linear but the adaLN-single timestep path, which
    # reproduces the paper's 81.22M (the authors' script also hooks it: 82.56M).
    "dit-student": TargetRule(exclude=("adaln_single",)),
    "dit-fake": TargetRule(include=("transformer_blocks",), exclude=_FAKE_EXCLUDE),
    # Student MMDiT (SD3-class): every Linear of both streams (attention, feed-forward, the
    # per-block adaLN modulations), the context embedder and the output, but the timestep /
    # pooled-text embedder: the counterpart of PixArt's rule (docs/method.md).
    "mmdit-student": TargetRule(exclude=("time_text_embed",)),
    # Fake MMDiT: the blocks' attention and feed-forward, without the modulations (the
    # counterpart of the UNet fake's time_emb_proj).
    "mmdit-fake": TargetRule(include=("transformer_blocks",), exclude=("norm1",)),
    # Fake FLUX: the same for its double-stream blocks, and its single-stream blocks'
    # attention and MLP projections without their modulation (`norm.linear`). (Its student
    # takes mmdit-student: the time, guidance and pooled-text embedders stay the teacher's.)
    "flux-fake": TargetRule(include=("transformer_blocks",), exclude=("norm1", "norm.linear")),
    # Fake Qwen-Image MMDiT: the same, its modulations named img_mod / txt_mod (its student
    # is mmdit-student: every Linear but the timestep embedder).
    "qwen-fake": TargetRule(include=("transformer_blocks",), exclude=("img_mod", "txt_mod")),
    # Student Sana: every Linear of the blocks' linear self-attention and cross-attention,
    # the caption projection and the output, but the adaLN-single timestep path (as
    # PixArt's); its feed-forward is convolutional (GLUMBConv), which LoRaD's linear
    # rotation does not take.
    "sana-student": TargetRule(exclude=("time_embed",)),
    "sana-fake": TargetRule(include=("transformer_blocks",), exclude=_FAKE_EXCLUDE),
    # Student Z-Image: every Linear of the refiners and the main layers (attention,
    # feed-forward, their adaLN modulations), the patch and caption embedders and the final
    # layer, but the timestep embedder: the MMDiT student's rule on a single stream.
    "zimage-student": TargetRule(exclude=("t_embedder",)),
    # Fake Z-Image: attention and feed-forward of the refiners and main layers, without the
    # modulations (the MMDiT fake's rule).
    "zimage-fake": TargetRule(include=("attention", "feed_forward")),
    # Student FLUX.2: every Linear of both kinds of blocks, the shared modulations, the
    # embedders and the output, but the timestep embedder (the MMDiT student's rule).
    "flux2-student": TargetRule(exclude=("time_guidance_embed",)),
    # Fake FLUX.2: the blocks' attention and feed-forward; FLUX.2's modulations are shared
    # outside the blocks, so nothing inside needs excluding.
    "flux2-fake": TargetRule(include=("transformer_blocks",)),
}


def resolve_rule(targets: str | TargetRule | dict) -> TargetRule:
    """A TargetRule from a preset name, a rule, or {'include': [...], 'exclude': [...]}."""
    if isinstance(targets, TargetRule):
        return targets
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(f"unknown target preset {brief(targets)}; use one of {', '.join(PRESETS)} "
                             "or give include/exclude substrings")
        return PRESETS[targets]
    if isinstance(targets, dict):
        unknown = set(targets) - {"include", "exclude"}
        if unknown:
            raise ValueError(f"target rule has unknown keys {sorted(unknown)}; use 'include' and 'exclude'")
        return TargetRule(_substrings(targets, "include"), _substrings(targets, "exclude"))
    raise TypeError(f"targets must be a preset name, a TargetRule or a dict, got {type(targets).__name__}")


def _substrings(rule: dict, key: str) -> tuple[str, ...]:
    value = rule.get(key, ())
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) and x for x in value):
        raise ValueError(f"target rule {key} must be a list of layer-name substrings, got {brief(value)}")
    return tuple(value)


def select_linears(model: nn.Module, rule: TargetRule) -> list[str]:
    """Qualified names of the nn.Linear modules of `model` that `rule` takes, in model order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rule.matches(n)]
    if not names:
        raise ValueError(f"target rule {rule.to_dict()} selects no nn.Linear layer of "
                         f"{type(model).__name__}; check the preset or the patterns")
    return names
