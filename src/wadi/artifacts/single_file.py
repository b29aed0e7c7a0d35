"""The student as one checkpoint in the original Stable Diffusion layout (what A1111, ComfyUI
and `StableDiffusionPipeline.from_single_file` load), through diffusers' own conversion.

diffusers converts from that layout only. So the base model's own single file serves as
the template: every UNet tensor of it is replaced by its index, diffusers'
`convert_ldm_unet_checkpoint` renames them, and the indices that come out under each
diffusers name say which original key that name came from. The student's tensors then go
under those keys; the VAE and text encoder stay the template's. No key map is written here.
"""

from __future__ import annotations

import torch

from wadi.errors import describe

ORIGINAL_UNET_PREFIX = "model.diffusion_model."


def unet_key_map(template: dict[str, torch.Tensor], unet_config: dict) -> dict[str, str]:
    """{diffusers UNet key: original key} for the UNet of `template`, by diffusers' conversion."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = [k for k in template if k.startswith(ORIGINAL_UNET_PREFIX)]
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


def student_checkpoint(template: dict[str, torch.Tensor], student: torch.nn.Module,
                       teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The template with its UNet replaced by the student's; the template must hold the
    teacher's UNet (checked on the tensors the student did not change)."""
    mapping = unet_key_map(template, student.config)
    state, base = student.state_dict(), teacher.state_dict()
    missing = [k for k in state if k not in mapping]
    if missing or len(mapping) != len(state):
        raise ValueError(f"the template's UNet does not match the student's ({len(missing)} of its tensors have no "
                         f"original key, first {missing[0] if missing else None!r}); give the base model's own "
                         "single-file checkpoint")
    out = {k: v for k, v in template.items() if not k.startswith("model_ema.")}  # a stale EMA would mislead
    for name, tensor in state.items():
        original = mapping[name]
        if torch.equal(tensor, base[name]) and not torch.allclose(
                template[original].reshape(tensor.shape).to(tensor.dtype), tensor, rtol=2e-2, atol=1e-4):
            raise ValueError(f"the template's {original} is not the base model's {name}: give the base model's "
                             "own single-file checkpoint")
        out[original] = tensor.detach().reshape(template[original].shape).to(template[original].dtype).contiguous()
    return out
