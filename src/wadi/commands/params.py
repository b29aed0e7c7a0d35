"""`wadi params`: trainable-parameter counts of an adapter on a built-in architecture."""

from __future__ import annotations

import json

from wadi.adapters.core import ADAPTERS, AdapterConfig, attach
from wadi.models.archs import ARCHS, build, get_arch
from wadi.models.backbones import get_kind


def register(sub) -> None:
    p = sub.add_parser("params", help="count an adapter's trainable parameters (no weights needed)")
    p.add_argument("--model", required=True, choices=sorted(ARCHS))
    p.add_argument("--role", default="student", choices=["student", "fake"])
    p.add_argument("--adapter", default="lorad", choices=ADAPTERS)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def count(model_name: str, role: str, kind: str, rank: int) -> dict:
    arch = get_arch(model_name)
    model = build(arch.name, device="meta")  # no memory, no weights
    total = sum(p.numel() for p in model.parameters())
    preset = get_kind(arch.kind).targets[0 if role == "student" else 1]
    adapter = attach(model, AdapterConfig(kind=kind, rank=rank, targets=preset))
    trainable = adapter.num_trainable()
    return {"model": arch.name, "role": role, "adapter": kind, "rank": rank, "targets": preset,
            "layers": len(adapter.target_names), "trainable": trainable, "total": total,
            "fraction": trainable / total}


def run(args) -> int:
    r = count(args.model, args.role, args.adapter, args.rank)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} {r['role']} {r['adapter']} r={r['rank']}: {r['layers']} layers, "
              f"{r['trainable'] / 1e6:.2f}M trainable of {r['total'] / 1e6:.2f}M ({100 * r['fraction']:.1f}%)")
    return 0
