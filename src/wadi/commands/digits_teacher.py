"""`wadi digits-teacher`: train a digits world's teacher (reproduces the shipped ones)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from ..digits.paths import TEACHERS

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
    p.set_defaults(func=run)


def run(args) -> int:
    from ..digits.teacher import train_teacher

    from ..files import check_out

    check_out(args.out, force=False)
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be at least 1, got {args.steps} and {args.batch_size}")
    out = train_teacher(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        name=args.world, progress=not args.no_progress)
    print(f"teacher: {out}")
    return 0
