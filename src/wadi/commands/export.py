"""`wadi export`: the merged student as a complete diffusers pipeline folder that the stock
pipeline runs in one step, or (--adapter-only) a run's adapter files alone."""

from __future__ import annotations

from pathlib import Path

from ..export import export_adapter, export_pipeline
from ..files import check_out
from ..students import load_student
from .model_args import DTYPES, add_base_args, base_spec, student_options


def register(sub) -> None:
    p = sub.add_parser("export", help="write the student as a stock diffusers pipeline folder (or adapter files)")
    p.add_argument("model", help="run folder, exported folder, adapter or released .safetensors file")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--adapter-only", action="store_true", help="copy the run's student adapter file only")
    p.add_argument("--fake", action="store_true", help="with --adapter-only: the fake score model's adapter too")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the saved weights (default fp32)")
    add_base_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.adapter_only:
        for path in export_adapter(args.model, args.out, args.force, args.fake):
            print(f"wrote {path}")
        return 0
    if args.fake:
        raise ValueError("--fake goes with --adapter-only")
    check_out(args.out, args.force)  # before minutes of loading
    model = load_student(args.model, base_spec(args), DTYPES[args.dtype], **student_options(args))
    out = export_pipeline(model, args.out, args.force)
    print(f"wrote {out}; run it with {model.backbone.kind.usage()}")
    return 0
