"""FLUX.1 (dev and schnell): FluxPipeline's encoding, denoiser call and call arguments, transcribed.

Prompts: CLIP's pooled output (the pooled projection) and T5's token states (the sequence),
neither masked, as FluxPipeline.encode_prompt does by default. Latents: the pipeline draws
16-channel noise at (H/8, W/8) and packs each 2x2 patch into one 64-channel token, with
position ids (0, row, column) per token and zeros for the text tokens; the engine keeps the
drawn, unpacked layout and the call packs, runs the transformer at time t/1000 and unpacks.

FLUX.1-dev is guidance-distilled: the transformer takes a guidance scale as an input
(`guidance_embeds` in its config) and the pipeline runs no negative pass. Teacher, fake
model and student all take the same value (docs/method.md, section 7): `model.guidance`, by
default the pipeline's own 3.5. It travels in `Cond.extra["guidance"]` (one value per row),
set by `encode`; guidance at another scale sets it to that scale. FLUX.1-schnell has no
such input and no guidance at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from wadi.models.conditioning import Cond
from wadi.models.guidance import guided_embedded, guided_none

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


def guidance_mode(backbone: Backbone) -> str:
    """dev: "embedded"; schnell: "none" (wadi.models.guidance)."""
    return "embedded" if embedded(backbone.net) else "none"


def guidance(backbone: Backbone) -> float | None:
    """The guidance input teacher, fake model and student take: `model.guidance`, else the
    pipeline's default; None for a transformer without one (the backbone refuses the setting)."""
    if not embedded(backbone.net):
        return None
    return GUIDANCE if backbone.spec.guidance is None else backbone.spec.guidance


def encode(backbone: Backbone, prompts: list[str], mask_encoder: bool) -> Cond:
    """As FluxPipeline.encode_prompt by default: CLIP's pooled output at the CLIP tokenizer's
    own length, T5's states at max_length (the pipeline's max_sequence_length), no mask to
    either encoder or the transformer (`mask_encoder` has nothing to change: the pipeline
    masks neither); a guidance-distilled transformer's guidance input beside them."""
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
    scale = guidance(backbone)
    if scale is not None:
        extra["guidance"] = torch.full((len(prompts),), scale, device=states.device, dtype=torch.float32)
    return Cond(states, None, extra)


def noise_shape(backbone: Backbone) -> tuple[int, int, int]:
    """What FluxPipeline.prepare_latents draws per image: (in_channels / 4, H / 8, W / 8) for
    FLUX's 8x VAE, at a resolution that `resolution_multiple` lets through."""
    return (backbone.net.config.in_channels // 4, backbone.latent_size, backbone.latent_size)


def resolution_multiple(backbone: Backbone) -> int:
    """The VAE's factor times the 2x2 packing (16 px for FLUX); FluxPipeline would resize
    other sizes, and its images would no longer be the student's."""
    return 2 * backbone.vae_scale


def image_tokens(backbone: Backbone) -> int:
    """The packed sequence length, which FluxPipeline passes calculate_shift as image_seq_len."""
    return (backbone.latent_size // 2) ** 2


def sigmas(steps: int) -> list[float]:
    """The sigmas FluxPipeline passes scheduler.set_timesteps: evenly spaced from 1 to 1/steps
    (before the scheduler's shift)."""
    return np.linspace(1.0, 1 / steps, steps).tolist()


def call(backbone: Backbone, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The velocity at x_t (B, C, h, w) and process time t (B,), as FluxPipeline's denoising
    loop calls the transformer: latents packed in 2x2 patches, image and text position ids,
    time t/1000, the pooled CLIP embedding, the guidance input where the net has one."""
    pipe = _pipeline()
    b, c, h, w = x_t.shape
    packed = pipe._pack_latents(x_t, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
    txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
    out = net(hidden_states=packed, timestep=t.to(x_t.dtype) / 1000, guidance=cond.extra.get("guidance"),
              pooled_projections=cond.extra["pooled"], encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
              img_ids=img_ids, return_dict=False)[0]
    return pipe._unpack_latents(out, h, w, 1)


def guide(backbone: Backbone, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond,
          scale: float) -> torch.Tensor:
    """FLUX.1-dev: one pass with the guidance input at `scale` (at 1, the input the
    conditioning carries), no negative prompt, as FluxPipeline at true_cfg_scale 1.
    FLUX.1-schnell has no guidance: only scale 1."""
    return (guided_embedded if embedded(net) else guided_none)(backbone, net, x, t, cond, scale)


def pipeline_call(backbone: Backbone, steps: int) -> dict:
    """FluxPipeline's arguments (besides prompt and generator) that sample the student as
    `wadi sample` does: its steps, its guidance input (schnell has none and ignores the
    argument: 0, as its own card writes), no true CFG (the default, without a negative
    prompt), its size and T5's length."""
    scale = guidance(backbone)
    return {"num_inference_steps": steps, "guidance_scale": 0.0 if scale is None else scale,
            "height": backbone.resolution, "width": backbone.resolution, "max_sequence_length": backbone.max_length}
