"""A tiny Z-Image pipeline (the shapes diffusers' own ZImagePipeline tests use) saved to
disk as a whole ZImagePipeline, and the Qwen-style tokenizer it and FLUX.2 klein share:
word-level, built from a hand-written vocabulary with a chat template of Qwen3's form, so
nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipes import WORDS

# Qwen3's chat template for one user turn and the assistant's turn opening, with its
# empty thinking block when thinking is off (the form both pipelines render).
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant "
    "{%- if enable_thinking is defined and enable_thinking is false %}<think> </think> {%- endif %}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def save_qwen_tokenizer(folder: Path, max_length: int = 512):
    """A word-level tokenizer with Qwen's special tokens, padding on the right with
    <|endoftext|> as Qwen's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + ["<unk>", "user", "assistant", "dance", "monkey", "bad", "quality"] + WORDS
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", unk_token="<unk>",
                                  additional_special_tokens=SPECIAL[1:], model_max_length=max_length,
                                  padding_side="right")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def qwen3_config(vocab_size: int, hidden: int, layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=hidden // 2,
                       max_position_embeddings=512)


def save_tiny_z_image(folder: Path, seed: int = 0) -> Path:
    """Qwen3 (2 layers, width 16), a Z-Image transformer of width 48 (its feed-forward is
    then 128 wide: LoRaD's rotation pairs need even widths), a 16-channel VAE with Z-Image's
    scale and shift and a 2x reduction (16 px is an 8x8 latent, 16 tokens), and Z-Image's
    scheduler: a static shift of 3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    tok = save_qwen_tokenizer(folder / "tokenizer")
    encoder = Qwen3Model(qwen3_config(len(tok), 16, 2))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=48,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[8, 8, 8], axes_lens=[256, 32, 32])
    with torch.no_grad():  # made with torch.empty: random padding tokens keep the test honest
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok,
                   transformer=transformer).save_pretrained(folder)
    return folder
