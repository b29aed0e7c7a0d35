"""FLUX.2 klein (Flux2KleinPipeline): an MMDiT on Qwen3's states from several layers,
each transcribed from the stock pipeline's default call.

- Prompts go through Qwen3's chat template (thinking off); the states of layers 9, 18 and
  27, side by side per token, padded to max_length; the denoiser attends to all of them
  (no mask), with 4-axis position ids (time, height, width, token).
- The engine's latent is the one the pipeline draws its noise in: the VAE's 32 channels
  already patchified 2x2 into 128 at half the side, normalised by the VAE's batch-norm
  running statistics. `call` packs it into tokens with their ids; `decode` undoes the
  normalisation and the patches before the VAE.
- Time is t / 1000. The schedule's shift depends on the image's token count and the
  number of steps (the pipeline's empirical mu, `mu`), over the sigmas 1 .. 1/N.
- The undistilled base is guided with ordinary CFG against the empty prompt; a distilled
  klein (`is_distilled` in its pipeline config) takes no guidance, as its pipeline ignores it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from wadi.errors import describe
from wadi.models.conditioning import Cond, _tokens
from wadi.models.guidance import guided_cfg, guided_none

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone

MAX_LENGTH = 512  # the pipeline's max_sequence_length
LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers


def _pipeline():
    # The pipeline's own static helpers (ids, packing, patches), so the layouts are its.
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def encode(backbone: Backbone, prompts: list[str], mask_encoder: bool) -> Cond:
    """As Flux2KleinPipeline.encode_prompt: each prompt as the user's turn of Qwen3's chat
    template (thinking off), padded to max_length, the encoder's states of LAYERS (under
    the mask) side by side per token. The denoiser takes no mask, so `Cond` has none; the
    encoder always masks, so `mask_encoder` changes nothing."""
    tokenizer = backbone.text["tokenizer"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False) for p in prompts]
    ids, mask = _tokens(backbone, texts)
    out = backbone.text["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    states = torch.stack([out.hidden_states[k] for k in LAYERS], dim=2)  # (B, L, layers, D)
    return Cond(states.flatten(2))


def call(backbone: Backbone, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The velocity at (x_t, process time t): x_t (B, C, h, w) as h*w tokens with their
    position ids, the prompt's tokens with theirs, time t / 1000."""
    pipeline = _pipeline()
    b, c, h, w = x_t.shape
    out = net(hidden_states=pipeline._pack_latents(x_t), encoder_hidden_states=cond.embeds,
              timestep=t.to(x_t.dtype) / 1000, img_ids=pipeline._prepare_latent_ids(x_t).to(x_t.device),
              txt_ids=pipeline._prepare_text_ids(cond.embeds).to(x_t.device), guidance=None, return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)  # tokens back in the order _pack_latents took them


def noise_shape(backbone: Backbone) -> tuple[int, int, int]:
    """Flux2KleinPipeline.prepare_latents draws (4 C, H / 2f, W / 2f) per image (in the text
    encoder's dtype: on the CPU the same numbers as float32's, rounded)."""
    side = backbone.latent_size // 2
    return (backbone.channels, side, side)


def image_tokens(backbone: Backbone) -> int:
    """The pipeline's image_seq_len: one token per patchified latent pixel."""
    return (backbone.latent_size // 2) ** 2


def mu(backbone: Backbone, steps: int) -> float:
    """The shift the pipeline gives the scheduler: its empirical fit over the image's token
    count and the number of steps (not calculate_shift)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_tokens(backbone), num_steps=steps)


def sigmas(steps: int) -> list[float]:
    """The sigmas Flux2KleinPipeline passes the scheduler (before its shift)."""
    return np.linspace(1.0, 1 / steps, steps).tolist()


def decode(backbone: Backbone, x0: torch.Tensor) -> torch.Tensor:
    """The batch-norm statistics put back, the 2x2 patches undone, the VAE; images in [-1, 1]."""
    vae = backbone.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x0.device, x0.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x0.device, x0.dtype)
    latents = _pipeline()._unpatchify_latents(x0 * std + mean)
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


@lru_cache
def _distilled(path: str) -> bool:
    """is_distilled of a pipeline folder's or hub id's model_index.json; a folder without
    one holds the base, as the pipeline's default says."""
    from diffusers import DiffusionPipeline

    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        return False
    try:
        return bool(DiffusionPipeline.load_config(path).get("is_distilled", False))
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"could not read the model_index.json of {path} (whether its FLUX.2 klein is "
                         f"step-distilled): {describe(e)}") from None


def guidance_mode(backbone: Backbone) -> str:
    """"none" for a step-distilled klein (is_distilled in its model_index.json), whose
    pipeline ignores guidance; "cfg" for the base."""
    return "none" if _distilled(backbone.spec.path) else "cfg"


def guide(backbone: Backbone, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond,
          scale: float) -> torch.Tensor:
    """As Flux2KleinPipeline guides: e_u + s (e_c - e_u) against the empty prompt for the
    base (one batched pass here, two there); a distilled klein refuses any scale but 1."""
    mode = guided_none if guidance_mode(backbone) == "none" else guided_cfg
    return mode(backbone, net, x, t, cond, scale)


def pipeline_call(backbone: Backbone, steps: int) -> dict:
    """Flux2KleinPipeline's arguments that sample as the student does: its steps, no
    guidance (guidance_scale 1), the size and the prompt length. (Pass the prompt as
    prompt=: the pipeline's first argument is a conditioning image.)"""
    return {"num_inference_steps": steps, "guidance_scale": 1.0, "height": backbone.resolution,
            "width": backbone.resolution, "max_sequence_length": backbone.max_length}
