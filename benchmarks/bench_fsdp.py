"""Frozen-base memory per process: train.parallel=ddp against fsdp2, two CPU processes (gloo).

Each mode runs under `torchrun --nproc_per_node 2` in its own processes: every rank builds
the same SD-1.5-shaped backbone (random weights, one seed), the engine (one denoiser with
the student's and the fake model's LoRaD adapters) and runs one training step. A rank
reports
- held: bytes of frozen denoiser weights it holds between uses (its shards under fsdp2),
  read from its tensors after the step;
- peak: the most frozen bytes it held at any block's start during the step (a forward
  pre-hook after FSDP's own: the gathered block's whole weights plus every shard).

    python benchmarks/bench_fsdp.py                 # width 64 (a 36M-parameter UNet), latent 32
    python benchmarks/bench_fsdp.py --width 320 --latent 64   # SD 1.5's UNet itself
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODES = ("ddp", "fsdp2")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=64, help="the UNet's first block width (SD 1.5: 320)")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="per process")
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args) -> None:
    from accelerate import Accelerator, PartialState
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, str(Path(__file__).parent))
    from common import sd_backbone
    from wadi.adapters.core import AdapterConfig
    from wadi.engine.config import DistillConfig, TrainConfig
    from wadi.engine.distiller import Distiller
    from wadi.engine.parallel import blocks, frozen_bytes

    torch.set_num_threads(1)
    PartialState(cpu=True)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    bb = sd_backbone(args.width, args.latent, 1, Path(tmp.name))
    cfg = DistillConfig(student=AdapterConfig("lorad", 32, "unet-student"), fake=AdapterConfig("lorad", 8, "unet-fake"),
                        train=TrainConfig(batch_size=args.batch, parallel=args.worker))
    d = Distiller(cfg, bb, ["a photo of a cat", "a red car"], acc)
    net = bb.net
    held = frozen_bytes(net)
    peak = [held]

    sharded = any(isinstance(p, DTensor) for p in net.parameters())

    def resident(module, inputs):
        # Gathered weights are plain tensors in their modules while they run; the shards stay.
        if sharded:
            gathered = sum(p.numel() * p.element_size() for p in net.parameters()
                           if not p.requires_grad and not isinstance(p, DTensor))
            peak[0] = max(peak[0], held + gathered)

    for b in blocks(net):
        b.register_forward_pre_hook(resident)
    d.train_step()
    row = {"mode": args.worker, "rank": acc.process_index, "held": frozen_bytes(net), "peak": peak[0],
           "whole": sum(p.numel() * p.element_size() for p in net.parameters() if not p.requires_grad)}  # global sizes
    rows = [None] * acc.num_processes
    torch.distributed.all_gather_object(rows, row)
    if acc.is_main_process:
        print("ROWS " + json.dumps(rows), flush=True)


def main(args) -> None:
    results = {}
    for mode in MODES:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(args.port), __file__, "--worker", mode, "--width", str(args.width), "--latent", str(args.latent),
               "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("ROWS ")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(line[5:])
    whole = results["ddp"][0]["whole"]
    print(f"frozen UNet weights: {whole / 2**20:.1f} MiB (width {args.width}, latent {args.latent}, batch "
          f"{args.batch} per process, 2 processes, gloo)")
    print(f"{'rank':>4} | {'ddp held':>10} {'ddp peak':>10} | {'fsdp2 held':>10} {'fsdp2 peak':>10} | fsdp2/ddp peak")
    for r in range(2):
        a, b = results["ddp"][r], results["fsdp2"][r]
        print(f"{r:>4} | {a['held'] / 2**20:>7.1f}MiB {a['peak'] / 2**20:>7.1f}MiB | {b['held'] / 2**20:>7.1f}MiB "
              f"{b['peak'] / 2**20:>7.1f}MiB | {b['peak'] / a['peak']:.2f}")


if __name__ == "__main__":
    a = parse_args()
    worker(a) if a.worker else main(a)
