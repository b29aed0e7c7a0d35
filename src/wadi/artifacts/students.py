"""Where a model to sample from comes from, and loading it.

A student can be
- a run folder (runs/NNNNN-name/): its final student on the run's base model;
- an exported folder (`wadi export`): a complete pipeline whose denoiser is the student;
- a wadi adapter file (`student.safetensors`, a checkpoint's, or `wadi export --format adapter`)
  on a base model;
- a released merged state dict (the authors' `rotated_unet-*.safetensors` /
  `rotated_transformer.safetensors`, DMD2's `.bin`): every tensor of the base model's
  denoiser, loaded strict into its architecture; also on the hub as `hub:OWNER/REPO/FILE`;
- a diffusers model folder (config.json and weights, e.g. `wadi analyze --hybrids`' swap
  models) of the base model's denoiser class, on a base model.
The teacher is the base model itself: a diffusers folder or hub id, or the base that a
run folder or an export names. Base models are described by a BackboneSpec. A student
records what it was distilled with (wadi.engine.provenance): its steps, resolution, text length,
generator and noise process are taken from there, an option that contradicts them is
refused, and so is a base model of another process; the base model's folder the user
gives wins over the one a run or export names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from wadi.adapters import file as adapter_file
from wadi.files import hub
from wadi.engine import provenance
from wadi.adapters.file import AdapterFile, is_adapter_file
from wadi.adapters.core import adapter_base_copy, load_adapter
from wadi.models.backbones import (DENOISER_SUBFOLDERS, Backbone, BackboneSpec, Kind, StudentStepsError, detect_kind, get_kind,
                        load_backbone, load_denoiser)
from wadi.engine.config import run_config
from wadi.errors import NeedsOption
from wadi.files.atomic import read_json_object
from wadi.artifacts.manifest import MANIFEST, is_export, read_manifest
from wadi.files.run_folder import RunFolder
from wadi.files.weights import TORCH_SUFFIXES, check_finite, check_fits, load_weights


@dataclass
class Loaded:
    """A backbone and the denoiser to sample with.

    `base` describes the teacher's model (None when unknown); `teacher_in_backbone` says
    whether `backbone.net` is that teacher (True when the backbone was loaded from it);
    `process` is the noise process the student was distilled under, as recorded
    (wadi.engine.provenance; None when unknown).
    """

    backbone: Backbone
    net: nn.Module
    source: str
    base: BackboneSpec | None
    teacher_in_backbone: bool
    process: dict | None = None

    @property
    def kind(self) -> str:
        return self.backbone.kind.name

    def to(self, device, dtype=None) -> "Loaded":
        self.backbone.to(device, dtype)
        self.net.to(device)
        if dtype is not None and next(self.net.parameters()).dtype != dtype:
            self.net.to(dtype)
        return self


def load_student(source: str | Path, spec: BackboneSpec | None = None, dtype: torch.dtype = torch.float32,
                 allow_bin: bool = False, allow_other_base: bool = False) -> Loaded:
    """The student that `source` holds (see the module doc for what it can be).
    `allow_bin` reads torch state dicts (without running code); `allow_other_base` loads an
    adapter file on a base whose weights differ from its own. Weights holding NaN or
    infinity are refused, whatever the source."""
    loaded = _load_student(source, spec or BackboneSpec(), dtype, allow_bin, allow_other_base)
    check_finite(loaded.net.named_parameters(), f"the student {source}")
    return loaded


def _load_student(source: str | Path, spec: BackboneSpec, dtype: torch.dtype, allow_bin: bool,
                  allow_other_base: bool) -> Loaded:
    path = Path(hub.resolve(source)).expanduser()
    if RunFolder.is_run(path):
        run = RunFolder(path)
        model = run_config(run).model
        if not run.student_adapter.is_file():
            raise FileNotFoundError(f"run {path} has no student yet (no student/ or student.safetensors); "
                                    "pass a checkpoint's student.safetensors with --base to sample from it")
        merged = (run.student_model / "config.json").is_file()
        # The merged model needs only the file's metadata; a full adapter's file is a whole denoiser.
        file = None if merged else adapter_file.read(run.student_adapter)
        meta = adapter_file.read_metadata(run.student_adapter) if merged else file.meta
        record = provenance.adapter_record(meta, run.student_adapter)
        recorded = model if record is None else record.spec.filled(**model.to_dict())
        base = provenance.settle(spec, recorded, path).filled(**model.to_dict())
        backbone = load_backbone(base, dtype, allow_bin)
        process = _checked_process(backbone, record, path)
        if merged:
            read_json_object(run.student_model / "config.json")  # diffusers takes a damaged one for a hub id
            net = load_denoiser(backbone.net, run.student_model, dtype)
        else:
            net = adapter_student(backbone, file, allow_other_base)
        return Loaded(backbone, net.eval().requires_grad_(False), str(path), base, True, process)
    if is_export(path):
        info = read_manifest(path)
        mine = provenance.settle(spec, info["base"], path).filled(**info["base"].to_dict())
        # The export's own folder as the model, with every setting of how it was made and samples.
        try:
            backbone = load_backbone(replace(mine, path=str(path), text_encoder=None), dtype, allow_bin)
        except StudentStepsError as e:
            raise ValueError(f"{path / MANIFEST}: {e}; export the student again") from None
        return Loaded(backbone, backbone.net, str(path), mine if mine.path else None, False,
                      provenance.checked_process(info.get("process"), str(path)))
    lora = lora_export_file(path)
    if lora is not None:
        raise ValueError(f"{lora} is a LoRA export, which wadi does not sample: load the base model in diffusers, "
                         f"then pipe.load_lora_weights({str(lora.parent)!r}, weight_name={lora.name!r}), the scheduler "
                         f"in {lora.parent / 'scheduler'}, 1 step, guidance 0 (the snippet in "
                         f"{lora.parent / 'README.md'}); or sample the run it came from")
    if path.is_file():
        if path.suffix in TORCH_SUFFIXES and not allow_bin:
            raise NeedsOption(f"{path} is a torch state dict: pass {{option}} to read it (as plain tensors only, "
                              "no code runs)", "allow_bin")
        if is_adapter_file(path):
            file = adapter_file.read(path)
            record = provenance.adapter_record(file.meta, path)
            backbone = _recorded_base(spec, record, path, dtype, allow_bin)
            net = adapter_student(backbone, file, allow_other_base)
        else:
            state = load_weights(path).state_dict  # read (and refused) before minutes of loading the base
            record, backbone = None, spec.load(dtype, allow_bin)
            net = _in_base(backbone, state, path)
        return Loaded(backbone, net.requires_grad_(False), str(path), backbone.spec, True,
                      _checked_process(backbone, record, path))
    if (path / "config.json").is_file():
        cls, denoiser = read_json_object(path / "config.json").get("_class_name"), base_kind(spec).denoiser
        if cls != denoiser:
            raise ValueError(f"{path} holds a {cls}, the base model's denoiser is a {denoiser}; "
                             "is --base the model it came from?")
        state = load_weights(path, allow_torch=allow_bin, subfolders=DENOISER_SUBFOLDERS).state_dict
        record = provenance.folder_record(path)
        backbone = _recorded_base(spec, record, path, dtype, allow_bin)
        return Loaded(backbone, _in_base(backbone, state, path).requires_grad_(False), str(path), backbone.spec, True,
                      _checked_process(backbone, record, path))
    if path.is_dir():
        raise ValueError(f"{path}: not a run folder (config.yaml), an exported folder (wadi.json), "
                         "a diffusers model folder (config.json) or a weights file")
    raise FileNotFoundError(f"student {source!r} does not exist")


def _recorded_base(spec: BackboneSpec, record: provenance.Record | None, source: Path, dtype: torch.dtype,
                   allow_bin: bool) -> Backbone:
    """The base model `spec` names, with the settings the student records (wadi.engine.provenance)."""
    return (spec if record is None else provenance.settle(spec, record.spec, source)).load(dtype, allow_bin)


def _checked_process(backbone: Backbone, record: provenance.Record | None, source: Path) -> dict:
    """The student's process: the recorded one, which the base model must have; else the base's."""
    if record is not None:
        provenance.check_process(backbone, record.process, source)
    return provenance.process_settings(backbone.process)


def lora_export_file(path: Path) -> Path | None:
    """The LoRA file of a `wadi export --format lora / lora-kohya` folder, or that file itself."""
    from wadi.artifacts.lora_export import KOHYA_FILE, LORA_FILE

    if path.is_file():
        return path if path.name in (LORA_FILE, KOHYA_FILE) else None
    return next((path / name for name in (LORA_FILE, KOHYA_FILE) if (path / name).is_file()), None)


def base_kind(spec: BackboneSpec) -> Kind:
    """The kind of the base model a spec names, without loading it."""
    if not spec.path:
        raise ValueError("no base model: pass --base FOLDER_OR_HUB_ID (the teacher the student was distilled from)")
    return get_kind(spec.kind or detect_kind(spec.path))


def load_teacher(source: str | Path | None, spec: BackboneSpec | None = None,
                 dtype: torch.dtype = torch.float32, allow_bin: bool = False) -> Loaded:
    """The multi-step teacher: `source` is its base model, or a run folder / export naming it;
    `allow_bin` reads its .bin weights (as plain tensors)."""
    spec = spec or BackboneSpec()
    path = Path(source).expanduser() if source else None
    if path is not None and RunFolder.is_run(path):
        spec = spec.filled(**run_config(RunFolder(path)).model.to_dict())
    elif path is not None and is_export(path):
        spec = spec.filled(**read_manifest(path)["base"].to_dict())
    elif source:
        spec = spec.filled(path=str(source))
    backbone = spec.load(dtype, allow_bin)
    return Loaded(backbone, backbone.net, backbone.spec.path, backbone.spec, True)


def teacher_for(student: Loaded, spec: BackboneSpec | None = None, dtype: torch.dtype = torch.float32,
                allow_bin: bool = False) -> Loaded:
    """The teacher of a loaded student, sharing its backbone when that was loaded from the base."""
    if student.teacher_in_backbone:
        bb = student.backbone
        return Loaded(bb, bb.net, bb.spec.path, bb.spec, True)
    known = student.base.to_dict() if student.base else {}
    wanted = (spec or BackboneSpec()).filled(**known)
    if not wanted.path:
        raise ValueError(f"{student.source} does not name its base model; pass --base for the teacher")
    teacher = load_teacher(None, wanted, dtype, allow_bin)
    provenance.check_process(teacher.backbone, student.process, student.source)
    return teacher


def adapter_student(backbone: Backbone, path: Path | AdapterFile, allow_other_base: bool = False) -> nn.Module:
    """The base net with the adapter file at `path` (or that file, read) loaded and merged: a plain model."""
    file = path if isinstance(path, AdapterFile) else adapter_file.read(path)  # once: a full adapter is a whole denoiser
    adapter = load_adapter(adapter_base_copy(file, backbone.net), file, allow_other_base, backbone.kind.name)
    return adapter.merged_model().eval()


def _in_base(backbone: Backbone, state: dict, where: Path) -> nn.Module:
    """`state` (every tensor of a denoiser) in the base net's architecture and dtype."""
    from accelerate import init_empty_weights

    base = backbone.net
    check_fits(state, base.state_dict(), f"{where} does not fit the base {type(base).__name__}",
               hint="; is --base/--kind the model it was distilled from?")
    with init_empty_weights():  # no memory for weights the state replaces
        net = type(base).from_config(base.config)
    dtype = next(base.parameters()).dtype
    net.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return net.to(next(base.parameters()).device).eval()
