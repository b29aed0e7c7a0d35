"""Qwen-Image (QwenImagePipeline): Qwen2.5-VL's last hidden states of the prompt inside the
pipeline's chat template, the template's system part dropped; an MMDiT on 2x2-packed latents
with their grid as `img_shapes`; true CFG with a negative prompt, rescaled to the conditional
prediction's norm per token; a 3-D causal VAE whose latents are un-normalised by
`latents_mean` / `latents_std` and decoded as one-frame videos.

The engine keeps each image's latents as the pipeline draws them, (C, H/8, W/8) (the
pipeline's (1, C, 1, H/8, W/8) holds the same numbers), and packs them in `call`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from wadi.models.conditioning import Cond

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone

# QwenImagePipeline's prompt template, the number of its leading tokens (the system part,
# up to and including "user\n") that the pipeline drops from the encoder's states, and the
# longest text it keeps (the tokenizer reads that many tokens after the dropped ones).
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34
LONGEST = 1024


def encode(backbone: "Backbone", prompts: list[str], mask_encoder: bool) -> Cond:
    """As QwenImagePipeline.encode_prompt: each prompt in the template, Qwen2.5-VL's last
    hidden states of its real tokens (the encoder always masks padding, so `mask_encoder`
    changes nothing), the first DROP dropped, at most max_length kept. The pipeline pads a
    batch to its longest prompt; here every batch is padded with zeros to max_length under
    the mask (the denoiser's attention skips them), so that batches of any prompts stack."""
    n = backbone.max_length
    if n > LONGEST:
        raise ValueError(f"max_length {n} (model.max_length / --max-length) is beyond the {LONGEST} text tokens "
                         "QwenImagePipeline takes")
    device = next(backbone.text_encoder.parameters()).device
    tokens = backbone.tokenizer([TEMPLATE.format(p) for p in prompts], max_length=LONGEST + DROP, padding=True,
                                truncation=True, return_tensors="pt").to(device)
    states = backbone.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
    embeds = states.new_zeros(len(prompts), n, states.shape[-1])
    mask = torch.zeros(len(prompts), n, dtype=torch.long, device=device)
    for i, (row, real) in enumerate(zip(states, tokens.attention_mask.bool())):
        kept = row[real][DROP:DROP + n]
        embeds[i, :len(kept)] = kept
        mask[i, :len(kept)] = 1
    return Cond(embeds, mask)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as the pipeline packs them: (B, h/2 * w/2, 4C), a token per 2x2 patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def call(backbone: "Backbone", net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The velocity at process time t: latents packed, the patch grid as `img_shapes`, time as
    the pipeline passes it (t in the latents' dtype, / 1000), the text under its mask."""
    if net.config.guidance_embeds:
        raise ValueError("this Qwen-Image transformer takes an embedded guidance scale (guidance_embeds), which "
                         "QwenImagePipeline's released models do not; wadi guides Qwen-Image with true CFG only")
    b, _, h, w = x_t.shape
    out = net(hidden_states=pack(x_t), timestep=t.to(x_t.dtype) / 1000, encoder_hidden_states=cond.embeds,
              encoder_hidden_states_mask=cond.mask, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return unpack(out, h, w)


def guide(backbone: "Backbone", net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond,
          scale: float) -> torch.Tensor:
    """QwenImagePipeline's true CFG, in float32: neg + s (pos - neg) from one batched pass
    with the empty prompt as the negative, rescaled per token (2x2 patch, all channels) to
    the norm of the conditional prediction. At s = 1 the conditional prediction alone; the
    pipeline has no scale below 1 (it switches CFG off there), so none is taken."""
    if scale < 1:
        raise ValueError(f"guidance {scale:g} is below 1, where QwenImagePipeline's true CFG is off; give a guidance "
                         "of at least 1 (train.guidance / --guidance)")
    if scale == 1:
        return backbone.predict(net, x, t, cond).float()
    uncond = backbone.empty_cond().to(x.device, x.dtype).expand(len(x))
    neg, pos = backbone.predict(net, torch.cat([x, x]), t.repeat(2), uncond.cat(cond)).float().chunk(2)
    neg, pos = pack(neg), pack(pos)
    combined = neg + scale * (pos - neg)
    rescaled = combined * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return unpack(rescaled, *x.shape[-2:])


def vae_scale(vae) -> int:
    """Pixels per latent: the VAE halves the image at each of its levels after the first
    (QwenImagePipeline's vae_scale_factor, 2 ** len(temperal_downsample))."""
    return 2 ** len(vae.config.temperal_downsample)


def noise_shape(backbone: "Backbone") -> tuple[int, int, int]:
    """(C, H/8, W/8): the numbers of the pipeline's (1, C, 1, H/8, W/8) draw, C the VAE's
    channels (the transformer takes 4 C per packed token)."""
    return (backbone.net.config.in_channels // 4, backbone.latent_size, backbone.latent_size)


def image_tokens(backbone: "Backbone") -> int:
    """Packed tokens per image: what the pipeline passes calculate_shift."""
    return (backbone.latent_size // 2) ** 2


def decode(backbone: "Backbone", x0: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the pipeline decodes: latents un-normalised (x / (1 / std) +
    mean, the pipeline's arithmetic) and decoded as one-frame videos."""
    vae = backbone.vae
    latents = x0.to(backbone.vae_dtype()).unsqueeze(2)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0].float().clamp(-1, 1)


def sigmas(steps: int) -> np.ndarray:
    """The sigmas QwenImagePipeline passes its scheduler: 1 .. 1/N evenly, before the shift."""
    return np.linspace(1.0, 1 / steps, steps)


def pipeline_call(backbone: "Backbone", steps: int) -> dict:
    """QwenImagePipeline's arguments that sample the student: its steps, true CFG off (no
    negative prompt and a scale of 1), its size and text length."""
    return {"num_inference_steps": steps, "true_cfg_scale": 1.0, "height": backbone.resolution,
            "width": backbone.resolution, "max_sequence_length": backbone.max_length}
