"""Options shared by the tools that load a student or teacher (sample, export, eval)."""

from __future__ import annotations

import torch

from ..backbones import KINDS
from ..models import BaseOptions

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_base_args(p) -> None:
    g = p.add_argument_group("base model (filled from a run folder or an export when they name it)")
    g.add_argument("--base", help="the teacher: diffusers folder or hub id (needed for adapter and released files)")
    g.add_argument("--kind", choices=KINDS, help="backbone kind of --base (default: inferred from its folder)")
    g.add_argument("--text-encoder", help="folder of the text encoder and tokenizer, if not the base's")
    g.add_argument("--resolution", type=int, help="image size in pixels (default: the model's own)")
    g.add_argument("--max-length", type=int, help="tokenizer length (default: the backbone's)")


def add_device_args(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype (default fp32)")


def base_options(args) -> BaseOptions:
    return BaseOptions(args.base, args.kind, args.text_encoder, args.resolution, args.max_length)


def parse_seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    seeds = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"bad --seeds {text!r}; write numbers and ranges like 0-3,7") from None
    if not seeds:
        raise ValueError("--seeds is empty")
    return seeds
