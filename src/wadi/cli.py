"""The `wadi` command line. Each tool lives in `wadi.commands.<name>` and defines
`register(subparsers)`, which adds its parser with `func` set to its entry point; an
embedded world's tools come from its plugin (wadi.worlds) and check its extra first."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from wadi.errors import NeedsOption, describe

# The core's tools, in the order `wadi --help` lists them; the worlds' follow.
COMMANDS = ["params", "plan", "distill", "analyze", "sample", "export", "convert", "eval"]


def build_parser() -> argparse.ArgumentParser:
    from wadi.worlds import worlds

    parser = argparse.ArgumentParser(prog="wadi", description="WaDi: one-step diffusion distillation with LoRaD.")
    parser.add_argument("--version", action="version", version=f"wadi {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wadi.commands.{name}").register(sub)
    for world_name, world in worlds().items():
        before = set(sub.choices)
        for module in world.commands:
            importlib.import_module(module).register(sub)
        for command in set(sub.choices) - before:
            sub.choices[command].set_defaults(world_of_command=world_name)
    parser.set_defaults(commands=sub.choices)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line. argparse fills a command's positional list (`key=value` overrides,
    eval's models) from one stretch only, so words after a flag that follows some of them
    are refused, with the top-level usage; the command's own parser reads them wherever
    they stand (and says its own usage when something is wrong)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        argv = sys.argv[1:] if argv is None else list(argv)
        rest = argv[argv.index(args.command) + 1:]  # the top level has no option that takes a value
        vars(args).update(vars(args.commands[args.command].parse_intermixed_args(rest)))
    return args


def version() -> str:
    from wadi import __version__

    return __version__


def _quiet_libraries() -> None:
    """No per-file "Loading weights" bars and no warnings from diffusers' and transformers'
    loggers (a missing torchvision, a tokenizer's token ids): our own bars, summary line
    and one-line errors are what a user reads on stderr. WADI_DEBUG=1 keeps the warnings."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if not os.environ.get("WADI_DEBUG"):
        import huggingface_hub

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        huggingface_hub.utils.logging.set_verbosity_error()  # "... thrown while requesting HEAD" offline
        # diffusers still passes huggingface_hub an argument it has deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)


OUT_OF_MEMORY = ("out of memory: lower the batch (train.batch_size, with train.grad_accum to keep the "
                 "effective batch; --batch-size for sampling and eval), or turn on train.gradient_checkpointing, "
                 "train.adam_8bit and mixed precision")


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's and the CPU allocator's out-of-memory (torch raises the latter as a RuntimeError)."""
    import torch

    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


PEER_LOST = ("another process of this run stopped (its own line says why; a killed one says nothing): "
             "this one stops too; resume with --resume latest")


def _peer_lost(e: BaseException) -> bool:
    """A collective that failed because another process of a launched run is gone."""
    import torch.distributed as dist

    text = str(e)
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        isinstance(e, dist.DistError) or any(s in text for s in ("closed by peer", "reset by peer", "Broken pipe")))


def main(argv: list[str] | None = None) -> int:
    """Run a command. Problems with what the user gave (settings, files, the disk) end as one
    line on stderr and exit 2, running out of memory exits 3, a process of a launched run whose
peer is gone exits 4, an interrupt 130 (from the first
    line: imports and parsing too); anything else is a bug and shows its traceback.
    WADI_DEBUG=1 shows the traceback of everything. A command with --out holds that
    output's lock (wadi.files.locks) for its whole life."""
    command = "wadi"
    try:
        from safetensors import SafetensorError

        from wadi.engine.training import TrainingStopped
        from wadi.files import locks

        args = parse(argv)
        command = f"wadi {args.command}"
        _quiet_libraries()
        if getattr(args, "world_of_command", None):
            from wadi.worlds import check_installed

            check_installed(args.world_of_command)
        out = getattr(args, "out", None)
        with locks.hold(out) if out else contextlib.nullcontext():
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("WADI_DEBUG"):
            raise
        if _out_of_memory(e):
            print(f"{command}: error: {OUT_OF_MEMORY}", file=sys.stderr)
            return 3
        if _peer_lost(e):
            print(f"{command}: error: {PEER_LOST}", file=sys.stderr)
            return 4
        if not isinstance(e, (ValueError, OSError, TrainingStopped, SafetensorError)):
            raise
        text = e.for_command_line if isinstance(e, NeedsOption) else describe(e)
        print(f"{command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
