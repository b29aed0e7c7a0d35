"""The `wadi` command line. Each tool lives in `wadi.commands.<name>` and defines
`register(subparsers)`, which adds its parser with `func` set to its entry point; an
embedded world's tools come from its plugin (wadi.worlds) and check its extra first."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import NeedsOption, describe
from .worlds import check_installed, worlds

# The core's tools, in the order `wadi --help` lists them; the worlds' follow.
COMMANDS = ["params", "distill", "analyze", "sample", "export", "convert", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wadi", description="WaDi: one-step diffusion distillation with LoRaD.")
    parser.add_argument("--version", action="version", version=f"wadi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wadi.commands.{name}").register(sub)
    for world_name, world in worlds().items():
        before = set(sub.choices)
        for module in world.commands:
            importlib.import_module(module).register(sub)
        for command in set(sub.choices) - before:
            sub.choices[command].set_defaults(world_of_command=world_name)
    return parser


def _quiet_libraries() -> None:
    """No per-file "Loading weights" bars and no warnings from diffusers' and transformers'
    loggers (a missing torchvision, a tokenizer's token ids): our own bars, summary line
    and one-line errors are what a user reads on stderr. WADI_DEBUG=1 keeps the warnings."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if not os.environ.get("WADI_DEBUG"):
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


OUT_OF_MEMORY = ("out of memory: lower the batch (train.batch_size, with train.grad_accum to keep the "
                 "effective batch; --batch-size for sampling and eval), or turn on train.gradient_checkpointing, "
                 "train.adam_8bit and mixed precision")


def main(argv: list[str] | None = None) -> int:
    """Run a command. Problems with what the user gave (settings, files, the disk) end as one
    line on stderr and exit 2, running out of memory exits 3, an interrupt 130; anything else
    is a bug and shows its traceback. WADI_DEBUG=1 shows the traceback of everything."""
    import torch

    from .training import TrainingStopped

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if getattr(args, "world_of_command", None):
            check_installed(args.world_of_command)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"wadi {args.command}: interrupted", file=sys.stderr)
        return 130
    except (torch.cuda.OutOfMemoryError, MemoryError):
        if os.environ.get("WADI_DEBUG"):
            raise
        print(f"wadi {args.command}: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 3
    except (ValueError, OSError, TrainingStopped) as e:
        if os.environ.get("WADI_DEBUG"):
            raise
        text = e.for_command_line if isinstance(e, NeedsOption) else describe(e)
        print(f"wadi {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
