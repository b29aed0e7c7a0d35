"""Memory benchmark: one WaDi iteration of our engine (student and fake model share the
teacher's frozen weights) against the authors' scheme (three full copies, hooked LoRaD).

Each scheme runs in a fresh process, so that its peak is its own: the process builds an
SD-shaped backbone (random weights), notes its memory (the load-only baseline), runs one
iteration, and reports
- parameters: bytes of every model's parameters and buffers, each storage counted once;
- saved: bytes autograd holds for backward (student and fake graphs), parameters excluded;
- peak over baseline: on the CPU the rise of the process's peak resident memory (VmHWM,
  reset after loading), on CUDA torch.cuda.max_memory_allocated over the allocation after
  loading; and that rise as a multiple of the denoiser's parameter bytes.

    python benchmarks/bench_memory.py                    # CPU, an SD-shaped UNet of 81M parameters
    python benchmarks/bench_memory.py --size sd15 --device cuda [--batch 16] [--checkpointing]
    python benchmarks/bench_memory.py --size sdxl --device cuda --schemes engine --checkpointing  # 1024 px
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# SD 1.5 (512 px) itself, and its shapes at 96/320 of the width (an 81M-parameter UNet, the
# latent of 256 px) with the ranks scaled alike, so that the adapters keep SD's share of the
# parameters (student 10.1%, fake 1.2%).
# SDXL's UNet itself at 1024 px (the sdxl-wadi preset's ranks), and at 512 / 256 px for a CPU.
SIZES = {"cpu": dict(width=96, latent=32, text_layers=1, rank_student=77, rank_fake=10),
         "sd15": dict(width=320, latent=64, text_layers=12, rank_student=256, rank_fake=32),
         "sdxl": dict(latent=128, text_layers=1, rank_student=128, rank_fake=32),
         "sdxl-512": dict(latent=64, text_layers=1, rank_student=128, rank_fake=32),
         "sdxl-256": dict(latent=32, text_layers=1, rank_student=128, rank_fake=32)}
SCHEMES = ("engine", "authors")
PROMPTS = ["a photo of a cat on a windowsill", "a red car on a mountain road", "a bowl of fruit",
           "an astronaut riding a horse"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["no", "fp16", "bf16"], help="default: fp16 on cuda, no (fp32) on cpu")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in student and fake")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="which to run (default: both)")
    ap.add_argument("--worker", choices=SCHEMES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "no")
    return args


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _storage_bytes(models) -> int:
    seen = {}
    for m in models:
        for t in (*m.parameters(), *m.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def worker(args) -> dict:
    from accelerate import Accelerator
    from authors_scheme import AuthorsScheme
    from common import SavedForBackward, sd_backbone, sdxl_backbone

    from wadi.adapters.core import AdapterConfig
    from wadi.engine.config import DistillConfig, TrainConfig
    from wadi.engine.distiller import Distiller
    from wadi.models.backbones import dtype_of

    size = SIZES[args.size]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    bb = (sdxl_backbone(size["latent"], size["text_layers"], Path(tmp.name)) if args.size.startswith("sdxl") else
          sd_backbone(size["width"], size["latent"], size["text_layers"], Path(tmp.name)))
    cfg = DistillConfig(student=AdapterConfig("lorad", size["rank_student"], "unet-student"),
                        fake=AdapterConfig("lorad", size["rank_fake"], "unet-fake"),
                        train=TrainConfig(batch_size=args.batch, mixed_precision=args.precision,
                                          gradient_checkpointing=args.checkpointing))
    acc = Accelerator(mixed_precision=args.precision, cpu=args.device == "cpu")
    dtype = dtype_of(args.precision)
    bb.to(acc.device, dtype)
    net_bytes = sum(p.numel() * p.element_size() for p in bb.net.parameters())
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _rss_peak_reset()
        base = _status_kb("VmRSS") * 1024
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    if args.worker == "engine":
        scheme = Distiller(cfg, bb, prompts, acc)
        models, step = [bb.net, *bb.text.values(), scheme.student.model, scheme.fake.model], scheme.train_step
        models = [m for m in models if isinstance(m, torch.nn.Module)]
    else:
        scheme = AuthorsScheme(cfg, bb, acc)
        if args.checkpointing:
            for net in (scheme.student, scheme.fake):
                net.enable_gradient_checkpointing()
        models = [bb.net, bb.text_encoder, scheme.student, scheme.fake]
        step = lambda: scheme.train_step(prompts, list(range(args.batch)))  # noqa: E731
    live = {t.untyped_storage().data_ptr() for m in models for t in (*m.parameters(), *m.buffers())}
    with SavedForBackward(live) as saved:
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
    return {"scheme": args.worker, "net_mb": net_bytes / 2**20, "params_mb": _storage_bytes(models) / 2**20,
            "saved_student_mb": saved.megabytes()[0], "saved_fake_mb": saved.megabytes()[1],
            "peak_over_load_mb": peak / 2**20, "peak_ratio": peak / net_bytes,
            "device": str(acc.device), "net_params_m": sum(p.numel() for p in bb.net.parameters()) / 1e6}


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from common import machine

    rows = []
    for scheme in args.schemes.split(","):
        if scheme not in SCHEMES:
            raise SystemExit(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", scheme]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        if done.returncode:
            raise SystemExit(f"{scheme} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    device = torch.device(args.device)
    print(f"{machine(device)} (the workers: {args.threads})")
    print(f"size {args.size} ({'SDXL' if args.size.startswith('sdxl') else 'SD-1.5'}-shaped UNet, "
          f"{rows[0]['net_params_m']:.1f}M parameters, "
          f"{rows[0]['net_mb']:.0f} MB), batch {args.batch}, precision {args.precision}, gradient checkpointing "
          f"{'on' if args.checkpointing else 'off'}; each scheme in its own process\n")
    columns = [("parameters MB", "params_mb", ".0f"), ("saved student MB", "saved_student_mb", ".1f"),
               ("saved fake MB", "saved_fake_mb", ".1f"), ("peak over load MB", "peak_over_load_mb", ".0f"),
               ("x net bytes", "peak_ratio", ".2f")]
    header = f"{'scheme':<9}" + "".join(f"{title:>{len(title) + 3}}" for title, _, _ in columns)
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['scheme']:<9}" + "".join(f"{row[key]:>{len(title) + 3}{fmt}}" for title, key, fmt in columns))
    if len(rows) == 2:
        print(f"\nauthors / engine: parameters {rows[1]['params_mb'] / rows[0]['params_mb']:.2f}x, peak over load "
              f"{rows[1]['peak_over_load_mb'] / rows[0]['peak_over_load_mb']:.2f}x; engine peak over load "
              f"{rows[0]['peak_ratio']:.2f}x the denoiser's bytes (target < 1.6)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
