"""A tiny Qwen-Image pipeline (QwenImagePipeline's components: Qwen2.5-VL, the MMDiT with
packed latents, the 3-D causal VAE, flow-matching Euler with Qwen-Image's dynamic shift and
terminal stretch), built in code the way diffusers' own tests build it and saved to disk,
so tests load it back by path. The tokenizer is a byte-level BPE built here: nothing is
downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from wadi.adapters.core import AdapterConfig
from wadi.engine.config import DataConfig, DistillConfig, RunConfig, TrainConfig
from wadi.models.backbones import BackboneSpec

RESOLUTION = 32  # 8x8 latents (the VAE's factor is 4), 4x4 packed tokens
# The words of the pipeline's prompt template and of the test prompts, each merged into one
# token as Qwen's own tokenizer does, so that the template's system part is 34 tokens, the
# number the pipeline drops.
WORDS = ["system", "user", "assistant", "Describe"] + [" " + w for w in (
    "the image by detailing color shape size texture quantity text spatial relationships of objects and background "
    "a photo cat dog red car digit seven on table").split()]
# Qwen-Image's released scheduler config: the resolution-dependent shift over 256..8192
# image tokens and the terminal stretch to 0.02 (which makes one step NaN in diffusers).
QWEN_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                      base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                      time_shift_type="exponential")


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over all 256 bytes, with merges that make each of WORDS one token,
    and the chat template's special tokens."""
    level = ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {"<|endoftext|>": 0}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    merges = []
    for word in WORDS:
        chars = level.pre_tokenize_str(word)[0][0]
        merged = chars[0]
        for c in chars[1:]:
            if (merged, c) not in merges:
                merges.append((merged, c))
            merged += c
            vocab.setdefault(merged, len(vocab))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_qwen_components(seed: int = 0) -> dict:
    """The components of diffusers' QwenImagePipeline tests (smaller vocabulary, non-trivial
    latent statistics so that decoding tests them)."""
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                                 latents_std=[1.5, 0.8, 2.0, 1.1])
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, rope_theta=1000000.0,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tokenizer))).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER))


def save_tiny_qwen(folder: Path, seed: int = 0) -> Path:
    """The tiny pipeline saved as a QwenImagePipeline folder (model_index.json and all)."""
    QwenImagePipeline(**tiny_qwen_components(seed)).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def qwen_cfg(base: Path, prompts: Path, root: Path, student_steps: int = 1, steps: int = 2, **train) -> DistillConfig:
    """A tiny distillation of the tiny pipeline at 32 px."""
    return DistillConfig(
        model=BackboneSpec(kind="qwen-image", path=str(base), resolution=RESOLUTION, student_steps=student_steps),
        student=AdapterConfig("lorad", 4, "mmdit-student"), fake=AdapterConfig("lorad", 2, "qwen-fake"),
        data=DataConfig(prompts=str(prompts), sample_prompts=["a cat"]),
        train=TrainConfig(**{"steps": steps, "batch_size": 2, **train}),
        run=RunConfig(root=str(root / "runs"), checkpoint_every=0, keep_checkpoints=10, sample_every=0, log_every=1,
                      sample_seeds=[0]))
