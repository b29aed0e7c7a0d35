"""The `wadi` command line. Each tool lives in `wadi.commands.<name>` and defines
`register(subparsers)`, which adds its parser with `func` set to its entry point."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

# One line per tool, in the order `wadi --help` lists them.
COMMANDS = ["params", "distill", "analyze", "sample", "export", "convert", "eval", "demo", "digits_teacher",
            "digits_classifier"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wadi", description="WaDi: one-step diffusion distillation with LoRaD.")
    parser.add_argument("--version", action="version", version=f"wadi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wadi.commands.{name}").register(sub)
    return parser


def _quiet_libraries() -> None:
    """No per-file "Loading weights" bars from diffusers and transformers: our own bars and
    one-line errors are what a user reads on stderr."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as e:
        # User errors end as one line and exit 2; WADI_DEBUG=1 shows the traceback.
        if os.environ.get("WADI_DEBUG"):
            raise
        print(f"wadi {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
