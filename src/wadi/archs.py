"""Built-in architecture configs of the paper's backbones, buildable without weights.

The configs are those of the public SD 1.5 / SD 2.1 UNets and the PixArt-alpha
transformer. Built on the meta device they cost no memory, so adapter parameter counts
need no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbones import get_kind


@dataclass(frozen=True)
class Arch:
    name: str
    kind: str  # backbone kind (wadi.backbones.KINDS): denoiser class and target presets
    config: dict


_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
)

ARCHS: dict[str, Arch] = {
    "sd15": Arch("sd15", "sd", _SD15_UNET),
    "sd21": Arch("sd21", "sd",
                 dict(_SD15_UNET, sample_size=96, cross_attention_dim=1024,
                      attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)),
    "pixart": Arch("pixart", "pixart",
                   dict(sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=1152,
                        caption_channels=4096, norm_type="ada_norm_single",
                        norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
                        activation_fn="gelu-approximate", attention_bias=True,
                        use_additional_conditions=False)),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; built-in architectures: {', '.join(ARCHS)}")
    return ARCHS[name]


def build(name: str, device: str | torch.device = "meta") -> torch.nn.Module:
    """The architecture `name` with random (or, on meta, no) weights."""
    import diffusers

    arch = get_arch(name)
    with torch.device(device):
        return getattr(diffusers, get_kind(arch.kind).denoiser)(**arch.config)
