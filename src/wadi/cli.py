"""The `wadi` command line: one subcommand per tool."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__


def cmd_params(args) -> int:
    from .adapters import AdapterConfig, attach
    from .archs import build, get_arch
    from .targets import preset_for

    arch = get_arch(args.model)
    model = build(arch.name, device="meta")
    total = sum(p.numel() for p in model.parameters())
    preset = preset_for(arch.family, args.role)
    adapter = attach(model, AdapterConfig(kind=args.adapter, rank=args.rank, targets=preset))
    result = {
        "model": arch.name, "role": args.role, "adapter": args.adapter, "rank": args.rank,
        "targets": preset, "layers": len(adapter.target_names),
        "trainable": adapter.num_trainable(), "total": total,
        "fraction": adapter.num_trainable() / total,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{arch.name} {args.role} {args.adapter} r={args.rank}: {result['layers']} layers, "
              f"{result['trainable'] / 1e6:.2f}M trainable of {total / 1e6:.2f}M "
              f"({100 * result['fraction']:.1f}%)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .adapters import KINDS
    from .archs import ARCHS

    parser = argparse.ArgumentParser(prog="wadi", description="WaDi: one-step diffusion distillation with LoRaD.")
    parser.add_argument("--version", action="version", version=f"wadi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="count an adapter's trainable parameters on a built-in architecture (no weights needed)")
    p.add_argument("--model", required=True, choices=sorted(ARCHS))
    p.add_argument("--role", default="student", choices=["student", "fake"])
    p.add_argument("--adapter", default="lorad", choices=KINDS)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as e:
        if os.environ.get("WADI_DEBUG"):
            raise
        print(f"wadi {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
