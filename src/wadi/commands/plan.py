"""`wadi plan`: memory per process of a distillation run, split into its parts (wadi.engine.plan)."""

from __future__ import annotations

import json

from wadi.models.archs import ARCHS


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory per process of a run: frozen base, adapters, optimizer, activations")
    p.add_argument("--model", required=True,
                   help=f"a built-in architecture ({', '.join(sorted(ARCHS))}) or a diffusers pipeline folder")
    p.add_argument("--resolution", type=int, default=1024, help="image size in pixels (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="per process (train.batch_size)")
    p.add_argument("--processes", type=int, default=1, help="every process of every machine")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], default="ddp")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16", help="train.mixed_precision")
    p.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing")
    p.add_argument("--student", default="lorad:256", metavar="KIND:RANK", help="default lorad:256")
    p.add_argument("--fake", default="lorad:32", metavar="KIND:RANK", help="default lorad:32")
    p.add_argument("--adam-8bit", action="store_true")
    p.add_argument("--ema", action="store_true", help="an EMA of the student")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes)")
    p.set_defaults(func=run)


def _adapter(text: str, role: str, kind):
    from wadi.adapters.core import AdapterConfig

    name, _, rank = text.partition(":")
    if not rank.isdigit():
        raise ValueError(f"--{role} must be KIND:RANK, e.g. lorad:64; got {text!r}")
    return AdapterConfig(name, int(rank), kind.targets[0 if role == "student" else 1])


def _denoiser(model: str):
    """An empty (meta-device) denoiser and its kind, from a built-in name or a folder."""
    import torch

    from wadi.models.archs import build, get_arch
    from wadi.models.backbones import check_model_path, detect_kind, get_kind

    if model in ARCHS:
        return build(model, "meta"), get_kind(get_arch(model).kind)
    check_model_path(model)
    kind = get_kind(detect_kind(model))
    import diffusers

    cls = getattr(diffusers, kind.denoiser)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(model, subfolder=kind.subfolder)), kind


def run(args) -> int:
    from wadi.engine.plan import VAE_FACTOR, plan

    for name in ("resolution", "batch", "processes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.resolution % VAE_FACTOR:
        raise ValueError(f"--resolution must be a multiple of {VAE_FACTOR}, got {args.resolution}")
    net, kind = _denoiser(args.model)
    p = plan(net, kind.name, _adapter(args.student, "student", kind), _adapter(args.fake, "fake", kind),
             args.resolution // VAE_FACTOR, args.batch, args.processes, args.parallel, args.precision,
             args.checkpointing, args.adam_8bit, args.ema)
    if args.json:
        print(json.dumps(p.to_dict()))
        return 0
    gib = 2**30
    print(f"{args.model} at {args.resolution} px, batch {args.batch} per process, {args.processes} process(es), "
          f"{args.parallel}, {args.precision}{', checkpointing' if args.checkpointing else ''}: per process")
    for part, value in p.to_dict().items():
        print(f"  {part:<12} {value / gib:8.2f} GiB")
    return 0
