"""Z-Image (ZImagePipeline): a single-stream DiT on Qwen3's states, each transcribed from
the stock pipeline's default call.

- Prompts go through Qwen3's chat template; the denoiser takes each prompt's states at its
  real tokens only (a list of tensors of differing lengths), so `Cond` keeps them padded
  under the tokenizer's mask and `call` cuts them back out.
- The denoiser also takes a list of latents, one (C, 1, H, W) per image, and its time runs
  the other way: (1000 - t) / 1000, with the output negated to give the velocity.
- Its scheduler has a static shift of 3; its pipeline passes the sigmas 1 .. 1/N.
- Guidance is pos + g (pos - neg), i.e. the usual e_u + s (e_c - e_u) at s = g + 1, with
  two options of the pipeline: `cfg_normalization` (a guided prediction's norm capped at
  that multiple of the conditional one's, per image; 0 is off) and `cfg_truncation` (no
  guidance where the net's time (1000 - t) / 1000 is above it; 1 is off).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from wadi.models.conditioning import Cond, _tokens

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone

MAX_LENGTH = 512  # the pipeline's max_sequence_length

# The guidance options this kind has, at the pipeline's defaults (both off).
GUIDANCE_OPTIONS = {"cfg_normalization": 0.0, "cfg_truncation": 1.0}


def encode(backbone: Backbone, prompts: list[str], mask_encoder: bool) -> Cond:
    """As ZImagePipeline.encode_prompt: each prompt as the user's turn of Qwen3's chat
    template (thinking enabled), padded to max_length, the encoder's second-to-last states
    under the mask. The encoder always masks, so `mask_encoder` changes nothing."""
    tokenizer = backbone.text["tokenizer"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True) for p in prompts]
    ids, mask = _tokens(backbone, texts)
    mask = mask.bool()
    out = backbone.text["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return Cond(out.hidden_states[-2], mask)


def _captions(cond: Cond) -> list[torch.Tensor]:
    """Each prompt's states at its real tokens: what the denoiser takes."""
    return [states[mask.bool()] for states, mask in zip(cond.embeds, cond.mask)]


def call(backbone: Backbone, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The velocity at (x_t, process time t): the net takes one (C, 1, H, W) latent per
    image, time as (1000 - t) / 1000, and predicts the negated velocity."""
    out = net(list(x_t.unsqueeze(2).unbind(0)), (1000 - t) / 1000, _captions(cond), return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def image_tokens(backbone: Backbone) -> int:
    """The pipeline's image_seq_len: one token per 2x2 latent patch."""
    return (backbone.latent_size // 2) ** 2


def sigmas(steps: int) -> list[float]:
    """The sigmas ZImagePipeline passes the scheduler (before its shift)."""
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    return get_default_z_image_sigmas(steps)


def pipeline_guidance(scale: float) -> float:
    """The pipeline's guidance_scale g for wadi's CFG scale s = g + 1."""
    return scale - 1


def guide(backbone: Backbone, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, scale: float,
          cfg_normalization: float = 0.0, cfg_truncation: float = 1.0) -> torch.Tensor:
    """The velocity guided as ZImagePipeline guides it, in float32: one batched pass of
    [prompts; empty prompts] (the pipeline's order), pos + (s - 1)(pos - neg), each image's
    norm capped at `cfg_normalization` times its conditional one's; images whose net time
    (1000 - t) / 1000 is above `cfg_truncation` unguided. A CFG scale s <= 1 is no
    guidance, as the pipeline's guidance_scale <= 0 is."""
    g = pipeline_guidance(scale)
    guided = (1000 - t) / 1000 <= cfg_truncation
    if g <= 0 or not guided.any():
        return backbone.predict(net, x, t, cond).float()
    empty = backbone.empty_cond().to(x.device, x.dtype).expand(len(x))
    pos, neg = backbone.predict(net, torch.cat([x, x]), t.repeat(2), cond.cat(empty)).float().chunk(2)
    pred = pos + g * (pos - neg)
    if cfg_normalization > 0:
        limit = pos.flatten(1).norm(dim=1) * cfg_normalization
        norm = pred.flatten(1).norm(dim=1)
        pred = pred * torch.where(norm > limit, limit / norm, torch.ones_like(norm)).view(-1, 1, 1, 1)
    return torch.where(guided.view(-1, 1, 1, 1), pred, pos)


def pipeline_call(backbone: Backbone, steps: int) -> dict:
    """ZImagePipeline's arguments that sample as the student does: its steps, no guidance
    (guidance_scale 0 skips the negative pass), the size and the prompt length."""
    return {"num_inference_steps": steps, "guidance_scale": 0.0, "height": backbone.resolution,
            "width": backbone.resolution, "max_sequence_length": backbone.max_length}
