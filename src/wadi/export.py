"""Export: the merged student as a complete diffusers pipeline folder, or its adapter alone.

The folder is what `StableDiffusionPipeline.save_pretrained` (or PixArt-alpha's) writes,
with the student as its UNet / transformer and a scheduler under which the stock
pipeline, called with `num_inference_steps=1` and no guidance, does exactly WaDi's one
step: DDIM with "trailing" spacing puts its only timestep at T-1 = 999, and with
`set_alpha_to_one` the step to the final alpha (1) returns
x0 = (x - sqrt(1 - abar_999) eps) / sqrt(abar_999) and adds nothing (eta = 0). Its
arithmetic is our sampler's, so images agree to the last bit in float32.

The pixel kind has no stock pipeline: its folder holds the same components without a
model_index.json, loadable by `wadi sample` and `load_backbone("pixel", folder)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .models import EXPORT_FORMAT, EXPORT_MARKER, Loaded, is_run_folder

USAGE = {
    "sd": "StableDiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=1, guidance_scale=0)",
    "pixart": ("PixArtAlphaPipeline.from_pretrained(folder)(prompt, num_inference_steps=1, guidance_scale=0, "
               "clean_caption=False)"),
    "pixel": "wadi sample folder --prompt ...",
}


def one_step_scheduler(scheduler_config: dict):
    """The stock scheduler that makes one pipeline step the one-step student's sampling."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, thresholding=False, steps_offset=1)


def build_pipeline(loaded: Loaded):
    """The stock diffusers pipeline of the student, built from its components in memory."""
    bb = loaded.backbone
    scheduler = one_step_scheduler(bb.scheduler_config)
    if loaded.kind == "sd":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                                       unet=loaded.net, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if loaded.kind == "pixart":
        from diffusers import PixArtAlphaPipeline

        return PixArtAlphaPipeline(tokenizer=bb.tokenizer, text_encoder=bb.text_encoder, vae=bb.vae,
                                   transformer=loaded.net, scheduler=scheduler)
    raise ValueError(f"the {loaded.kind} kind has no stock diffusers pipeline")


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to write into it")


def export_pipeline(loaded: Loaded, out: str | Path, force: bool = False) -> Path:
    """Write the student as a complete pipeline folder; returns it."""
    out = Path(out)
    check_out(out, force)
    bb = loaded.backbone
    if loaded.kind == "pixel":
        loaded.net.save_pretrained(out / "unet")
        bb.text_encoder.save_pretrained(out / "text_encoder")
        bb.tokenizer.save_pretrained(out / "tokenizer")
        one_step_scheduler(bb.scheduler_config).save_pretrained(out / "scheduler")
    else:
        build_pipeline(loaded).save_pretrained(out, safe_serialization=True)
    resolution = bb.latent_size * (2 ** (len(bb.vae.config.block_out_channels) - 1) if bb.vae is not None else 1)
    info = {"format": EXPORT_FORMAT, "kind": loaded.kind, "base": loaded.base, "source": loaded.source,
            "resolution": resolution, "max_length": bb.max_length, "usage": USAGE[loaded.kind]}
    (out / EXPORT_MARKER).write_text(json.dumps(info, indent=1) + "\n")
    return out


def export_adapter(run: str | Path, out: str | Path, force: bool = False, fake: bool = False) -> list[Path]:
    """Copy a run's adapter files (student, and with `fake` the fake score model) into `out`.

    They load with `wadi sample OUT/student.safetensors --base BASE` or `wadi.load_adapter`.
    """
    run, out = Path(run), Path(out)
    if not is_run_folder(run):
        raise ValueError(f"{run}: adapter-only export needs a run folder (config.yaml and student.safetensors)")
    names = ["student.safetensors"] + (["fake.safetensors"] if fake else [])
    missing = [n for n in names if not (run / n).is_file()]
    if missing:
        raise FileNotFoundError(f"run {run} has no {missing[0]} (the run has not finished)")
    check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(run / n, out / n)) for n in names]
