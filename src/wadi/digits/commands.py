"""The digits world's tools, registered by its plugin (wadi.worlds): `wadi demo` (a real
WaDi distillation on a CPU in minutes, with a report), `wadi digits-teacher` and `wadi
digits-classifier` (reproduce the shipped teacher and classifier)."""

from __future__ import annotations

import os
from pathlib import Path

from wadi.adapters.config import ADAPTERS
from wadi.commands.model_args import check_seed, parse_seeds
from wadi.files.atomic import FORCE_HELP


def register(sub) -> None:
    _register_demo(sub)
    _register_teacher(sub)
    _register_classifier(sub)


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="distill a shipped digits teacher into a one-step student and report",
                       description="Distils a shipped handwritten-digits teacher with the WaDi engine (the world's "
                                   "preset: digits-wadi, or digits-flow-wadi for --world digits-flow) and writes "
                                   "report.md, grid.png, loss.png and metrics.json.")
    # Checked by the demo's settings, not argparse: a wrong name is refused in one line.
    p.add_argument("--world", default="digits",
                   help="digits (the UNet teacher, v-prediction) or digits-flow (the MMDiT teacher, rectified flow) "
                        "(default digits)")
    p.add_argument("--student-steps", type=int,
                   help="a student of this many sampling steps (model.student_steps; default 1)")
    p.add_argument("--adapter", default="lorad", choices=ADAPTERS, help="the student's adapter (default lorad)")
    p.add_argument("--rank", type=int, help="student adapter rank (default: the preset's)")
    p.add_argument("--fake-rank", type=int, help="fake score model LoRaD rank (default: the preset's)")
    p.add_argument("--steps", type=int, help="distillation steps (default: the preset's)")
    p.add_argument("--compare", action="store_true",
                   help="run the adapter ablation (every adapter kind) and write one table")
    p.add_argument("--seeds", default="0",
                   help="distill once per seed and report each, their median and the worst, e.g. 0-4 (default 0)")
    p.add_argument("--per-class", type=int, default=50, help="evaluation images per digit (default 50)")
    p.add_argument("--eval-every", type=int, default=250,
                   help="score each student every this many steps while it trains, for the report's quality "
                        "curve (default 250; 0: none)")
    p.add_argument("--root", default="runs", help="where the numbered demo folder goes (default runs)")
    p.add_argument("--out", help="the demo folder instead (new or empty; with --force, an existing one)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores, at most 4; models this small gain nothing from more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more distillation settings, e.g. train.steps=500")
    p.set_defaults(func=_demo_command)


def _demo_command(args) -> int:
    import torch

    from wadi.digits.demo import DemoSettings, check, run_compare, run_demo

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    overrides = args.overrides + ([f"model.student_steps={args.student_steps}"] if args.student_steps is not None else [])
    settings = DemoSettings(world=args.world, adapter=args.adapter, rank=args.rank, fake_rank=args.fake_rank,
                            steps=args.steps, seeds=parse_seeds(args.seeds), per_class=args.per_class,
                            eval_every=args.eval_every, root=args.root,
                            overrides=overrides)
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


def _register_teacher(sub) -> None:
    from wadi.digits.paths import TEACHERS

    p = sub.add_parser("digits-teacher", help="train a handwritten-digits teacher (wadi demo's teacher)")
    p.add_argument("--world", default="digits", choices=list(TEACHERS),
                   help="whose teacher: digits (UNet, v-prediction) or digits-flow (MMDiT, rectified flow) "
                        "(default digits)")
    p.add_argument("--out", required=True, type=Path, help="diffusers folder to write (unet/ or transformer/, "
                                                            "scheduler/, training.json)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_teacher_command)


def _teacher_command(args) -> int:
    from wadi.digits.teacher import train_teacher

    # This tool has no --force: it writes a new folder only.
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise FileExistsError(f"--out {args.out} exists; give a new or empty folder")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be at least 1, got {args.steps} and {args.batch_size}")
    check_seed(args.seed, "--seed")
    out = train_teacher(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        name=args.world, progress=not args.no_progress)
    print(f"teacher: {out}")
    return 0


def _register_classifier(sub) -> None:
    p = sub.add_parser("digits-classifier", help="train the handwritten-digits classifier behind wadi demo's metrics")
    p.add_argument("--out", required=True, type=Path, help="FILE.safetensors (FILE.json is written beside it)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing classifier file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_classifier_command)


def _classifier_command(args) -> int:
    from wadi.digits.classifier import train_classifier
    from wadi.files.atomic import check_new_file

    for path in (args.out, args.out.with_suffix(".json")):
        check_new_file(path, args.force)
    out = train_classifier(args.out, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    print(f"classifier: {out} (held-out accuracy in {out.with_suffix('.json')})")
    return 0
