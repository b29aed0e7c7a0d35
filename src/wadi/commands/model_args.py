"""Options shared by the tools that load a student or teacher (sample, export, eval)."""

from __future__ import annotations

import torch

from ..backbones import KINDS, SCHEDULER, BackboneSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def add_device_args(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype (default fp32)")


def base_spec(args) -> BackboneSpec:
    """The base model as far as the options describe it; the rest comes from the source."""
    return BackboneSpec(args.kind, args.base or "", args.text_encoder, args.resolution, args.max_length,
                        args.one_step_abar)


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
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"bad --seeds {text!r}; write numbers and ranges like 0-3,7") from None
    if not seeds:
        raise ValueError("--seeds is empty")
    return seeds
