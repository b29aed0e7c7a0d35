"""Tiny FLUX.1 pipelines saved with FluxPipeline.save_pretrained, the way users' folders are:
a dev-like one whose transformer takes a guidance input and the dynamically shifted
scheduler of FLUX.1-dev, and a schnell-like one with neither (schnell's fixed shift 1).
The shapes follow diffusers' own fast tests of FluxPipeline (one double and one single
block, CLIP and T5 of width 32); tokenizers are built locally, nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tiny_pipes import _bert_tokenizer, _clip_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

# The released schedulers' settings (FLUX.1-dev's and FLUX.1-schnell's scheduler_config.json).
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# T5's token length in the tiny pipelines (FLUX.1-dev's pipeline default is 512).
MAX_LENGTH = 8


def tiny_flux_pipeline(guidance: bool = True, seed: int = 0) -> FluxPipeline:
    """FluxPipeline with tiny components: 16 latent channels packed 2x2 into 64 (FLUX's own),
    a 2x VAE (multiples of 4 px) with FLUX's scaling and shift factors."""
    import tempfile

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp) / "clip")
        tokenizer_2 = _bert_tokenizer(Path(tmp) / "t5", max_length=MAX_LENGTH)
    # The pooled output is the state at the end-of-text token, which the config must name.
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER))
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def save_tiny_flux(folder: Path, guidance: bool = True, seed: int = 0) -> Path:
    """A dev-like (guidance input) or schnell-like (none) tiny FLUX.1 pipeline folder."""
    tiny_flux_pipeline(guidance, seed).save_pretrained(folder)
    return folder


def flux_cfg(folder: Path, prompts: Path, root: Path, steps: int = 2, student_steps: int = 1, **train):
    """A tiny distillation of a tiny FLUX pipeline at 16 px with the kind's target presets."""
    from wadi.adapters.core import AdapterConfig
    from wadi.engine.config import DataConfig, DistillConfig, RunConfig, TrainConfig
    from wadi.models.backbones import BackboneSpec

    return DistillConfig(
        model=BackboneSpec(kind="flux", path=str(folder), resolution=16, max_length=MAX_LENGTH,
                           student_steps=student_steps),
        student=AdapterConfig("lorad", 4, "mmdit-student"), fake=AdapterConfig("lorad", 2, "flux-fake"),
        data=DataConfig(prompts=str(prompts), sample_prompts=["a cat"]),
        train=TrainConfig(**{"steps": steps, "batch_size": 2, "guidance": 1.0, "mixed_precision": "no", **train}),
        run=RunConfig(root=str(root / "runs"), checkpoint_every=0, sample_every=0, log_every=1, sample_seeds=[0]))
