"""Where a model to sample from comes from, and loading it.

A student can be
- a run folder (runs/NNNNN-name/): its merged `student/`, else its `student.safetensors`
  adapter on the run's base model;
- an exported folder (`wadi export`): a complete pipeline whose denoiser is the student;
- a wadi adapter file (`student.safetensors`, a checkpoint's, or an adapter-only export)
  on a base model;
- a released merged state dict (the authors' `rotated_unet-*.safetensors` /
  `rotated_transformer.safetensors`): every tensor of a stock UNet / PixArt transformer,
  loaded strict into the base model's architecture;
- a diffusers model folder (config.json and weights, e.g. `wadi analyze --hybrids`'
  swap models) of the base model's denoiser class, on a base model.
The teacher is the base model itself: a diffusers folder or hub id, or the base that a
run folder or an export names.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from .adapters import FORMAT as ADAPTER_FORMAT
from .adapters import load_adapter
from .backbones import Backbone, load_backbone

EXPORT_MARKER = "wadi.json"  # written into every exported folder
EXPORT_FORMAT = "wadi-export/1"
PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "PixArtAlphaPipeline": "pixart"}


@dataclass
class Loaded:
    """A backbone and the denoiser to sample with.

    `base` names the teacher's model (None when unknown); `teacher_in_backbone` says
    whether `backbone.net` is that teacher (True when the backbone was loaded from it).
    """

    backbone: Backbone
    net: nn.Module
    kind: str
    source: str
    base: str | None
    teacher_in_backbone: bool

    def to(self, device, dtype=None) -> "Loaded":
        self.backbone.to(device, dtype)
        self.net.to(device)
        if dtype is not None and next(self.net.parameters()).dtype != dtype:
            self.net.to(dtype)
        return self


@dataclass
class BaseOptions:
    """How to load a base model; None fields are filled from the source when it knows them."""

    base: str | None = None
    kind: str | None = None
    text_encoder: str | None = None
    resolution: int | None = None
    max_length: int | None = None

    def filled(self, **known) -> "BaseOptions":
        """A copy whose unset fields take the values `known` gives."""
        out = copy.copy(self)
        for k, v in known.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        return out

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        if not self.base:
            raise ValueError("no base model: pass --base FOLDER_OR_HUB_ID (the teacher the student was distilled from)")
        kind = self.kind or infer_kind(self.base)
        return load_backbone(kind, self.base, text_encoder=self.text_encoder, resolution=self.resolution,
                             max_length=self.max_length, dtype=dtype)


def infer_kind(path: str) -> str:
    """Backbone kind of a diffusers folder: transformer/ is PixArt, unet/ with vae/ is SD,
    unet/ alone is the pixel kind. Hub ids: PixArt when the name says so, else SD."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return "pixart" if "pixart" in path.lower() else "sd"
    if (p / "transformer").is_dir():
        return "pixart"
    if (p / "unet").is_dir():
        return "sd" if (p / "vae").is_dir() else "pixel"
    raise ValueError(f"{path}: not a diffusers pipeline folder (no unet/ or transformer/)")


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def is_export_folder(path: Path) -> bool:
    return path.is_dir() and (path / EXPORT_MARKER).is_file()


def is_adapter_file(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("format") == ADAPTER_FORMAT


def run_options(run: Path) -> BaseOptions:
    """The base model settings a run was trained with (its config.yaml)."""
    from .config import resolve

    m = resolve(str(run / "config.yaml")).model
    return BaseOptions(m.path or None, m.kind, m.text_encoder, m.resolution, m.max_length)


def export_info(folder: Path) -> dict:
    info = json.loads((folder / EXPORT_MARKER).read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder / EXPORT_MARKER}: unknown export format {info.get('format')!r}")
    return info


def load_student(source: str | Path, options: BaseOptions | None = None,
                 dtype: torch.dtype = torch.float32) -> Loaded:
    """The one-step student that `source` holds (see the module doc for what it can be)."""
    options = options or BaseOptions()
    path = Path(source).expanduser()
    if is_run_folder(path):
        opts = options.filled(**vars(run_options(path)))
        backbone = opts.load(dtype)
        if (path / "student" / "config.json").is_file():
            net = type(backbone.net).from_pretrained(path / "student", torch_dtype=dtype).eval()
        elif (path / "student.safetensors").is_file():
            net = adapter_student(backbone, path / "student.safetensors")
        else:
            raise FileNotFoundError(f"run {path} has no student yet (no student/ or student.safetensors); "
                                    "pass a checkpoint's student.safetensors with --base to sample from it")
        return Loaded(backbone, net.requires_grad_(False), backbone.kind, str(path), opts.base, True)
    if is_export_folder(path):
        info = export_info(path)
        opts = options.filled(resolution=info.get("resolution"))
        backbone = load_backbone(info["kind"], str(path), resolution=opts.resolution,
                                 max_length=opts.max_length or info.get("max_length"), dtype=dtype)
        return Loaded(backbone, backbone.net, backbone.kind, str(path), options.base or info.get("base"), False)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors files are read (pickle checkpoints are not loaded)")
        backbone = options.load(dtype)
        net = adapter_student(backbone, path) if is_adapter_file(path) else released_student(backbone, path)
        return Loaded(backbone, net.requires_grad_(False), backbone.kind, str(path), options.base, True)
    if (path / "config.json").is_file():
        backbone = options.load(dtype)
        net = model_folder_student(backbone, path)
        return Loaded(backbone, net.requires_grad_(False), backbone.kind, str(path), options.base, True)
    if path.is_dir():
        raise ValueError(f"{path}: not a run folder (config.yaml), an exported folder ({EXPORT_MARKER}), "
                         "a diffusers model folder (config.json) or a .safetensors file")
    raise FileNotFoundError(f"student {source!r} does not exist")


def load_teacher(source: str | Path | None, options: BaseOptions | None = None,
                 dtype: torch.dtype = torch.float32) -> Loaded:
    """The multi-step teacher: `source` is its base model, or a run folder / export naming it."""
    options = options or BaseOptions()
    path = Path(source).expanduser() if source else None
    if path is not None and is_run_folder(path):
        options = options.filled(**vars(run_options(path)))
    elif path is not None and is_export_folder(path):
        info = export_info(path)
        options = options.filled(base=info.get("base"), kind=info["kind"], resolution=info.get("resolution"))
    elif source:
        options = options.filled(base=str(source))
    backbone = options.load(dtype)
    return Loaded(backbone, backbone.net, backbone.kind, str(options.base), options.base, True)


def teacher_for(student: Loaded, options: BaseOptions | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """The teacher of a loaded student, sharing its backbone when that was loaded from the base."""
    if student.teacher_in_backbone:
        return Loaded(student.backbone, student.backbone.net, student.kind, str(student.base), student.base, True)
    opts = (options or BaseOptions()).filled(base=student.base, kind=student.kind)
    if not opts.base:
        raise ValueError(f"{student.source} does not name its base model; pass --base for the teacher")
    return load_teacher(None, opts, dtype)


def adapter_student(backbone: Backbone, path: Path) -> nn.Module:
    """The base net with the adapter file at `path` loaded and merged: a plain model."""
    net = copy.deepcopy(backbone.net)
    return load_adapter(net, path).merged_model().eval()


def model_folder_student(backbone: Backbone, folder: Path) -> nn.Module:
    """A diffusers model folder of the base net's class, checked key by key like a released file."""
    cls = json.loads((folder / "config.json").read_text()).get("_class_name")
    if cls != type(backbone.net).__name__:
        raise ValueError(f"{folder} holds a {cls}, the base model's denoiser is a {type(backbone.net).__name__}; "
                         "is --base the model it came from?")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no diffusion_pytorch_model.safetensors (sharded and pickle "
                                "weights are not read)")
    return released_student(backbone, weights)


def released_student(backbone: Backbone, path: Path) -> nn.Module:
    """A merged state dict (every tensor of the denoiser) in the base net's architecture."""
    state = load_file(str(path))
    net = copy.deepcopy(backbone.net)
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"{path} does not fit the base {type(net).__name__} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys; first {first}); is --base/--kind the model it "
                         "was distilled from?")
    for k, v in state.items():
        if v.shape != ours[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the base model's is {tuple(ours[k].shape)}; "
                             "is --base the model it was distilled from?")
    net.load_state_dict(state, strict=True)
    return net.eval()
