"""`wadi digits-classifier`: train the digits world's metric classifier (reproduces the shipped one)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("digits-classifier", help="train the handwritten-digits classifier behind wadi demo's metrics")
    p.add_argument("--out", required=True, type=Path, help="FILE.safetensors (FILE.json is written beside it)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing classifier file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..digits.classifier import train_classifier
    from ..files import check_new_file

    for path in (args.out, args.out.with_suffix(".json")):
        check_new_file(path, args.force)
    out = train_classifier(args.out, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    print(f"classifier: {out} (held-out accuracy in {out.with_suffix('.json')})")
    return 0
