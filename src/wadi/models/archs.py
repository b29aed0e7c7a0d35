"""Built-in architecture configs of the paper's backbones, buildable without weights.

The configs are those of the public SD 1.5 / SD 2.1 / SDXL UNets, the PixArt-alpha transformer,
the SD3.5 medium / large MMDiTs, the Sana 0.6B / 1.6B (1024 px) transformers, the FLUX.1
[dev] / [schnell] transformers, Qwen-Image's 20B MMDiT, Z-Image 6B and FLUX.2 klein 4B / 9B.
Built on the meta device they cost no memory, so adapter parameter counts need no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wadi.models.backbones import get_kind


@dataclass(frozen=True)
class Arch:
    name: str
    kind: str  # backbone kind (wadi.models.backbones.KINDS): denoiser class and target presets
    config: dict


_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
)

_FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56))

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
    # SDXL base: three levels (no attention at the first), transformer depth 1 / 2 / 10 per
    # level (10 in the middle), two CLIPs' 2048-wide states, the text_time embedding.
    "sdxl": Arch("sdxl", "sdxl",
                 dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                      attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)),
    # SD3.5 medium: 24 MMDiT blocks of width 1536, the first 13 with a second (image-only)
    # attention; SD3.5 large: 38 blocks of width 2432, QK-normalised.
    "sd35-medium": Arch("sd35-medium", "sd3",
                        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                             attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                             caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "sd35-large": Arch("sd35-large", "sd3",
                       dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                            attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                            caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                            qk_norm="rms_norm")),
    # Sana at 1024 px (32x32 DC-AE latents): 0.6B is 28 blocks of width 1152, 1.6B 20 of 2240.
    "sana-0.6b": Arch("sana-0.6b", "sana",
                      dict(sample_size=32, patch_size=1, in_channels=32, out_channels=32, num_layers=28,
                           num_attention_heads=36, attention_head_dim=32, num_cross_attention_heads=16,
                           cross_attention_head_dim=72, cross_attention_dim=1152, caption_channels=2304,
                           mlp_ratio=2.5, norm_elementwise_affine=False, norm_eps=1e-6)),
    "sana-1.6b": Arch("sana-1.6b", "sana",
                      dict(sample_size=32, patch_size=1, in_channels=32, out_channels=32, num_layers=20,
                           num_attention_heads=70, attention_head_dim=32, num_cross_attention_heads=20,
                           cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
                           mlp_ratio=2.5, norm_elementwise_affine=False, norm_eps=1e-6)),
    # FLUX.1 [dev] (12B): 19 double-stream and 38 single-stream blocks of width 3072 on
    # 2x2-packed 16-channel latents, T5-XXL states and CLIP-L's pooled output, the guidance
    # embedder; [schnell] is the same without it.
    "flux-dev": Arch("flux-dev", "flux", _FLUX),
    "flux-schnell": Arch("flux-schnell", "flux", dict(_FLUX, guidance_embeds=False)),
    # Z-Image 6B (Turbo and base alike): 30 single-stream layers of width 3840 after two noise and
    # two caption refiners, on Qwen3-4B's 2560-wide states.
    "z-image-6b": Arch("z-image-6b", "z-image",
                       dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                            n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                            cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                            axes_lens=[1536, 512, 512])),
    # FLUX.2 klein 4B: 5 double- and 20 single-stream blocks of width 3072 on three of
    # Qwen3-4B's layers (3 x 2560); 9B: 8 and 24 of width 4096 on Qwen3-8B's (3 x 4096).
    "flux2-klein-4b": Arch("flux2-klein-4b", "flux2-klein",
                           dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                                rope_theta=2000, eps=1e-6, guidance_embeds=False)),
    "flux2-klein-9b": Arch("flux2-klein-9b", "flux2-klein",
                           dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24,
                                attention_head_dim=128, num_attention_heads=32, joint_attention_dim=12288,
                                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                                rope_theta=2000, eps=1e-6, guidance_embeds=False)),
    # Qwen-Image (20B): 60 double-stream blocks of width 3072 (24 heads of 128) on Qwen2.5-VL
    # 7B's 3584-wide states, 16-channel latents packed 2x2 (its released transformer config).
    "qwen-image": Arch("qwen-image", "qwen-image",
                       dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                            axes_dims_rope=(16, 56, 56))),
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
