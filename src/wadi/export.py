"""Export: the merged student as a complete diffusers pipeline folder, its adapter alone, or
its weight change as a LoRA (diffusers' or kohya's layout); every export carries a model card.

The folder is what `StableDiffusionPipeline.save_pretrained` (or PixArt-alpha's) writes,
with the student as its UNet / transformer and the scheduler of its noise process
(`Backbone.student_scheduler`) under which the stock pipeline, called with
`num_inference_steps` = the student's steps and no guidance, does exactly the student's
sampling; its arithmetic is
our sampler's, so images agree to the last bit in float32.

Every export carries `wadi.json` (its format: wadi.manifest). Kinds without a stock
pipeline get the same components without a model_index.json, loadable by `wadi sample`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .backbones import BackboneSpec
from .config import run_config
from .files import atomic_path, check_new_file, check_out
from .manifest import write_manifest
from .model_card import adapter_usage, lora_usage, one_liner, pipeline_usage, single_file_usage, write_card
from .run_folder import RunFolder

if TYPE_CHECKING:
    from .students import Loaded

FORMATS = ("pipeline", "adapter", "lora", "lora-kohya", "single-file")
SINGLE_FILE = "student.safetensors"




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
        steps = bb.student_steps
        write_manifest(tmp, base, loaded.source, one_liner(bb.kind, out.resolve(), steps))
        write_card(tmp, "a complete diffusers pipeline folder", base, loaded.source,
                   pipeline_usage(bb.kind, out.resolve(), steps))
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
        note = (f"In A1111 or ComfyUI: the base model `{base.path}` with {path.name} at weight 1, "
                f"{bb.student_steps} sampling step(s), CFG scale 1, a DDIM sampler whose first step starts at the "
                "last timestep (trailing spacing). In diffusers" if kohya else "")
        layout = "kohya's layout (A1111, ComfyUI)" if kohya else "diffusers' layout"
        fmt = (f"a LoRA of rank {report.rank} in {layout} (the student's weight change, {report.layers} layers; "
               f"energy kept: median {report.to_dict()['energy_median']:.4f})")
        usage = lora_usage(bb.kind, base.path, out.resolve(), path.name, type(bb.student_scheduler()).__name__,
                           bb.student_steps)
        write_card(tmp, fmt, base, student.source, usage, note)
    return out / path.name, report.to_dict()


def single_file_paths(out: str | Path, force: bool = False) -> tuple[Path, Path, Path]:
    """(checkpoint, scheduler folder, card) of a single-file export, checked for writing:
    inside the folder `out`, or, for `out` = NAME.safetensors, that file with NAME.scheduler/
    and NAME.md beside it (a checkpoint file is what A1111 and ComfyUI users keep)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        check_out(out, force)
        return out / SINGLE_FILE, out / "scheduler", out / "README.md"
    file, scheduler, card = out, out.with_suffix(".scheduler"), out.with_suffix(".md")
    _remove_killed_export(file, scheduler, card)
    check_new_file(file, force)
    check_new_file(card, force)
    check_out(scheduler, force)
    return file, scheduler, card


def _remove_killed_export(file: Path, scheduler: Path, card: Path) -> None:
    """What an export to the checkpoint `file` killed before the checkpoint appeared left:
    its card (written first, naming `file`) and scheduler. Nothing else is taken for one."""
    if file.exists() or not card.is_file():
        return
    try:
        ours = str(file.resolve()) in card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    if ours:
        card.unlink()
        shutil.rmtree(scheduler, ignore_errors=True)


def export_single_file(student: "Loaded", teacher: "Loaded", template: str | Path, out: str | Path,
                       force: bool = False) -> Path:
    """The student as one checkpoint in the original layout, built on the base model's own
    single file `template` (its VAE and text encoder kept), with the one-step scheduler
    and a card beside it (see single_file_paths); returns the checkpoint."""
    from safetensors.torch import save_file

    from .single_file import student_checkpoint
    from .weights import read_file

    file, scheduler, card = single_file_paths(out, force)
    bb = student.backbone
    if bb.kind.name not in ("sd", "sdxl"):
        raise ValueError(f"single-file checkpoints are Stable Diffusion's layout; the {bb.kind.name} kind has none")
    state = student_checkpoint(read_file(Path(template)), student.net, teacher.net)
    usage = single_file_usage(bb.kind, teacher.backbone.spec.path, file.resolve(), scheduler.resolve(),
                              bb.student_steps)

    def write(file_to: Path, scheduler_to: Path, card_to: Path) -> None:
        save_file(state, str(file_to))
        bb.student_scheduler().save_pretrained(scheduler_to)
        write_card(card_to.parent, "one checkpoint in the original Stable Diffusion layout (A1111, ComfyUI, "
                   "from_single_file)", teacher.backbone.spec, student.source, usage, name=card_to.name)

    if file == Path(out):
        # Three paths cannot appear at once: the card, then the scheduler, then the checkpoint
        # (the last block to close renames first), so a checkpoint is never without its
        # scheduler and card, and what a killed export leaves the next one removes.
        with atomic_path(file) as f, atomic_path(scheduler) as s, atomic_path(card) as c:
            write(f, s, c)
    else:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            write(tmp / file.name, tmp / scheduler.name, tmp / card.name)
    return file


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
        base = run_config(folder).model
        write_card(tmp, "wadi adapter files (LoRaD angles or peft tensors, with their base's fingerprint)", base,
                   str(folder.path), adapter_usage(out.resolve() / folder.student_adapter.name, base.path))
    return [out / f.name for f in files]

