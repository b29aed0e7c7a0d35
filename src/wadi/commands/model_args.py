"""Options shared by the tools that load a student or teacher (sample, export, eval)."""

from __future__ import annotations

import math

import torch

from wadi.engine.config import MAX_SEED
from wadi.models.backbones import DTYPES, KINDS, BackboneSpec
from wadi.models.process import SCHEDULER

MAX_SEEDS = 100_000  # images per prompt; a longer range is a typo, not a request


def add_base_args(p) -> None:
    g = p.add_argument_group("base model (filled from a run folder or an export when they name it)")
    g.add_argument("--base", help="the teacher: diffusers folder or hub id (needed for adapter and released files)")
    g.add_argument("--kind", choices=KINDS, help="backbone kind of --base (default: inferred from its folder)")
    g.add_argument("--text-encoder", help="folder of the text encoder and tokenizer, if not the base's")
    g.add_argument("--resolution", type=int, help="image size in pixels (default: the model's own)")
    g.add_argument("--max-length", type=int, help="tokenizer length (default: the backbone's)")
    g.add_argument("--one-step-abar", type=one_step_abar,
                   help="abar_T of the one-step generator: a number, or 'scheduler' for the scheduler's abar at "
                        "T-1 (default: what the run or export records, else the authors' 0.0047)")
    g.add_argument("--allow-bin", action="store_true",
                   help="read .bin/.pth/.pt state dicts (plain tensors only: no code in them runs)")
    g.add_argument("--allow-other-base", action="store_true",
                   help="load an adapter file on a base whose weights differ from the one it was trained on")


def add_device_args(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype (default fp32)")


def base_spec(args) -> BackboneSpec:
    """The base model as far as the options describe it; the rest comes from the source."""
    for option in ("resolution", "max_length"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be positive, got {value}")
    return BackboneSpec(args.kind, args.base or "", args.text_encoder, args.resolution, args.max_length,
                        args.one_step_abar)


def student_options(args) -> dict:
    """What load_student takes from the options besides the base."""
    return {"allow_bin": args.allow_bin, "allow_other_base": args.allow_other_base}


def check_device(name: str) -> str:
    """A device this machine has, or a one-line refusal."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return name


def positive(value: int, option: str) -> int:
    if value < 1:
        raise ValueError(f"{option} must be at least 1, got {value}")
    return value


def finite(value: float, option: str) -> float:
    """A guidance scale: nan or inf would make every image black."""
    if not math.isfinite(value):
        raise ValueError(f"{option} must be a finite number, got {value}")
    return value


def check_seed(seed: int, option: str, count: int = 1) -> int:
    """`seed` .. `seed + count - 1` within what torch.Generator.manual_seed takes."""
    if seed < 0 or seed + count - 1 > MAX_SEED:
        raise ValueError(f"{option} must be in 0..{MAX_SEED}{' for every image' if count > 1 else ''}, got {seed}")
    return seed


def one_step_abar(text: str) -> float | str:
    if text == SCHEDULER:
        return text
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"{text} is not in (0, 1)")
    return value


def parse_seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    seeds = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad --seeds {text!r}; write numbers and ranges like 0-3,7") from None
        check_seed(first, "--seeds")
        check_seed(last, "--seeds")
        if last - first + 1 + len(seeds) > MAX_SEEDS:
            raise ValueError(f"--seeds {text!r} asks for more than {MAX_SEEDS} seeds")
        seeds += range(first, last + 1)
    if not seeds:
        raise ValueError("--seeds is empty")
    return seeds
