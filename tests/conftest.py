"""Tiny diffusers backbones built in code: the shapes of the real ones, a few thousand weights."""

import os

# Tiny models run fastest on one thread, and several threads per process thrash a shared
# 2-core machine (measured: a tiny distillation step took 0.3 s on one thread, 4.3 s on two
# under load). Subprocesses started by tests inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
# MKL may pick kernels by memory alignment, so two processes doing the same sums can
# differ in the last bits; strict mode makes a resumed run's sums those of an unbroken one.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=16,
)
TINY_PIXART = dict(
    sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4,
    out_channels=8, patch_size=2, cross_attention_dim=16, caption_channels=32,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True,
    use_additional_conditions=False,
)


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**TINY_PIXART).eval()


def unet_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 5, 32, generator=g))


def pixart_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                timestep=torch.tensor([10, 500][:batch]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


@pytest.fixture
def unet():
    return tiny_unet()
