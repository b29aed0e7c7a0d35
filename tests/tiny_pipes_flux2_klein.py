"""A tiny FLUX.2 klein pipeline (the shapes diffusers' own Flux2KleinPipeline tests use)
saved to disk as a whole Flux2KleinPipeline. Its Qwen3 has 27 layers, so that the
pipeline's default layers 9, 18 and 27 exist and no call needs text_encoder_out_layers."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipes_z_image import qwen3_config, save_qwen_tokenizer


def save_tiny_flux2_klein(folder: Path, seed: int = 0, is_distilled: bool = False) -> Path:
    """Qwen3 (27 layers, width 8: 24-wide prompt states), a FLUX.2 transformer on 16
    channels (4 VAE channels patchified 2x2), a VAE with a 2x reduction whose batch-norm
    statistics are not the identity's (16 px is a 4x4 patchified latent, 16 tokens), and
    FLUX.2's scheduler: an exponential shift over the token count."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = save_qwen_tokenizer(folder / "tokenizer")
    encoder = Qwen3ForCausalLM(qwen3_config(len(tok), 8, 27))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(sample_size=16, in_channels=3, out_channels=3, latent_channels=4,
                             block_out_channels=(8, 16),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer,
                       is_distilled=is_distilled).save_pretrained(folder)
    return folder
