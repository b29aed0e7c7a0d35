"""FLUX.1 (dev and schnell): FluxPipeline's encoding, denoiser call and decoding, transcribed.

Prompts: CLIP's pooled output (the pooled projection) and T5's token states (the sequence),
neither masked, as FluxPipeline.encode_prompt does by default. Latents: the pipeline draws
16-channel noise at (H/8, W/8) and packs each 2x2 patch into one 64-channel token, with
position ids (0, row, column) per token and zeros for the text tokens; the engine keeps the
drawn, unpacked layout and the call packs, runs the transformer at time t/1000 and unpacks.

FLUX.1-dev is guidance-distilled: the transformer takes a guidance scale as an input
(`guidance_embeds` in its config) and the pipeline runs no negative pass. That input travels
in `Cond.extra["guidance"]` (one value per row), set by `encode` and replaced by `guide`.
FLUX.1-schnell has no such input and no guidance at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from wadi.models.conditioning import Cond

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone

# FluxPipeline's default guidance_scale: the embedded guidance FLUX.1-dev is sampled at.
GUIDANCE = 3.5


def _pipeline():
    from diffusers import FluxPipeline

    return FluxPipeline


def embedded(net: nn.Module) -> bool:
    """Whether the transformer takes a guidance input (FLUX.1-dev; schnell does not)."""
    return bool(net.config.guidance_embeds)


def encode(backbone: "Backbone", prompts: list[str], mask_encoder: bool) -> Cond:
    """As FluxPipeline.encode_prompt by default: CLIP's pooled output at the CLIP tokenizer's
    own length, T5's states at max_length (the pipeline's max_sequence_length), no mask to
    either encoder or the transformer (`mask_encoder` has nothing to change: the pipeline
    masks neither). A guidance-distilled transformer's guidance input is set to the
    pipeline's default."""
    clip, t5 = backbone.text["tokenizer"], backbone.text["tokenizer_2"]
    device = next(backbone.text["text_encoder"].parameters()).device
    ids = clip(list(prompts), padding="max_length", max_length=clip.model_max_length, truncation=True,
               return_tensors="pt").input_ids
    pooled = backbone.text["text_encoder"](ids.to(device), output_hidden_states=False).pooler_output
    device = next(backbone.text["text_encoder_2"].parameters()).device
    ids = t5(list(prompts), padding="max_length", max_length=backbone.max_length, truncation=True,
             return_tensors="pt").input_ids
    states = backbone.text["text_encoder_2"](ids.to(device), output_hidden_states=False)[0]
    extra = {"pooled": pooled.to(states.dtype)}
    if embedded(backbone.net):
        extra["guidance"] = torch.full((len(prompts),), GUIDANCE, device=states.device, dtype=torch.float32)
    return Cond(states, None, extra)


def noise_shape(backbone: "Backbone") -> tuple[int, int, int]:
    """What FluxPipeline.prepare_latents draws per image: (in_channels / 4, 2 (H // 16), 2 (W // 16))
    for FLUX's 8x VAE; the backbone refuses resolutions that are not multiples of 16."""
    return (backbone.net.config.in_channels // 4, backbone.latent_size, backbone.latent_size)


def image_tokens(backbone: "Backbone") -> int:
    """The packed sequence length, which FluxPipeline passes calculate_shift as image_seq_len."""
    return (backbone.latent_size // 2) ** 2


def sigmas(steps: int) -> list[float]:
    """The sigmas FluxPipeline passes scheduler.set_timesteps: evenly spaced from 1 to 1/steps
    (before the scheduler's shift)."""
    return np.linspace(1.0, 1 / steps, steps).tolist()


def call(backbone: "Backbone", net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The velocity at x_t (B, C, h, w) and process time t (B,), as FluxPipeline's denoising
    loop calls the transformer: latents packed in 2x2 patches, image and text position ids,
    time t/1000, the pooled CLIP embedding, the guidance input where the net has one."""
    pipe = _pipeline()
    b, c, h, w = x_t.shape
    packed = pipe._pack_latents(x_t, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
    txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
    guidance = cond.extra["guidance"] if embedded(net) else None
    out = net(hidden_states=packed, timestep=t.to(x_t.dtype) / 1000, guidance=guidance,
              pooled_projections=cond.extra["pooled"], encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
              img_ids=img_ids, return_dict=False)[0]
    return pipe._unpack_latents(out, h, w, 1)


def guide(backbone: "Backbone", net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond,
          scale: float) -> torch.Tensor:
    """The prediction in float32 at embedded guidance `scale`: one pass with the guidance input
    set to it (no negative prompt, as FluxPipeline at true_cfg_scale 1). schnell has no
    guidance: only scale 1."""
    if not embedded(net):
        if scale != 1:
            raise ValueError(f"this FLUX model has no guidance input (FLUX.1-schnell); guidance {scale:g} "
                             "was asked, use 1")
        return call(backbone, net, x, t, cond).float()
    extra = {**cond.extra, "guidance": torch.full((len(x),), float(scale), device=x.device, dtype=torch.float32)}
    return call(backbone, net, x, t, Cond(cond.embeds, cond.mask, extra)).float()


@torch.no_grad()
def decode(backbone: "Backbone", x0: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as FluxPipeline decodes: latents / scaling_factor + shift_factor."""
    vae = backbone.vae
    latents = x0.to(next(vae.parameters()).dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents).sample.float().clamp(-1, 1)


def pipeline_call(backbone: "Backbone", steps: int) -> dict:
    """FluxPipeline's arguments (besides prompt and generator) that sample the student as
    `wadi sample` does: its steps, the embedded guidance (dev; schnell ignores it: 0 as its
    card writes), no true CFG (the default, without a negative prompt), its size and text length."""
    guidance = GUIDANCE if embedded(backbone.net) else 0.0
    return {"num_inference_steps": steps, "guidance_scale": guidance, "height": backbone.resolution,
            "width": backbone.resolution, "max_sequence_length": backbone.max_length}
