"""Guidance: how a prediction is steered towards the prompt. Each backbone kind declares its
mode (wadi.models.registry.Kind.guidance) and the function that applies it (`Kind.guide`):

- "cfg": classifier-free guidance from one batched [uncond; cond] pass, e_u + s (e_c - e_u);
  at s = 1 the conditional pass alone;
- "embedded": the network takes the guidance scale as an input (FLUX.1-dev, distilled to
  imitate CFG): one pass with that input set to s, no negative prompt; at s = 1 the input
  the conditioning carries (the model's own, which teacher, fake model and student share);
- "none": the model has no guidance (a guidance-distilled student); only s = 1.

Guidance is affine, so guiding eps or the velocity is the same."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone
    from wadi.models.conditioning import Cond

MODES = ("cfg", "embedded", "none")


def guide(e_uncond: torch.Tensor, e_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: e_uncond + s (e_cond - e_uncond)."""
    return e_uncond + scale * (e_cond - e_uncond)


def guided_cfg(backbone: "Backbone", net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: "Cond",
               scale: float) -> torch.Tensor:
    """`backbone.predict` in float32 with classifier-free guidance from one batched pass."""
    if scale == 1:
        return backbone.predict(net, x, t, cond).float()
    uncond = backbone.empty_cond().to(x.device, x.dtype).expand(len(x))
    e_u, e_c = backbone.predict(net, torch.cat([x, x]), t.repeat(2), uncond.cat(cond)).float().chunk(2)
    return guide(e_u, e_c, scale)


def guided_embedded(backbone: "Backbone", net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: "Cond",
                    scale: float) -> torch.Tensor:
    """One pass with the network's guidance input (Cond.extra["guidance"]) set to `scale`; at
    1 the conditional prediction as encoded, with the model's own guidance input (what its
    student was distilled at and samples with)."""
    if scale == 1:
        return backbone.predict(net, x, t, cond).float()
    extra = {**cond.extra, "guidance": cond.extra["guidance"].new_full((len(x),), float(scale))}
    return backbone.predict(net, x, t, type(cond)(cond.embeds, cond.mask, extra)).float()


def guided_none(backbone: "Backbone", net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: "Cond",
                scale: float) -> torch.Tensor:
    if scale != 1:
        raise ValueError(f"the {backbone.kind.name} model has no guidance (guidance {scale:g} asked); use guidance 1")
    return backbone.predict(net, x, t, cond).float()
