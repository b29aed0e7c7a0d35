"""Export: the merged student as a complete diffusers pipeline folder, its adapter alone, or
its weight change as a LoRA (diffusers' or kohya's layout); every export carries a model card.

The folder is what `StableDiffusionPipeline.save_pretrained` (or PixArt-alpha's) writes,
with the student as its UNet / transformer and the scheduler of its noise process
(`Backbone.student_scheduler`) under which the stock pipeline, called with
`num_inference_steps` = the student's steps and no guidance, does exactly the student's
sampling; its arithmetic is
our sampler's, so images agree to the last bit in float32.

Every export carries `wadi.json` (its format: wadi.artifacts.manifest). Kinds without a stock
pipeline get the same components without a model_index.json, loadable by `wadi sample`.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from wadi.artifacts.manifest import MANIFEST, write_manifest
from wadi.artifacts.model_card import (adapter_usage, lora_usage, one_liner, pipeline_usage, single_file_usage,
                                       ui_settings, write_card)
from wadi.engine.config import run_config
from wadi.files.atomic import atomic_path, check_new_file, check_out, write_into
from wadi.files.run_folder import RunFolder
from wadi.models.backbones import BackboneSpec
from wadi.models.registry import EXPORTS, Kind

if TYPE_CHECKING:
    import torch

    from wadi.artifacts.students import Loaded

FORMATS = EXPORTS
SINGLE_FILE = "student.safetensors"


def check_format(kind: Kind, fmt: str) -> None:
    """Refuse, in one line, an export the kind's ecosystem does not read, with the reason
    where it is not obvious: a single file diffusers can read but not write."""
    import diffusers

    if kind.supports(fmt):
        return
    why = ""
    readers = (getattr(diffusers, kind.pipeline or "", None), getattr(diffusers, kind.denoiser, None))
    if fmt == "single-file" and any(hasattr(r, "from_single_file") for r in readers):
        why = (" (its original single file fuses tensors that diffusers keeps apart, and diffusers converts that "
               "layout only into its own, not back)")
    raise ValueError(f"the {kind.name} kind has no {fmt} export{why}; it has {', '.join(kind.exports)}")


def build_pipeline(loaded: "Loaded"):
    """The stock diffusers pipeline of the student, built from its components in memory.
    Where the pipeline takes no text length, the long tokenizer is saved with the student's
    (so a student distilled at another length samples as it was trained)."""
    import diffusers

    bb = loaded.backbone
    if bb.kind.pipeline is None:
        raise ValueError(f"the {bb.kind.name} kind has no stock diffusers pipeline")
    text = dict(bb.text)
    long_tokenizer = bb.kind.long_encoder.replace("text_encoder", "tokenizer")
    if "max_sequence_length" not in bb.pipeline_call() and text[long_tokenizer].model_max_length != bb.max_length:
        text[long_tokenizer] = copy.deepcopy(text[long_tokenizer])
        text[long_tokenizer].model_max_length = bb.max_length
    components = {"vae": bb.vae, **text, bb.kind.subfolder: loaded.net, "scheduler": bb.student_scheduler()}
    return getattr(diffusers, bb.kind.pipeline)(**components, **bb.kind.pipeline_extras)


def export_pipeline(loaded: "Loaded", out: str | Path, force: bool = False) -> Path:
    """Write the student as a complete pipeline folder with its card; returns it."""
    out = check_out(out, force, inputs=[loaded.source])
    bb = loaded.backbone
    check_format(bb.kind, "pipeline")
    base = (loaded.base or BackboneSpec(kind=bb.kind.name)).filled(
        resolution=bb.resolution, max_length=bb.max_length, student_steps=bb.student_steps)
    base.one_step_abar = bb.process.recorded_abar()  # the value the exported scheduler encodes (VP)
    with write_into(out, last=MANIFEST) as tmp:
        if bb.kind.pipeline is None:
            loaded.net.save_pretrained(tmp / bb.kind.subfolder)
            for name, component in bb.text.items():
                component.save_pretrained(tmp / name)
            bb.student_scheduler().save_pretrained(tmp / "scheduler")
        else:
            build_pipeline(loaded).save_pretrained(tmp, safe_serialization=True)
        call = bb.pipeline_call() if bb.kind.pipeline else None
        write_manifest(tmp, base, loaded.source, one_liner(bb.kind, out.resolve(), call), loaded.process,
                       bb.kind.pipeline, call)
        write_card(tmp, "a complete diffusers pipeline folder", base, loaded.source,
                   pipeline_usage(bb.kind, out.resolve(), call), bb.student_steps)
    return out


def export_lora(student: "Loaded", teacher: "Loaded", out: str | Path, rank: int, kohya: bool = False,
                force: bool = False, dtype: torch.dtype | None = None) -> tuple[Path, dict]:
    """The student's change of the teacher's linear layers as a LoRA of `rank` (with the
    one-step scheduler beside it and a card), its tensors in `dtype` (default float32);
    returns the file and what the rank keeps."""
    import diffusers
    import torch

    from wadi.artifacts.lora_export import delta_lora, save_lora

    out = check_out(out, force, inputs=[student.source])
    bb = student.backbone
    check_format(bb.kind, "lora-kohya" if kohya else "lora")
    pipeline = getattr(diffusers, bb.kind.pipeline)
    tensors, report = delta_lora(student.net, teacher.net, rank)
    tensors = {k: v.to(dtype or torch.float32) for k, v in tensors.items()}
    base = teacher.backbone.spec
    with write_into(out) as tmp:
        path = save_lora(tensors, tmp, pipeline, bb.kind.subfolder, kohya)
        bb.student_scheduler().save_pretrained(tmp / "scheduler")
        (tmp / "lora_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        note = (ui_settings(bb, f"the base model `{base.path}` with {path.name} at weight 1") if kohya else
                f"{bb.kind.lora_note}. In diffusers" if bb.kind.lora_note else "")
        layout = "kohya's layout (A1111, ComfyUI)" if kohya else "diffusers' layout"
        fmt = (f"a LoRA of rank {report.rank} in {layout} (the student's weight change, {report.layers} layers; "
               f"energy kept: median {report.to_dict()['energy_median']:.4f})")
        usage = lora_usage(bb.kind, base.path, out.resolve(), path.name, type(bb.student_scheduler()).__name__,
                           bb.pipeline_call())
        write_card(tmp, fmt, base, student.source, usage, bb.student_steps, note)
    return out / path.name, report.to_dict()


def single_file_paths(out: str | Path, force: bool = False, inputs=()) -> tuple[Path, Path, Path]:
    """(checkpoint, scheduler folder, card) of a single-file export, checked for writing:
    inside the folder `out`, or, for `out` = NAME.safetensors, that file with NAME.scheduler/
    and NAME.md beside it (a checkpoint file is what A1111 and ComfyUI users keep)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        check_out(out, force, inputs=inputs)
        return out / SINGLE_FILE, out / "scheduler", out / "README.md"
    file, scheduler, card = out, out.with_suffix(".scheduler"), out.with_suffix(".md")
    _remove_killed_export(file, scheduler, card)
    check_new_file(file, force, inputs=inputs)
    check_new_file(card, force, inputs=inputs)
    check_out(scheduler, force, inputs=inputs)
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
                       force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """The student as one checkpoint in the original layout, built on the base model's own
    single file `template` (its VAE and text encoders kept, and its metadata with a note of
    what changed), with the student's scheduler and a card beside it (see single_file_paths);
    its tensors in `dtype` (default: the template's). Returns the checkpoint."""
    from safetensors.torch import save_file

    from wadi.artifacts.single_file import student_checkpoint, template_metadata
    from wadi.files.weights import read_file

    file, scheduler, card = single_file_paths(out, force, [student.source, template])
    bb = student.backbone
    check_format(bb.kind, "single-file")
    state = student_checkpoint(read_file(Path(template)), student.net, teacher.backbone)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    metadata = template_metadata(Path(template), student.source, bb.student_steps, dtype)
    usage = single_file_usage(bb.kind, teacher.backbone.spec.path, file.resolve(), scheduler.resolve(),
                              type(bb.student_scheduler()).__name__, bb.pipeline_call())

    def write(file_to: Path, scheduler_to: Path, card_to: Path) -> None:
        save_file(state, str(file_to), metadata=metadata)
        bb.student_scheduler().save_pretrained(scheduler_to)
        write_card(card_to.parent, "one checkpoint in the original Stable Diffusion layout (A1111, ComfyUI, "
                   "from_single_file)", teacher.backbone.spec, student.source, usage, bb.student_steps,
                   ui_settings(bb, f"{file.name} as the checkpoint"), name=card_to.name)

    if file == Path(out):
        # Three paths cannot appear at once: the card, then the scheduler, then the checkpoint
        # (the last block to close renames first), so a checkpoint is never without its
        # scheduler and card, and what a killed export leaves the next one removes.
        with atomic_path(file) as f, atomic_path(scheduler) as s, atomic_path(card) as c:
            write(f, s, c)
    else:
        with write_into(out) as tmp:
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
    out = check_out(out, force, inputs=[run])
    with write_into(out) as tmp:
        for f in files:
            shutil.copy2(f, tmp / f.name)
        base = run_config(folder).model
        write_card(tmp, "wadi adapter files (LoRaD angles or peft tensors, with their base's fingerprint)", base,
                   str(folder.path), adapter_usage(out.resolve() / folder.student_adapter.name, base.path),
                   base.student_steps or 1)
    return [out / f.name for f in files]

