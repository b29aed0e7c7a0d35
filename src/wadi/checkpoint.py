"""Run folders and training checkpoints without pickle: tensors in safetensors, everything
else in JSON.

Runs live in numbered folders `runs/NNNNN-name/`. A checkpoint is a folder
`step-NNNNNNN/` written as `step-NNNNNNN.tmp/` and renamed when complete, so a run killed
at any moment leaves only whole checkpoints behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        rest = json.loads(f.metadata()["structure"])
    return unflatten_state(load_file(str(path)), rest)


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator, python_state) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def begin(tmp: Path) -> Path:
    """A fresh temporary folder `step-NNNNNNN.tmp` for a checkpoint being written."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, keep: int) -> Path:
    """Make a written checkpoint visible (atomic rename), then prune to the newest `keep`."""
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def next_run_dir(root: Path, name: str) -> Path:
    """runs/NNNNN-name with NNNNN one past the highest number already there."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [int(p.name.split("-")[0]) for p in root.iterdir() if p.is_dir() and p.name.split("-")[0].isdigit()]
    return root / f"{max(ids, default=-1) + 1:05d}-{name}"


def find_resume_dir(root: Path, resume: str) -> Path:
    """The run folder `resume` names, or with 'latest' the newest run under root with a checkpoint."""
    if resume != "latest":
        run = Path(resume)
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a run folder (no config.yaml)")
        return run
    runs = sorted((p for p in root.glob("[0-9]*-*") if list_checkpoints(p / "checkpoints")),
                  key=lambda p: int(p.name.split("-")[0]))
    if not runs:
        raise FileNotFoundError(f"--resume latest: no run with a checkpoint under {root}")
    return runs[-1]
