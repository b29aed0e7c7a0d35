"""`wadi demo`: a real WaDi distillation on a CPU in minutes, with a report (wadi.digits)."""

from __future__ import annotations

import os

from ..adapters import KINDS
from .model_args import parse_seeds


def register(sub) -> None:
    p = sub.add_parser("demo", help="distill a shipped digits teacher into a one-step student and report",
                       description="Distils a shipped handwritten-digits teacher with the WaDi engine (the world's "
                                   "preset: digits-wadi, or digits-flow-wadi for --world digits-flow) and writes "
                                   "report.md, grid.png, loss.png and metrics.json.")
    # Checked by the demo's settings, not argparse: a wrong name is refused in one line.
    p.add_argument("--world", default="digits",
                   help="digits (the UNet teacher, v-prediction) or digits-flow (the MMDiT teacher, rectified flow) "
                        "(default digits)")
    p.add_argument("--adapter", default="lorad", choices=KINDS, help="the student's adapter (default lorad)")
    p.add_argument("--rank", type=int, help="student adapter rank (default: the preset's)")
    p.add_argument("--fake-rank", type=int, help="fake score model LoRaD rank (default: the preset's)")
    p.add_argument("--steps", type=int, help="distillation steps (default: the preset's)")
    p.add_argument("--compare", action="store_true",
                   help="run the adapter ablation (every adapter kind) and write one table")
    p.add_argument("--seeds", default="0",
                   help="distill once per seed and report each, their median and the worst, e.g. 0-4 (default 0)")
    p.add_argument("--per-class", type=int, default=50, help="evaluation images per digit (default 50)")
    p.add_argument("--root", default="runs", help="where the numbered demo folder goes (default runs)")
    p.add_argument("--out", help="the demo folder instead (new or empty; with --force, any)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores, at most 4; models this small gain nothing from more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more distillation settings, e.g. train.steps=500")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..digits.demo import DemoSettings, check, run_compare, run_demo

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    settings = DemoSettings(world=args.world, adapter=args.adapter, rank=args.rank, fake_rank=args.fake_rank,
                            steps=args.steps, seeds=parse_seeds(args.seeds), per_class=args.per_class, root=args.root,
                            overrides=args.overrides)
    check(settings, args.compare)
    # Process-wide, so only once every setting is known to be good.
    torch.set_num_threads(args.threads or min(4, os.cpu_count() or 1))
    if args.compare:
        out = run_compare(settings, args.out, args.force, progress=not args.no_progress)
        print(f"adapter ablation: {out / 'compare.md'}")
    else:
        out = run_demo(settings, args.out, args.force, progress=not args.no_progress)
        print(f"report: {out / 'report.md'}")
    return 0
