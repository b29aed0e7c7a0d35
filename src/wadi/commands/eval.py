"""`wadi eval`: FID, CLIP score, precision/recall and a pluggable alignment metric for
one-step students and their multi-step teacher, on the COCO protocols or any prompt file,
into one results JSON. Run under `accelerate launch` to spread generation over processes;
run again to resume."""

from __future__ import annotations

import json
from pathlib import Path

from wadi.evaluation.evaluate import (INCEPTION, METRICS, Entry, default_cache_dir, evaluate, metric_settings,
                        world_metric_settings)
from wadi.files.atomic import FORCE_HELP
from wadi.files.prompts import FORMATS, PROTOCOLS, coco_prompts, file_prompts
from wadi.evaluation.metrics import DEFAULT_CLIP
from wadi.models.sampling import Sampling
from wadi.artifacts.students import load_student, load_teacher, teacher_for
from wadi.worlds import get_world, worlds
from wadi.commands.model_args import (DTYPES, add_base_args, add_device_args, base_spec, check_device, check_seed, finite,
                         positive, student_options)


def register(sub) -> None:
    p = sub.add_parser("eval", help="FID, CLIP score, precision/recall (and alignment) of students and teacher")
    p.add_argument("models", nargs="*", metavar="[NAME=]MODEL",
                   help="students: run folder, exported folder, adapter or released .safetensors file")
    p.add_argument("--teacher", action="store_true", help="also evaluate the multi-step teacher (the base model)")
    p.add_argument("--world", choices=sorted(worlds()),
                   help="an embedded world's prompts, reference set, alignment, features and teacher "
                        "(each still overridable by its own option)")
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--coco", type=Path, help="COCO caption annotation file, e.g. captions_val2014.json")
    src.add_argument("--protocol", choices=PROTOCOLS, help="with --coco: coco2014-30k or coco2017-5k")
    src.add_argument("--prompts", type=Path, help="any prompt file (.txt, .jsonl, COCO .json), in file order")
    src.add_argument("--format", choices=FORMATS, default="auto", help="format of --prompts")
    src.add_argument("--num", type=int,
                     help="number of prompts (default: the protocol's, the whole file, or 200 for --world digits)")
    src.add_argument("--seed", type=int, default=0, help="draws the COCO captions; image i uses seed + i")
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics", help=f"comma-separated from {', '.join(METRICS)} (default fid,clip,pr; "
                                     "a world's: fid,pr,alignment)")
    m.add_argument("--features", help=f"feature space of FID and precision/recall: {INCEPTION} (default) "
                                      "or MODULE:FUNCTION of (N, H, W, C) uint8 images")
    m.add_argument("--ref", type=Path, help="reference image folder (or a stats .npz for FID alone)")
    m.add_argument("--ref-cache", type=Path, default=None,
                   help="folder for cached reference features (default ~/.cache/wadi/reference, or $WADI_CACHE)")
    m.add_argument("--clip-model", default=DEFAULT_CLIP, help=f"CLIP hub id or folder (default {DEFAULT_CLIP})")
    m.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds of precision/recall (default 3)")
    m.add_argument("--alignment", metavar="MODULE:FUNCTION",
                   help="alignment metric: a function (images N x H x W x C uint8, prompts) -> fraction")
    m.add_argument("--metric-batch-size", type=int, default=50)
    t = p.add_argument_group("teacher sampling")
    t.add_argument("--teacher-steps", type=int, default=25)
    t.add_argument("--teacher-guidance", type=float, default=3.0)
    t.add_argument("--teacher-scheduler", choices=["ddim", "dpm", "euler"],
                   help="the teacher's sampler (default: its process's: ddim for VP, euler for a flow)")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch")
    p.add_argument("--out", type=Path, required=True, help="output folder (images, prompts.jsonl, results.json)")
    p.add_argument("--force", action="store_true",
                   help=FORCE_HELP + "; a model's images of other settings there are made again")
    p.add_argument("--no-progress", action="store_true")
    add_base_args(p)
    add_device_args(p)
    p.set_defaults(func=run)


def prompt_set(args, world):
    if world is not None and not args.coco and not args.prompts:
        return world.prompts
    if bool(args.coco) == bool(args.prompts):
        raise ValueError("give the prompts: --coco ANNOTATIONS --protocol NAME, or --prompts FILE")
    if args.coco:
        if not args.protocol and not args.num:
            raise ValueError(f"--coco needs --protocol ({', '.join(PROTOCOLS)}) or --num")
        return coco_prompts(args.coco, args.num or PROTOCOLS[args.protocol], args.seed)
    return file_prompts(args.prompts, args.format, args.num)


def named_sources(models: list[str]) -> list[tuple[str, str]]:
    """[NAME=]SOURCE pairs; unnamed ones are 'student' when alone, else the source's file name."""
    pairs = []
    for spec in models:
        name, sep, source = spec.partition("=")
        if not sep or "/" in name or not name:
            name, source = ("student" if len(models) == 1 else Path(spec).stem), spec
        pairs.append((name, source))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names) or "teacher" in names:
        raise ValueError(f"model names must be distinct and not 'teacher' (got {', '.join(names)}); use NAME=MODEL")
    return pairs


def run(args) -> int:
    for value, option in ((args.batch_size, "--batch-size"), (args.metric_batch_size, "--metric-batch-size"),
                          (args.pr_k, "--pr-k"), (args.teacher_steps, "--teacher-steps")):
        positive(value, option)
    if args.num is not None:
        positive(args.num, "--num")
    finite(args.teacher_guidance, "--teacher-guidance")
    check_device(args.device)
    cache_dir = args.ref_cache or default_cache_dir()
    world = get_world(args.world).evaluation(args.num or 200, cache_dir) if args.world else None
    if world is not None:
        metrics = world_metric_settings(world, cache_dir, args.metrics, args.ref, args.features, args.alignment,
                                        args.clip_model, args.pr_k, args.metric_batch_size)
    else:
        metrics = metric_settings(args.metrics or "fid,clip,pr", args.ref, cache_dir, args.clip_model, args.pr_k,
                                  args.alignment, args.metric_batch_size, args.features or INCEPTION)
    prompts = prompt_set(args, world)
    check_seed(args.seed, "--seed", len(prompts.prompts))  # image i uses seed + i
    sources = named_sources(args.models)
    if not sources and not args.teacher:
        raise ValueError("nothing to evaluate: name a student MODEL and/or pass --teacher")
    dtype, spec = DTYPES[args.dtype], base_spec(args)
    if world is not None and not args.base:
        spec = spec.filled(**world.teacher.to_dict())
    entries = [Entry(name, student, Sampling.for_student(student.backbone))
               for name, student in ((name, load_student(src, spec, dtype, **student_options(args)))
                                     for name, src in sources)]
    if args.teacher:
        teacher = (teacher_for(entries[0].model, spec, dtype, args.allow_bin) if entries
                   else load_teacher(None, spec, dtype, args.allow_bin))
        scheduler = args.teacher_scheduler or teacher.backbone.process.default_sampler  # recorded by name
        entries.append(Entry("teacher", teacher, Sampling(False, args.teacher_steps, args.teacher_guidance, scheduler)))
    results = evaluate(entries, prompts, args.seed, args.out, metrics, args.batch_size, args.force,
                       not args.no_progress, args.device)
    if results:
        keys = ("fid", "clip_score", "precision", "recall", "alignment")
        for name, r in results["models"].items():
            print(json.dumps({"model": name, **{k: round(r[k], 4) for k in keys if k in r}}))
        print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
