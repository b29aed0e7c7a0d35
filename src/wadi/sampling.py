"""Sampling: the one-step student (one network evaluation at t = T-1) and image grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .backbones import Backbone
from .losses import one_step_x0


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU so a seed gives the same image anywhere."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


@torch.no_grad()
def one_step(backbone: Backbone, net: torch.nn.Module, prompts: list[str], seeds: list[int],
             batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1] from the one-step student: x0 = (z - sigma_T eps(z, T-1)) / alpha_T."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    device = next(net.parameters()).device
    # Inputs in the frozen weights' dtype (fp32 trainable adapters cast their own W').
    dtype = next((p for p in net.parameters() if not p.requires_grad), next(net.parameters())).dtype
    images = []
    for i in range(0, len(prompts), batch_size):
        cond = backbone.encode_prompts(prompts[i:i + batch_size]).to(device, dtype)
        z = seeded_noise(backbone.latent_shape, seeds[i:i + batch_size], device).to(dtype)
        t = torch.full((len(z),), backbone.num_train_timesteps - 1, device=device, dtype=torch.long)
        alpha, sigma = backbone.alpha_sigma(t)
        eps = backbone.predict_eps(net, z, t, cond)
        images.append(backbone.decode(one_step_x0(z.float(), eps.float(), alpha, sigma)).float().cpu())
    return torch.cat(images)


@torch.no_grad()
def multi_step(backbone: Backbone, net: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int = 25,
               guidance: float = 3.0, scheduler: str = "ddim", batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1] from the multi-step teacher with classifier-free guidance.

    `scheduler` is a diffusers scheduler built from the backbone's noise schedule:
    "ddim" (deterministic), "dpm" (DPM-Solver++ multistep) or "euler".
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if scheduler not in classes:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(classes)}")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    # predict_eps always returns eps (v-prediction nets are converted), so the scheduler takes eps.
    sched = classes[scheduler].from_config(backbone.scheduler_config, prediction_type="epsilon")
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    images = []
    for i in range(0, len(prompts), batch_size):
        cond = backbone.encode_prompts(prompts[i:i + batch_size]).to(device, dtype)
        uncond = backbone.empty_cond().to(device, dtype).expand(len(cond))
        x = seeded_noise(backbone.latent_shape, seeds[i:i + batch_size], device) * sched.init_noise_sigma
        sched.set_timesteps(steps, device=device)
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), t).to(dtype)
            tt = torch.full((len(x_in),), int(t), device=device, dtype=torch.long)
            e_u, e_c = backbone.predict_eps(net, x_in, tt, uncond.cat(cond)).float().chunk(2)
            eps = e_u + guidance * (e_c - e_u)
            x = sched.step(eps, t, x).prev_sample
        images.append(backbone.decode(x).float().cpu())
    return torch.cat(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] to (B, H, W, C) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: torch.Tensor, nrow: int | None = None, scale: int = 1) -> Image.Image:
    """A PIL grid of (B, C, H, W) images in [-1, 1], `nrow` images a row."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, k = divmod(i, nrow)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = img
    out = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, nrow, scale).save(path)
    return path
