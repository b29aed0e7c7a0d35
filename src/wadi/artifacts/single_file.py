"""The student as one checkpoint in the original Stable Diffusion layout (what A1111, ComfyUI
and `StableDiffusionPipeline.from_single_file` load), through diffusers' own conversion.

diffusers converts from that layout only. So the base model's own single file serves as
the template: every UNet tensor of it is replaced by its index, diffusers'
`convert_ldm_unet_checkpoint` renames them, and the indices that come out under each
diffusers name say which original key that name came from. The student's tensors then go
under those keys; the VAE and text encoders stay the template's. No key map is written here.

The template must be the base model, every component of it: diffusers' conversions read
its UNet, VAE and text encoders back, and each tensor must equal the base's own to the
precision of the coarser of the two dtypes (a template with other text-encoder weights
would give other images than `wadi sample`, with nothing to say so).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wadi.errors import describe

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone

ORIGINAL_UNET_PREFIX = "model.diffusion_model."
# Where the original layouts keep each text component: CLIP under `...transformer.`
# (transformers' own names), OpenCLIP under `...model.` (SD 2.x, SDXL's second encoder).
TEXT_PREFIXES = {"sd": {"text_encoder": ("cond_stage_model.transformer.", "cond_stage_model.model.")},
                 "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.",),
                          "text_encoder_2": ("conditioner.embedders.1.model.",)}}


def _under(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def unet_key_map(template: dict[str, torch.Tensor], unet_config: dict) -> dict[str, str]:
    """{diffusers UNet key: original key} for the UNet of `template`, by diffusers' conversion."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = list(_under(template, ORIGINAL_UNET_PREFIX))
    if not keys:
        raise ValueError(f"the template holds no UNet tensors ({ORIGINAL_UNET_PREFIX}...): is it an original "
                         "Stable Diffusion checkpoint?")
    probe = {k: torch.tensor(float(i), dtype=torch.float64).expand(template[k].shape) for i, k in enumerate(keys)}
    try:
        converted = convert_ldm_unet_checkpoint(probe, dict(unet_config))
    except (KeyError, IndexError, ValueError, RuntimeError) as e:  # diffusers looks the keys up as it goes
        raise ValueError(f"the template's UNet is not of the student's architecture ({type(e).__name__} "
                         f"{describe(e)[:80]} in diffusers' conversion); give the base model's own single-file "
                         "checkpoint") from None
    return {name: keys[int(t.reshape(-1)[0])] for name, t in converted.items() if t is not None}


def _components(template: dict[str, torch.Tensor], base: "Backbone") -> dict[str, tuple[torch.nn.Module, dict]]:
    """{what: (the base's module, the template's tensors of it under diffusers' names)}."""
    from diffusers.loaders import single_file_utils as sf

    found = {"UNet": (base.net, sf.convert_ldm_unet_checkpoint(_under(template, ORIGINAL_UNET_PREFIX),
                                                               dict(base.net.config)))}
    vae_prefix = next((p for p in sf.LDM_VAE_KEYS if any(k.startswith(p) for k in template)), None)
    if vae_prefix is None:
        raise ValueError(f"the template holds no VAE ({' or '.join(sf.LDM_VAE_KEYS)}...): give the base model's own "
                         "complete single-file checkpoint")
    found["VAE"] = (base.vae, sf.convert_ldm_vae_checkpoint(_under(template, vae_prefix), dict(base.vae.config)))
    for name, prefixes in TEXT_PREFIXES[base.kind.name].items():
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in template)), None)
        if prefix is None:
            raise ValueError(f"the template holds no {name.replace('_', ' ')} ({' or '.join(prefixes)}...): give the "
                             "base model's own complete single-file checkpoint")
        part, module = _under(template, prefix), base.text[name]
        converted = (sf.convert_ldm_clip_checkpoint(part, prefix) if prefix.endswith("transformer.")
                     else sf.convert_open_clip_checkpoint(module, part, prefix))
        if not hasattr(module, "text_model"):  # transformers 5.6 flattened CLIPTextModel (diffusers strips it too)
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        found[name.replace("_", " ")] = (module, converted)
    return found


def check_template(template: dict[str, torch.Tensor], base: "Backbone") -> None:
    """Refuse a template that is not the base model: each component's tensors, read back by
    diffusers, against the base's own, to the precision of the coarser dtype."""
    for what, (module, converted) in _components(template, base).items():
        for name, expected in module.state_dict().items():
            got = converted.get(name)
            if got is None or got.numel() != expected.numel():
                raise ValueError(f"the template's {what} is not the base model's ({name} is "
                                 f"{'missing' if got is None else 'another shape'}): give the base model's own "
                                 "single-file checkpoint")
            coarse = max(got.dtype, expected.dtype, key=lambda d: torch.finfo(d).eps)
            eps, tiny = torch.finfo(coarse).eps, torch.finfo(coarse).tiny
            if not torch.allclose(got.reshape(expected.shape).float(), expected.float(), rtol=eps, atol=tiny):
                raise ValueError(f"the template's {what} is not the base model's ({name} differs beyond {coarse} "
                                 "precision): give the base model's own single-file checkpoint")


def template_metadata(template: Path, source: str, steps: int, dtype: torch.dtype | None) -> dict[str, str]:
    """The template's safetensors metadata (its title, architecture, licence...), kept, with
    a note of what wadi changed under `wadi.changes`."""
    from safetensors import safe_open

    from wadi import __version__

    kept = {}
    if template.suffix == ".safetensors":
        with safe_open(str(template), "pt") as f:
            kept = dict(f.metadata() or {})
    changes = (f"{ORIGINAL_UNET_PREFIX}* is the UNet of a {steps}-step student distilled from this base with wadi "
               f"{__version__} ({source}), sampled with the scheduler beside this file; the VAE and text encoders "
               "are the base's; any model_ema.* removed")
    if dtype is not None:
        changes += f"; every tensor cast to {str(dtype).removeprefix('torch.')}"
    return {**kept, "wadi.changes": changes}


def student_checkpoint(template: dict[str, torch.Tensor], student: torch.nn.Module,
                       base: "Backbone") -> dict[str, torch.Tensor]:
    """The template with its UNet replaced by the student's; the template must be the base
    model `base` (see check_template)."""
    mapping = unet_key_map(template, student.config)
    state = student.state_dict()
    missing = [k for k in state if k not in mapping]
    if missing or len(mapping) != len(state):
        raise ValueError(f"the template's UNet does not match the student's ({len(missing)} of its tensors have no "
                         f"original key, first {missing[0] if missing else None!r}); give the base model's own "
                         "single-file checkpoint")
    check_template(template, base)
    out = {k: v for k, v in template.items() if not k.startswith("model_ema.")}  # a stale EMA would mislead
    for name, tensor in state.items():
        original = mapping[name]
        out[original] = tensor.detach().reshape(template[original].shape).to(template[original].dtype).contiguous()
    return out
