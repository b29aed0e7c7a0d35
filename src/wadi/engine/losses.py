"""The parts of the WaDi losses (docs/method.md) that no noise process shapes: guidance
and the student's surrogate loss. What depends on the process (noising, the score
difference, the fake model's loss, the generator) is wadi.models.process."""

from __future__ import annotations

import torch


def vsd_loss(x0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Student loss: L = 0.5 mean((x0 - sg(x0 - nan_to_num(g)))^2).

    Its value is 0.5 mean(g^2) and its gradient with respect to x0 is g / numel; isolated
    non-finite elements of g count as 0 (the authors' nan_to_num).
    """
    target = (x0.float() - torch.nan_to_num(g)).detach()
    return 0.5 * ((x0.float() - target) ** 2).mean()
