"""Model weights on disk: read safely, check that they fit an architecture, write them back.

Files read: safetensors (no code in them, ever), and `.bin` / `.pth` / `.pt` state dicts
(DMD2's students, the authors' angle files) through `torch.load(weights_only=True)`,
which rebuilds tensors and plain containers only and refuses any other pickled object, so
no code from the file runs. Folders: a diffusers model folder (config.json and weights)
or a pipeline folder (its unet/ or transformer/).
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from wadi.errors import CorruptFile, describe
from wadi.files.atomic import atomic_path, read_json_object, write_into

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TORCH_SUFFIXES = (".bin", ".pth", ".pt")
StateDict = Mapping[str, torch.Tensor]


@dataclass
class Weights:
    """A state dict and where it came from."""

    state_dict: dict[str, torch.Tensor]
    path: Path
    model_dir: Path | None = None  # the diffusers model folder; None for a single file


def check_finite(named, what: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run's): they sample black images
    and score as if they were a model. `named` yields (name, tensor) pairs."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CorruptFile(f"{what}: {name} holds NaN or infinite values")


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: safetensors, or a torch state dict read with
    weights_only=True (no code runs; a file holding anything but tensors is refused)."""
    if path.suffix in TORCH_SUFFIXES:
        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's refusal of anything but tensors and plain containers
            raise ValueError(f"{path} holds objects other than tensors: it is not a plain state dict that loads "
                             "without running code, so it is not read") from None
        except Exception as e:  # truncated or foreign files come as many types
            raise CorruptFile(f"{path} is not a readable torch state dict ({type(e).__name__})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # the common {"state_dict": ...} wrapping
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
        if not tensors:
            raise ValueError(f"{path} holds no state dict of tensors")
        odd = next((k for k in tensors if not isinstance(k, str)), None)
        if odd is not None:
            raise CorruptFile(f"{path}: tensor names must be strings, found {odd!r}")
    elif path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are read from .safetensors (or, without running code, "
                         f"{'/'.join(TORCH_SUFFIXES)} state dicts)")
    else:
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise CorruptFile(f"{path} is not a readable safetensors file ({describe(e)})") from None
    check_finite(tensors.items(), str(path))
    return tensors


def model_dir(path: Path, subfolders: tuple[str, ...]) -> Path:
    """The diffusers model folder of `path`: itself, or a pipeline's denoiser subfolder (one
    of `subfolders`, the names the backbone kinds give their denoisers)."""
    if (path / "config.json").is_file():
        return path
    for sub in subfolders:
        if (path / sub / "config.json").is_file():
            return path / sub
    raise ValueError(f"{path}: neither a diffusers model folder (config.json) nor a pipeline "
                     f"with a {' or '.join(subfolders)}/ subfolder")


def weight_files(folder: Path, allow_torch: bool = False) -> list[Path]:
    """The weight files of a diffusers model folder: safetensors (sharded or a variant),
    or with `allow_torch` its .bin (read without running code)."""
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():  # sharded checkpoint
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"cannot read the shard index {index}: {e}") from None
        return [folder / s for s in shards]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:  # a variant such as diffusion_pytorch_model.fp16.safetensors
        return found
    bins = sorted(folder.glob("*.bin"))
    if not found and len(bins) == 1 and allow_torch:
        return bins
    what = f"several weight files ({', '.join(f.name for f in found)})" if found else "no .safetensors weights"
    hint = " (its .bin is read with --allow-bin: plain tensors only, no code runs)" if bins and not allow_torch else ""
    raise ValueError(f"{folder}: {what}{hint}")


def load_weights(path: str | Path, allow_torch: bool = True, subfolders: tuple[str, ...] = ()) -> Weights:
    """A weights file, a diffusers model folder or a pipeline folder (its denoiser: the first
    of `subfolders` it has), as a state dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        if path.suffix in TORCH_SUFFIXES and not allow_torch:
            raise ValueError(f"{path}: pass --allow-bin to read a torch state dict (plain tensors only, no code runs)")
        return Weights(read_file(path), path)
    folder = model_dir(path, subfolders)
    state = {}
    for f in weight_files(folder, allow_torch):
        state.update(read_file(f))
    return Weights(state, path, folder)


def check_fits(state: StateDict, reference: StateDict, what: str, hint: str = "") -> None:
    """Raise ValueError when `state` lacks a tensor of `reference`, has one more, or one of
    another shape; the message counts them and names the first."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        first = f"first missing {missing[0]!r}" if missing else f"first unexpected {unexpected[0]!r}"
        raise ValueError(f"{what} ({len(missing)} missing, {len(unexpected)} unexpected keys; {first}){hint}")
    for name, ref in reference.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ValueError(f"{what}: {name!r} has shape {tuple(state[name].shape)}, expected "
                             f"{tuple(ref.shape)}{hint}")


def model_like(folder: Path, state_dict: StateDict) -> nn.Module:
    """The diffusers model of `folder`'s config holding `state_dict` (strict)."""
    import diffusers
    from accelerate import init_empty_weights

    config = read_json_object(folder / "config.json")
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise ValueError(f"{folder / 'config.json'} names no diffusers model class")
    with init_empty_weights():  # no memory for weights that load_state_dict replaces anyway
        model = cls.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def save_weights(state_dict: StateDict, out: Path, like: Weights) -> Path:
    """Save as a diffusers model folder `out` (save_pretrained) when `like` came from a
    diffusers folder, else as the state dict `out`.safetensors. Returns what was written."""
    if like.model_dir is None:
        target = out.with_name(out.name + ".safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
        return target
    model = model_like(like.model_dir, state_dict)
    with write_into(out) as tmp:
        model.save_pretrained(tmp)
    return out
