"""`wadi sample`: images from a one-step student (run folder, export, adapter or released
file) or, with --teacher, from the multi-step teacher, so both are compared by one tool."""

from __future__ import annotations

import json
from pathlib import Path

from wadi.files.atomic import FORCE_HELP, check_out, write_into
from wadi.artifacts.students import load_student, load_teacher
from wadi.files.prompts import FORMATS, check_prompts, read_prompts
from wadi.models.sampling import Sampling, sample_to_folder
from wadi.commands.model_args import (DTYPES, add_base_args, add_device_args, base_spec, check_device, finite, parse_seeds,
                         positive, student_options)


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample PNGs and a grid from a one-step student or the multi-step teacher")
    p.add_argument("model", help="run folder, exported folder, adapter or released .safetensors file; "
                                 "with --teacher the base model (or a run folder / export naming it)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    prompts.add_argument("--prompts", type=Path, help="prompt file: .txt, .jsonl or COCO captions .json")
    p.add_argument("--format", choices=FORMATS, default="auto", help="prompt file format")
    p.add_argument("--seeds", default="0", help="seeds for every prompt, e.g. 0-3,7 (default 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, required=True, help="output folder of PNGs")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--no-grid", action="store_true", help="no grid.png")
    t = p.add_argument_group("teacher")
    t.add_argument("--teacher", action="store_true", help="sample the multi-step teacher instead of the student")
    t.add_argument("--steps", type=int, help="teacher steps (default 25); a student samples its own")
    t.add_argument("--guidance", type=float, help="teacher guidance scale (default 3.0); a student samples unguided")
    t.add_argument("--scheduler", choices=["ddim", "dpm", "euler"],
                   help="teacher scheduler (default: ddim for VP models, euler for flow-matching ones)")
    add_base_args(p)
    add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    seeds = parse_seeds(args.seeds)
    positive(args.batch_size, "--batch-size")
    if not args.teacher:
        given = [option for option in ("steps", "guidance", "scheduler") if getattr(args, option) is not None]
        if given:
            raise ValueError(f"--{given[0]} is the teacher's (with --teacher); a student samples with its own "
                             "steps, unguided")
    if args.steps is not None:
        positive(args.steps, "--steps")
    if args.guidance is not None:
        finite(args.guidance, "--guidance")
    check_device(args.device)
    prompts = check_prompts(args.prompt, "--prompt") if args.prompt else read_prompts(args.prompts, args.format)
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt must not be empty")
    check_out(args.out, args.force, inputs=[args.model, args.base, args.text_encoder, args.prompts])
    dtype = DTYPES[args.dtype]
    if args.teacher:
        model = load_teacher(args.model, base_spec(args), dtype, args.allow_bin)
    else:
        model = load_student(args.model, base_spec(args), dtype, **student_options(args))
    model.to(args.device, dtype)
    # The student samples without guidance; --guidance and --steps are the teacher's.
    sampling = (Sampling(False, args.steps, args.guidance, args.scheduler) if args.teacher
                else Sampling.for_student(model.backbone))
    sampling.check(model.backbone)
    text = {"model": model.source, "role": "teacher" if args.teacher else "student"}
    # A new folder appears whole (a failure leaves none); --force writes into an existing one.
    with write_into(args.out) as out:
        paths = sample_to_folder(model.backbone, model.net, sampling, prompts, seeds, out, args.batch_size,
                                 text, with_grid=not args.no_grid)
        (out / "samples.json").write_text(json.dumps(
            {**text, "sampling": sampling.to_dict(), "prompts": prompts, "seeds": seeds}, indent=1) + "\n")
    print(f"wrote {len(paths)} files to {args.out}")
    return 0
