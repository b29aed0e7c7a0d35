"""The WaDi losses (docs/method.md) as pure functions of tensors.

Notation: abar_t the cumulative alpha, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t);
alpha and sigma arrive shaped to broadcast against images, (B, 1, 1, 1).
"""

from __future__ import annotations

import torch


def one_step_x0(z: torch.Tensor, eps: torch.Tensor, alpha_T: torch.Tensor, sigma_T: torch.Tensor) -> torch.Tensor:
    """The generator's image: x0 = (z - sigma_T eps) / alpha_T, eps predicted at t = T-1."""
    return (z - sigma_T * eps) / alpha_T


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t eps."""
    return alpha * x0 + sigma * eps


def guide(e_uncond: torch.Tensor, e_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: e_uncond + s (e_cond - e_uncond)."""
    return e_uncond + scale * (e_cond - e_uncond)


def score_difference(e_real: torch.Tensor, e_fake: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """g = sigma_t^2 (e_real - e_fake) in float32: the VSD gradient of x0, up to the mean's 1/N."""
    return sigma.float() ** 2 * (e_real.float() - e_fake.float())


def vsd_loss(x0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Student loss: L = 0.5 mean((x0 - sg(x0 - nan_to_num(g)))^2).

    Its value is 0.5 mean(g^2) and its gradient with respect to x0 is g / numel; isolated
    non-finite elements of g count as 0 (the authors' nan_to_num).
    """
    target = (x0.float() - torch.nan_to_num(g)).detach()
    return 0.5 * ((x0.float() - target) ** 2).mean()


def fake_loss(eps_pred: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Fake score model loss: mean((alpha_t eps_phi(x_t) - alpha_t eps)^2)."""
    return ((alpha.float() * eps_pred.float() - alpha.float() * eps.float()) ** 2).mean()
