"""Export: the merged student as a complete diffusers pipeline folder, its adapter alone, or
its weight change as a LoRA (diffusers' or kohya's layout); every export carries a model card.

The folder is what `StableDiffusionPipeline.save_pretrained` (or PixArt-alpha's) writes,
with the student as its UNet / transformer and the scheduler of its noise process
(`Backbone.student_scheduler`) under which the stock pipeline, called with
`num_inference_steps` = the student's steps and no guidance, does exactly the student's
sampling; its arithmetic is
our sampler's, so images agree to the last bit in float32.

Every export carries `wadi.json` (this module owns its format): the base model's
BackboneSpec, where the student came from, and how to run it. Kinds without a stock
pipeline get the same components without a model_index.json, loadable by `wadi sample`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .backbones import BackboneSpec
from .errors import brief, describe
from .files import atomic_path, check_out, read_json_object
from .model_card import write_card
from .run_folder import RunFolder

if TYPE_CHECKING:
    from .students import Loaded

MANIFEST = "wadi.json"
FORMAT = "wadi-export/2"
FORMATS = ("pipeline", "adapter", "lora", "lora-kohya", "single-file")
SINGLE_FILE = "student.safetensors"


def is_export(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    """The manifest of an exported folder; `base` as a BackboneSpec."""
    info = read_json_object(folder / MANIFEST, "; export the student again")
    if info.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: unknown export format {brief(info.get('format'))}; "
                         "export the student again")
    from .config import recorded_spec

    try:
        return {**info, "base": recorded_spec(info.get("base"), "base")}
    except ValueError as e:
        raise ValueError(f"{folder / MANIFEST}: {describe(e)}; export the student again") from None


def build_pipeline(loaded: "Loaded"):
    """The stock diffusers pipeline of the student, built from its components in memory."""
    import diffusers

    bb = loaded.backbone
    if bb.kind.pipeline is None:
        raise ValueError(f"the {bb.kind.name} kind has no stock diffusers pipeline")
    components = {"vae": bb.vae, **bb.text, bb.kind.subfolder: loaded.net, "scheduler": bb.student_scheduler()}
    return getattr(diffusers, bb.kind.pipeline)(**components, **bb.kind.pipeline_extras)


def export_pipeline(loaded: "Loaded", out: str | Path, force: bool = False) -> Path:
    """Write the student as a complete pipeline folder with its card; returns it."""
    out = check_out(out, force)
    bb = loaded.backbone
    base = (loaded.base or BackboneSpec(kind=bb.kind.name)).filled(resolution=bb.resolution, max_length=bb.max_length)
    base.one_step_abar = bb.process.recorded_abar()  # the value the exported scheduler encodes (VP)
    with atomic_path(out) as tmp:
        if bb.kind.pipeline is None:
            loaded.net.save_pretrained(tmp / bb.kind.subfolder)
            for name, component in bb.text.items():
                component.save_pretrained(tmp / name)
            bb.student_scheduler().save_pretrained(tmp / "scheduler")
        else:
            build_pipeline(loaded).save_pretrained(tmp, safe_serialization=True)
        info = {"format": FORMAT, "base": base.to_dict(), "source": loaded.source, "usage": bb.kind.usage(bb.student_steps)}
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
        write_card(tmp, "a complete diffusers pipeline folder", base, loaded.source, bb.kind.usage(bb.student_steps))
    return out  # with --force the new folder replaced the old one whole


def export_lora(student: "Loaded", teacher: "Loaded", out: str | Path, rank: int, kohya: bool = False,
                force: bool = False) -> tuple[Path, dict]:
    """The student's change of the teacher's linear layers as a LoRA of `rank` (with the
    one-step scheduler beside it and a card); returns the file and what the rank keeps."""
    import diffusers

    from .lora_export import delta_lora, save_lora

    out = check_out(out, force)
    bb = student.backbone
    pipeline = getattr(diffusers, bb.kind.pipeline or "", None)
    if pipeline is None or not hasattr(pipeline, "save_lora_weights"):
        raise ValueError(f"the {bb.kind.name} kind's pipeline does not load LoRA files; export a pipeline instead")
    tensors, report = delta_lora(student.net, teacher.net, rank)
    base = teacher.backbone.spec
    with atomic_path(out) as tmp:
        tmp.mkdir()
        path = save_lora(tensors, tmp, pipeline, bb.kind.subfolder, kohya)
        bb.student_scheduler().save_pretrained(tmp / "scheduler")
        (tmp / "lora_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        usage = ("the LoRA in A1111 / ComfyUI on the base model, 1 sampling step from the last timestep, "
                 "no guidance (CFG 1)" if kohya else
                 f"pipe = {bb.kind.pipeline}.from_pretrained(BASE)\n"
                 f"pipe.load_lora_weights(FOLDER)\n"
                 f"pipe.scheduler = {type(bb.student_scheduler()).__name__}.from_pretrained(FOLDER, subfolder=\"scheduler\")\n"
                 f"image = pipe(prompt, num_inference_steps={bb.student_steps}, guidance_scale=0).images[0]")
        fmt = (f"a LoRA of rank {rank} in {'kohya' if kohya else 'diffusers'}' layout (the student's weight change, "
               f"{report.layers} layers; energy kept: median {report.to_dict()['energy_median']:.4f})")
        write_card(tmp, fmt, base, student.source, usage)
    return out / path.name, report.to_dict()


def export_single_file(student: "Loaded", teacher: "Loaded", template: str | Path, out: str | Path,
                       force: bool = False) -> Path:
    """The student as one checkpoint in the original layout, built on the base model's own
    single file `template` (its VAE and text encoder kept), with the one-step scheduler
    beside it and a card."""
    from safetensors.torch import save_file

    from .single_file import student_checkpoint
    from .weights import read_file

    out = check_out(out, force)
    bb = student.backbone
    if bb.kind.name not in ("sd", "sdxl"):
        raise ValueError(f"single-file checkpoints are Stable Diffusion's layout; the {bb.kind.name} kind has none")
    state = student_checkpoint(read_file(Path(template)), student.net, teacher.net)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / SINGLE_FILE))
        bb.student_scheduler().save_pretrained(tmp / "scheduler")
        usage = (f"pipe = {bb.kind.pipeline}.from_single_file(\"FOLDER/{SINGLE_FILE}\")\n"
                 "pipe.scheduler = DDIMScheduler.from_pretrained(FOLDER, subfolder=\"scheduler\")\n"
                 f"image = pipe(prompt, num_inference_steps={bb.student_steps}, guidance_scale=0).images[0]")
        write_card(tmp, "one checkpoint in the original Stable Diffusion layout (A1111, ComfyUI, from_single_file)",
                   teacher.backbone.spec, student.source, usage)
    return out / SINGLE_FILE


def export_adapter(run: str | Path, out: str | Path, force: bool = False, fake: bool = False) -> list[Path]:
    """Copy a run's adapter files (student, and with `fake` the fake score model) into `out`.

    They load with `wadi sample OUT/student.safetensors --base BASE` or `wadi.load_adapter`.
    """
    if not RunFolder.is_run(run):
        raise ValueError(f"{run}: --format adapter needs a run folder (config.yaml and student.safetensors)")
    folder = RunFolder(run)
    files = [folder.student_adapter] + ([folder.fake_adapter] if fake else [])
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"run {run} has no {missing[0].name} (the run has not finished)")
    out = check_out(out, force)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for f in files:
            shutil.copy2(f, tmp / f.name)
        base = _run_base(folder)
        write_card(tmp, "wadi adapter files (LoRaD angles or peft tensors, with their base's fingerprint)", base,
                   str(folder.path), f"wadi sample {out}/student.safetensors --base {base.path} --prompt ...")
    return [out / f.name for f in files]


def _run_base(run: RunFolder) -> BackboneSpec:
    from .config import resolve

    return resolve(str(run.config)).model

