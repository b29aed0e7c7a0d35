"""Built-in architecture configs of the paper's backbones, buildable without weights.

The configs are those of the public SD 1.5 / SD 2.1 UNets and the PixArt-alpha
transformer. Built on the meta device they cost no memory, so adapter parameter counts
need no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # "unet" or "dit": which target presets apply
    model_class: str  # diffusers class name
    config: dict
    hub_id: str  # where users usually get the weights


_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
)

ARCHS: dict[str, Arch] = {
    "sd15": Arch("sd15", "unet", "UNet2DConditionModel", _SD15_UNET,
                 "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd21": Arch("sd21", "unet", "UNet2DConditionModel",
                 dict(_SD15_UNET, sample_size=96, cross_attention_dim=1024,
                      attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
                 "stabilityai/stable-diffusion-2-1"),
    "pixart": Arch("pixart", "dit", "PixArtTransformer2DModel",
                   dict(sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=1152,
                        caption_channels=4096, norm_type="ada_norm_single",
                        norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
                        activation_fn="gelu-approximate", attention_bias=True,
                        use_additional_conditions=False),
                   "PixArt-alpha/PixArt-XL-2-256x256"),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; built-in architectures: {', '.join(ARCHS)}")
    return ARCHS[name]


def model_family(model: nn.Module) -> str:
    """'unet' or 'dit' for a diffusers backbone, by class."""
    cls = type(model).__name__
    if "UNet" in cls:
        return "unet"
    if "Transformer" in cls:
        return "dit"
    raise ValueError(f"cannot tell the family of {cls}; pass explicit target patterns")


def build(name: str, device: str | torch.device = "meta") -> nn.Module:
    """The architecture `name` with random (or, on meta, no) weights."""
    import diffusers

    arch = get_arch(name)
    with torch.device(device):
        return getattr(diffusers, arch.model_class)(**arch.config)
