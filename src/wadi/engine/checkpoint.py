"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder of pieces, each named once with how it is written and read
(`Piece`), so that saving and loading walk the same list. It is written as
`step-NNNNNNN.tmp/` and renamed when complete: a run killed at any moment leaves only
whole checkpoints, and a later start removes the half-written one. With several processes
the main one writes the state they share and each process its own random generators; the
rename waits for every process's piece (training.save_checkpoint).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from wadi.errors import CorruptFile, describe
from wadi.files.atomic import read_json_object, replace_dir
from wadi.files.weights import check_finite


def flatten_state(state: dict, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state dict into {dotted.key: tensor} and a JSON-able remainder."""
    tensors, rest = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().to("cpu").contiguous()
        elif isinstance(v, dict):
            t, r = flatten_state(v, f"{key}.")
            tensors.update(t)
            rest[str(k)] = r
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
            for i, x in enumerate(v):
                tensors[f"{key}.{i}"] = x.detach().to("cpu").contiguous()
            rest[str(k)] = {"__tensor_list__": len(v)}
        else:
            rest[str(k)] = v
    return tensors, rest


def unflatten_state(tensors: dict[str, torch.Tensor], rest: dict, prefix: str = "") -> dict:
    """Inverse of flatten_state; integer-looking keys (optimizer param ids) become ints."""
    out = {}
    for k, v in rest.items():
        key = int(k) if k.isdigit() else k
        if isinstance(v, dict) and "__tensor_list__" in v:
            out[key] = [tensors[f"{prefix}{k}.{i}"] for i in range(v["__tensor_list__"])]
        elif isinstance(v, dict):
            out[key] = unflatten_state(tensors, v, f"{prefix}{k}.")
        else:
            out[key] = v
    for name, t in tensors.items():
        if name.startswith(prefix) and "." not in name[len(prefix):]:
            k = name[len(prefix):]
            out[int(k) if k.isdigit() else k] = t
    return out


def save_state(path: Path, state: dict) -> None:
    """One state dict (optimizer, EMA, ...) as safetensors with its structure in the metadata."""
    tensors, rest = flatten_state(state)
    save_file(tensors, str(path), metadata={"structure": json.dumps(rest)})


def load_state(path: Path) -> dict:
    """A state file written by save_state; a file that parses but holds another structure,
    or NaN or infinity, is as damaged as a truncated one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            rest = json.loads((f.metadata() or {})["structure"])
        tensors = load_file(str(path))
        state = unflatten_state(tensors, rest)
    except (SafetensorError, KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise CorruptFile(f"{path} is not a readable state file ({describe(e) or type(e).__name__})") from None
    check_finite(tensors.items(), str(path))
    return state


@dataclass
class Piece:
    """One piece of a checkpoint: its file name, and how to write and read it."""

    file: str
    save: Callable[[Path], None]
    load: Callable[[Path], None]


def stateful(name: str, obj) -> Piece:
    """A piece for anything with state_dict / load_state_dict (optimizers, schedulers, EMA)."""
    return Piece(f"{name}.safetensors", lambda p: save_state(p, obj.state_dict()),
                 lambda p: obj.load_state_dict(load_state(p)))


def json_piece(name: str, get: Callable[[], dict], put: Callable[[dict], None]) -> Piece:
    def load(path: Path) -> None:
        put(read_json_object(path))

    return Piece(f"{name}.json", lambda p: p.write_text(json.dumps(get())), load)


def rng_file(process: int) -> str:
    return f"rng-{process}.safetensors"


def write_pieces(folder: Path, pieces: list[Piece]) -> None:
    for piece in pieces:
        piece.save(folder / piece.file)


def read_pieces(folder: Path, pieces: list[Piece]) -> None:
    """Read every piece. A missing or unreadable one, or one of another structure (a key,
    type or index that is not there), raises CorruptCheckpoint naming it; a piece that reads
    but does not fit (another model, another process count: ValueError, RuntimeError)
    raises its own error: that is a refusal, not damage."""
    for piece in pieces:
        path = folder / piece.file
        try:
            piece.load(path)
        except (OSError, CorruptFile, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CorruptCheckpoint(f"{path.name}: {describe(e) or type(e).__name__}") from e


class CorruptCheckpoint(Exception):
    """A checkpoint folder whose pieces cannot be read back."""


def begin(tmp: Path) -> Path:
    """A fresh temporary folder `step-NNNNNNN.tmp` for a checkpoint being written."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write(tmp: Path, pieces: list[Piece], keep: int, complete: Callable[[], list[Path]]) -> Path:
    """Write a checkpoint's pieces into the fresh folder `tmp` and commit it; a write that
    fails (a full disk) leaves no `.tmp` folder behind."""
    begin(tmp)
    try:
        write_pieces(tmp, pieces)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit(tmp, keep, complete)


def commit(tmp: Path, keep: int, complete: Callable[[], list[Path]]) -> Path:
    """Make a written checkpoint visible (atomic rename), then prune to the newest `keep`."""
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    replace_dir(tmp, final)
    for old in complete()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(folder: Path) -> None:
    """Remove the `.tmp` folders a killed or failed checkpoint write left behind."""
    if folder.is_dir():
        for tmp in folder.glob("*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
