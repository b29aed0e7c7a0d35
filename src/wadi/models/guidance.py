"""Guidance: how a prediction is steered towards the prompt, in the modes the backbone
kinds declare (wadi.models.backbones.Kind.guidance)."""

from __future__ import annotations

import torch


def guide(e_uncond: torch.Tensor, e_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: e_uncond + s (e_cond - e_uncond)."""
    return e_uncond + scale * (e_cond - e_uncond)
