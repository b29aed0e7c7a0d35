"""`wadi export`: the student as a stock diffusers pipeline folder that runs in one step, a
run's adapter files, or its weight change as a LoRA for diffusers, A1111 or ComfyUI; every
export carries a model card (README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wadi.artifacts.export import (FORMATS, check_format, export_adapter, export_lora, export_pipeline, export_single_file,
                       single_file_paths)
from wadi.files.atomic import FORCE_HELP, check_out
from wadi.files.hub import push, resolve
from wadi.artifacts.model_card import one_liner
from wadi.artifacts.students import load_student, teacher_for
from wadi.commands.model_args import DTYPES, add_base_args, base_spec, student_options


def register(sub) -> None:
    p = sub.add_parser("export", help="write the student as a stock diffusers pipeline, adapter files or a LoRA")
    p.add_argument("model", help="run folder, exported folder, adapter or released .safetensors file")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder; with --format single-file also NAME.safetensors (the scheduler and card "
                        "beside it as NAME.scheduler/ and NAME.md)")
    p.add_argument("--format", choices=FORMATS, default="pipeline",
                   help="pipeline (default): a complete stock pipeline folder; adapter: the run's adapter files; "
                        "lora / lora-kohya: the student's weight change as a LoRA for load_lora_weights / "
                        "A1111 and ComfyUI; single-file: one checkpoint in the original SD layout")
    p.add_argument("--template", help="with --format single-file: the base model's own single-file checkpoint "
                                      "(e.g. v1-5-pruned-emaonly.safetensors; a path or hub:OWNER/REPO/FILE)")
    p.add_argument("--rank", type=int, help="with --format lora / lora-kohya: the LoRA's rank (exact once it reaches "
                                             "the widest changed layer's, where it is capped; the energy each layer "
                                             "keeps is reported)")
    p.add_argument("--fake", action="store_true", help="with --format adapter: the fake score model's adapter too")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the saved weights (default fp32; with --format "
                                                   "single-file the template's)")
    p.add_argument("--push-to-hub", metavar="OWNER/REPO", help="also upload the export (with its card) to the hub")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    add_base_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.push_to_hub:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(args.push_to_hub)  # a bad name fails before the export
    code = export(args)
    if args.push_to_hub:
        print(f"pushed to {push(args.out, args.push_to_hub, args.private)}")
    return code


def export(args) -> int:
    lora = args.format.startswith("lora")
    if args.fake and args.format != "adapter":
        raise ValueError(f"--fake is for --format adapter, not --format {args.format}")
    if args.rank is not None and not lora:
        raise ValueError(f"--rank is for --format lora or lora-kohya, not --format {args.format}")
    if args.rank is None and lora:
        raise ValueError(f"--format {args.format} needs --rank R, the LoRA's rank (exact once it reaches the "
                         "widest adapted layer's)")
    if args.template is not None and args.format != "single-file":
        raise ValueError(f"--template is for --format single-file, not --format {args.format}")
    if args.template is None and args.format == "single-file":
        raise ValueError("--format single-file needs --template FILE, the base model's own single-file checkpoint")
    if args.format == "adapter":
        for path in export_adapter(args.model, args.out, args.force, args.fake):
            print(f"wrote {path}")
        return 0
    # Before minutes of loading.
    inputs = [args.model, args.base, args.text_encoder, args.template]
    if args.format == "single-file":
        single_file_paths(args.out, args.force, inputs)
    else:
        check_out(args.out, args.force, inputs=inputs)
    dtype = DTYPES[args.dtype] if args.dtype else None
    # A LoRA (a difference) and a checkpoint built on a template are computed in float32 and
    # written in --dtype; a pipeline is loaded in it.
    load_dtype = (dtype or torch.float32) if args.format == "pipeline" else torch.float32
    model = load_student(args.model, base_spec(args), load_dtype, **student_options(args))
    if args.format == "pipeline":
        out = export_pipeline(model, args.out, args.force)
        bb = model.backbone
        print(f"wrote {out}; sample it with "
              f"{one_liner(bb.kind, out.resolve(), bb.pipeline_call() if bb.kind.pipeline else None)}")
        return 0
    if args.format == "single-file":
        check_format(model.backbone.kind, "single-file")  # before the teacher loads
    teacher = teacher_for(model, base_spec(args), load_dtype, args.allow_bin)
    if args.format == "single-file":
        path = export_single_file(model, teacher, resolve(args.template), args.out, args.force, dtype)
        print(f"wrote {path}; load it with {model.backbone.kind.pipeline}.from_single_file and the scheduler beside "
              f"it (its model card shows how)")
        return 0
    path, report = export_lora(model, teacher, args.out, args.rank, kohya=args.format == "lora-kohya",
                               force=args.force, dtype=dtype)
    print(f"wrote {path}: {json.dumps({k: v for k, v in report.items() if k != 'left_out'})}")
    if report["left_out"]:
        print(f"note: {len(report['left_out'])} changed tensors are not linear weights and are not in the LoRA "
              f"(largest change {max(report['left_out'].values()):.3g})")
    return 0
