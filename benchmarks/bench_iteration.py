"""Iteration benchmark: one WaDi training iteration of our engine against the authors' scheme.

Both train the same SD-1.5-shaped UNet (random weights; width and latent size scaled
down by default) from the same seed, on the same prompts:
- engine:  wadi.engine.distiller.Distiller.train_step (LoRaDLinear on the teacher's shared weights, scores each
           one batched forward of [uncond; cond]);
- authors: benchmarks/authors_scheme.AuthorsScheme (hooked LoRaD, four denoiser calls).
Before timing, the first iterations of both must give the same losses (equal work).
Then it times interleaved rounds (median wall-clock and process-CPU seconds per
iteration; on a shared CPU the CPU time is the steadier of the two) and measures memory:
the bytes autograd saves for backward per graph (student, fake), and on CUDA the peak
allocation of one iteration.

    python benchmarks/bench_iteration.py [--width 64] [--latent 32] [--batch 2]
        [--rank-student 64] [--rank-fake 8] [--rounds 8] [--threads 1] [--json out.json]
    python benchmarks/bench_iteration.py --full-sd15 --device cuda   # SD 1.5 itself, fp16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from authors_scheme import AuthorsScheme
from common import SavedForBackward, sd_backbone

from wadi.adapters.core import AdapterConfig
from wadi.engine.config import DistillConfig, TrainConfig
from wadi.engine.distiller import Distiller

PROMPTS = ["a photo of a cat on a windowsill", "a red car on a mountain road", "a bowl of fruit",
           "an astronaut riding a horse", "a lighthouse at night", "a dog on the table"]
SCHEMES = ("engine", "authors")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=64, help="first block's channels (SD 1.5: 320); multiple of 32")
    ap.add_argument("--latent", type=int, default=32, help="latent side (SD 1.5 at 512 px: 64)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank-student", type=int, default=64)
    ap.add_argument("--rank-fake", type=int, default=8)
    ap.add_argument("--text-layers", type=int, default=1, help="CLIP text encoder layers (CLIP-L: 12)")
    ap.add_argument("--full-sd15", action="store_true",
                    help="SD 1.5 itself: width 320, latent 64, ranks 256/32, 12 text layers")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", choices=["no", "fp16", "bf16"], help="default: fp16 on cuda, no (fp32) on cpu")
    ap.add_argument("--rounds", type=int, default=8, help="timed iterations per scheme, interleaved")
    ap.add_argument("--check-steps", type=int, default=2, help="untimed iterations whose losses must agree")
    # One thread: on a CPU shared with other processes, two threads per process thrash (a
    # width-32 iteration took 75 s on two threads under load, 7 s on one).
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (at most those available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.full_sd15:
        args.width, args.latent, args.rank_student, args.rank_fake, args.text_layers = 320, 64, 256, 32, 12
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "no")
    return args


def adapted_share(net: torch.nn.Module, names: list[str], latent: int) -> float:
    """The share of one UNet forward's FLOPs in the layers `names` (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        empty = type(net).from_config(net.config)
        x, text = torch.empty(1, 4, latent, latent), torch.empty(1, 77, net.config.cross_attention_dim)
        t = torch.tensor([999])
    with FlopCounterMode(display=False) as mode:
        empty(x, t, encoder_hidden_states=text)
    counts = {name.split(".", 1)[-1]: sum(ops.values()) for name, ops in mode.get_flop_counts().items()}
    return sum(counts.get(n, 0) for n in names) / counts["Global"]


def equal_work_bound(f_student: float, f_fake: float) -> float:
    """The authors' time over the engine's if time followed FLOPs (BENCHMARKS.md). In units of
    one forward: student forward and backward 2 + f_s, teacher scores 2, fake scores 2, fake
    forward and backward 2 + f_f; the authors add the discarded frozen matmul of each adapted
    layer, once in the student's forward, twice in the fake's scores, once in its training."""
    engine = 8 + f_student + f_fake
    return (engine + f_student + 3 * f_fake) / engine


def main() -> None:
    from accelerate import Accelerator

    args = parse_args()
    torch.set_num_threads(min(args.threads, os.cpu_count()))
    load_before = os.getloadavg()[0]  # other processes on a shared CPU distort every number
    cfg = DistillConfig(student=AdapterConfig("lorad", args.rank_student, "unet-student"),
                        fake=AdapterConfig("lorad", args.rank_fake, "unet-fake"),
                        train=TrainConfig(batch_size=args.batch, mixed_precision=args.precision, seed=args.seed))
    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(args.seed)
    bb = sd_backbone(args.width, args.latent, args.text_layers, Path(tmp.name))
    # One Accelerator per scheme: under fp16 each keeps its own gradient scaler.
    accs = [Accelerator(mixed_precision=args.precision, cpu=args.device == "cpu") for _ in SCHEMES]
    # Same seed, same initial angles. The authors' scheme comes first: the Distiller moves
    # the backbone to the device, and both must draw their angles on the CPU.
    torch.manual_seed(args.seed)
    authors = AuthorsScheme(cfg, bb, accs[1])
    torch.manual_seed(args.seed)
    engine = Distiller(cfg, bb, PROMPTS, accs[0])
    authors_steps = 0

    def authors_step():  # the same prompts and per-sample noise as the engine's step
        nonlocal authors_steps
        positions = list(range(authors_steps * args.batch, (authors_steps + 1) * args.batch))
        out = authors.train_step(engine.prompts.take(positions[0], args.batch), positions)
        authors_steps += 1
        return out

    steps = {"engine": engine.train_step, "authors": authors_step}
    cuda = accs[0].device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Equal work: the first iterations must give the same losses. The first student loss
    # is 0 (the fake model starts as the teacher), so the later ones carry the check. In
    # half precision the student loss, a small difference of two half-precision scores,
    # moves by several percent with the order of operations: the check is looser there.
    tol = 1e-3 if args.precision == "no" else 0.2
    for i in range(args.check_steps):
        e, a = steps["engine"](), steps["authors"]()
        print(f"check iteration {i + 1}: student loss {e['loss_student']:.6g} / {a['loss_student']:.6g}, "
              f"fake loss {e['loss_fake']:.6g} / {a['loss_fake']:.6g} (engine / authors)")
        for k in ("loss_student", "loss_fake"):
            if abs(e[k] - a[k]) > tol * abs(e[k]) + 1e-7:
                raise SystemExit(f"iteration {i + 1}: {k} differs beyond {tol:.0e} relative: not the same work")

    # Memory: one untimed iteration each. Parameters and buffers of every model are excluded.
    nets = [bb.net, bb.text_encoder, engine.student.model, engine.fake.model, authors.student, authors.fake]
    live = {t.untyped_storage().data_ptr() for m in nets for t in (*m.parameters(), *m.buffers())}
    saved, peak = {}, {}
    for name in SCHEMES:
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with SavedForBackward(live) as counter:
            steps[name]()
        saved[name] = counter.megabytes()
        if cuda:
            sync()
            peak[name] = (torch.cuda.max_memory_allocated() - before) / 2**20

    # A shared, noisy CPU: interleave (alternating which goes first) and keep the medians.
    wall, proc = {name: [] for name in SCHEMES}, {name: [] for name in SCHEMES}
    for i in range(args.rounds):
        for name in SCHEMES[i % 2:] + SCHEMES[:i % 2]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            sync()
            wall[name].append(time.perf_counter() - t0)
            proc[name].append(time.process_time() - c0)
    rows = [dict(scheme=name, s_per_iter=statistics.median(wall[name]), cpu_s_per_iter=statistics.median(proc[name]),
                 saved_student_mb=saved[name][0], saved_fake_mb=saved[name][1], peak_mb=peak.get(name),
                 wall=wall[name], cpu=proc[name]) for name in SCHEMES]
    for row in rows:
        row["ratio"] = row["s_per_iter"] / rows[0]["s_per_iter"]
        row["cpu_ratio"] = row["cpu_s_per_iter"] / rows[0]["cpu_s_per_iter"]

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    load = (load_before, os.getloadavg()[0])
    print(f"\ndevice {accs[0].device} ({torch.cuda.get_device_name() if cuda else cpu}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, 1-min load average {load[0]:.1f} before / {load[1]:.1f} after "
          f"on {os.cpu_count()} CPUs")
    print(f"UNet block_out_channels {tuple(bb.net.config.block_out_channels)}, latent {args.latent}x{args.latent}, "
          f"batch {args.batch}, precision {args.precision}, student LoRaD r={args.rank_student} on "
          f"{len(engine.student.target_names)} layers, fake r={args.rank_fake} on {len(engine.fake.target_names)}; "
          f"{args.rounds} interleaved rounds, medians\n")
    # Host CPU time says nothing about GPU work; peak allocation exists only on CUDA.
    columns = [("s/iter", "s_per_iter", ".3f"), ("ratio", "ratio", ".2f")]
    columns += [("peak MB", "peak_mb", ".1f")] if cuda else [("cpu s/iter", "cpu_s_per_iter", ".3f"),
                                                            ("ratio", "cpu_ratio", ".2f")]
    columns += [("saved student MB", "saved_student_mb", ".1f"), ("saved fake MB", "saved_fake_mb", ".1f")]
    header = f"{'scheme':<9}" + "".join(f"{title:>{len(title) + 3}}" for title, _, _ in columns)
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['scheme']:<9}" + "".join(f"{row[key]:>{len(title) + 3}{fmt}}" for title, key, fmt in columns))
    print("\nsaved = bytes autograd holds for backward in that graph (one storage counted once), parameters and "
          "buffers excluded" + ("; peak = max allocated during one iteration minus allocated before" if cuda else ""))
    shares = (adapted_share(bb.net, engine.student.target_names, args.latent),
              adapted_share(bb.net, engine.fake.target_names, args.latent))
    bound = equal_work_bound(*shares)
    print(f"authors / engine: {rows[1]['ratio']:.2f}x wall-clock"
          + ("" if cuda else f", {rows[1]['cpu_ratio']:.2f}x process CPU")
          + f"; the equal-work bound: {bound:.2f}x (the adapted layers' share of a forward's FLOPs: student "
            f"{shares[0]:.2f}, fake {shares[1]:.2f})")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=str(accs[0].device), cpu=cpu, torch=torch.__version__,
                           threads=torch.get_num_threads(), load_average=load, rows=rows,
                           adapted_share=dict(student=shares[0], fake=shares[1]), equal_work_bound=bound), f, indent=2)

if __name__ == "__main__":
    main()
