"""The adapter file format: safetensors holding only an adapter's tensors, with metadata
that says what it is (kind, rank, targets, the backbone kind) and what base it was
trained on (a fingerprint of the adapted layers' names and shapes, and a sample of their
weights), so that loading it on another base is refused before anything is attached.

A file is read once per load (`read`); everything that checks or loads it takes that.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wadi.adapters.config import AdapterConfig
from wadi.errors import CorruptFile, NeedsOption, describe
from wadi.files.weights import check_finite

FORMAT = "wadi-adapter/1"
SAMPLE_LAYERS, SAMPLE_PER_LAYER = 16, 4
SAMPLE_RTOL = 2e-2  # a base stored in bf16 is the same base; a fine-tune of it is not


def class_name(model: nn.Module) -> str:
    """The model's class; a sharded model's (FSDP2 makes a subclass per sharded class) too."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def fingerprint(model: nn.Module, names: list[str]) -> str:
    """A short hash of the model class and the names and shapes of the adapted layers."""
    h = hashlib.sha256(class_name(model).encode())
    for name in names:
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            h.update(f"{name}.{pname}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def content_sample(model: nn.Module, names: list[str]) -> list[float] | None:
    """A few base weights at fixed places of up to 16 adapted layers: enough to tell a base
    from another of the same shapes, cheap on any size (None on the meta device)."""
    picked = names[:: max(1, len(names) // SAMPLE_LAYERS)][:SAMPLE_LAYERS]
    values = []
    for name in picked:
        w = getattr(model.get_submodule(name), "weight", None)
        if w is None:
            continue
        if w.is_meta:
            return None
        flat = w.detach().reshape(-1)
        values += flat[torch.linspace(0, flat.numel() - 1, SAMPLE_PER_LAYER).long()].float().tolist()
    return values


@dataclass
class AdapterFile:
    """One adapter file as read: its metadata and tensors."""

    path: Path
    meta: dict[str, str]
    tensors: dict[str, torch.Tensor]

    @property
    def config(self) -> dict:
        """The adapter's settings (an AdapterConfig's fields)."""
        return json.loads(self.meta["config"])

    @property
    def backbone(self) -> str | None:
        """The backbone kind it was trained on; None in files written before it was recorded."""
        return self.meta.get("backbone") or None

    def check(self, kind: str, rank: int, ranked: bool, model: nn.Module, backbone: str | None = None,
              fp: str | None = None, sample: list[float] | None = None, allow_other_base: bool = False) -> None:
        """Raise if the adapter does not fit `model`: class, backbone kind, adapter kind and
        rank; the layers' fingerprint and the base weights' sample when given."""
        saved = self.config
        checks = [("base model class", class_name(model), self.meta.get("base_class")),
                  ("kind", kind, saved["kind"]), ("rank", rank, saved["rank"])]
        if backbone is not None and self.backbone is not None:
            checks.append(("backbone kind", backbone, self.backbone))
        if fp is not None:
            checks.append(("base model layers (fingerprint)", fp, self.meta.get("base_fingerprint")))
        for key, ours, theirs in checks:
            if ours != theirs:
                raise ValueError(f"{self.path}: adapter {key} is {theirs!r} but this model's is {ours!r}; "
                                 "load it into the model and adapter it was trained with")
        theirs = json.loads(self.meta.get("base_sample", "null"))
        if allow_other_base or sample is None or theirs is None or not ranked:
            return
        if len(theirs) != len(sample) or not torch.allclose(torch.tensor(theirs), torch.tensor(sample),
                                                             rtol=SAMPLE_RTOL, atol=1e-6):
            raise NeedsOption(f"{self.path} was trained on a base model with other weights (the same shapes, "
                              "other values); load it on the model it was distilled from, or allow it explicitly ({option})",
                              "allow_other_base")


def metadata(config: dict, model: nn.Module, backbone: str, fp: str, sample: list[float] | None,
             num_layers: int, extra: dict | None = None) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "config": json.dumps(config),
        "backbone": backbone,
        "base_class": class_name(model),
        "base_fingerprint": fp,
        "base_sample": json.dumps(sample),
        "base_model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        "num_layers": str(num_layers),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read(path: str | os.PathLike) -> AdapterFile:
    """Metadata and tensors of a wadi adapter file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a wadi adapter file (metadata format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CorruptFile(f"{path} is not a readable safetensors file ({describe(e)})") from None
    _check_metadata(path, meta)
    check_finite(tensors.items(), str(path))
    return AdapterFile(path, meta, tensors)


def _check_metadata(path: Path, meta: dict[str, str]) -> None:
    """The metadata the loaders read: a config that builds an AdapterConfig, a base sample
    that is a list of numbers or null. Damage is a CorruptFile, before anything reads it."""
    try:
        config = json.loads(meta["config"])
        AdapterConfig(**config).rule  # noqa: B018 -- builds the target rule, which raises on damage
        sample = json.loads(meta.get("base_sample", "null"))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CorruptFile(f"{path}: its adapter metadata is damaged ({describe(e) or type(e).__name__})") from None
    if sample is not None and not (isinstance(sample, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in sample)):
        raise CorruptFile(f"{path}: its adapter metadata is damaged (base_sample is not a list of numbers)")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A wadi adapter file's metadata alone (no tensor is read), checked as `read` checks it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CorruptFile(f"{path} is not a readable safetensors file ({describe(e)})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a wadi adapter file (metadata format {meta.get('format')!r})")
    _check_metadata(path, meta)
    return meta


def is_adapter_file(path: Path) -> bool:
    """Whether `path` is a wadi adapter file, by its metadata alone (no tensor is read)."""
    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all: the weights reader names the problem
        return False
