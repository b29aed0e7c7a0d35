"""Latent layouts: the shape a kind's stock pipeline draws each image's noise in, and how
latents become pixels. The engine keeps latents in that drawn shape; a kind whose denoiser
takes them packed packs them in its call (see wadi.models.registry.Kind)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone


def image_noise_shape(backbone: "Backbone") -> tuple[int, ...]:
    """(channels, size, size): a UNet's or a patchifying DiT's latents, as drawn."""
    return (backbone.channels, backbone.latent_size, backbone.latent_size)


def vae_scale(vae) -> int:
    """Pixels per latent: each VAE width level after the first halves the image
    (AutoencoderKL names its widths block_out_channels, AutoencoderDC encoder_block_out_channels)."""
    widths = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
    return 2 ** (len(widths) - 1)


def patch_multiple(backbone: "Backbone") -> int:
    """What a resolution must be a multiple of: the VAE's factor times the denoiser's patch size."""
    return backbone.vae_scale * int(getattr(backbone.net.config, "patch_size", None) or 1)


def decode_scaled(backbone: "Backbone", x0: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from an AutoencoderKL-style VAE whose latents were scaled (and, for
    SD3 and FLUX, shifted) in training; a pixel-space kind's x0 is the image."""
    vae = backbone.vae
    if vae is None:
        return x0.clamp(-1, 1)
    latents = x0.to(backbone.vae_dtype()) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents + shift
    return vae.decode(latents).sample.float().clamp(-1, 1)


def pipeline_patch_multiple(backbone: "Backbone") -> int:
    """What a resolution must be a multiple of where the pipeline cuts latents into 2x2
    patches whatever the denoiser's own patch setting says (Z-Image, FLUX.2)."""
    return 2 * backbone.vae_scale
