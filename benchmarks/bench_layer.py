"""Layer benchmark: forward + backward of one nn.Linear under each adapter.

For one nn.Linear(dim, dim) on `tokens` tokens (x requires grad, as inside a network) it
measures, per method and rank:
- the median time of forward + backward over interleaved rounds (and the fastest
  round: other processes only ever add time, so on a busy CPU the minimum is the
  steadier estimate of the method's own cost), and
- the memory autograd saves for backward during the forward.

Methods: the frozen plain layer, full fine-tuning, LoRA and DoRA (peft, through
wadi.adapters.core.attach), our LoRaD (wadi.adapters.lorad.LoRaDLinear, through attach) and the
authors' hook scheme (benchmarks/authors_scheme.HookLoRaD, the baseline).

    python benchmarks/bench_layer.py [--tokens 4096] [--dim 1280] [--ranks 64 256]
                                     [--rounds 15] [--device cpu] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import OrderedDict

import torch
import torch.nn as nn
from authors_scheme import HookLoRaD

from wadi.adapters.core import AdapterConfig, attach


def build(kind: str, rank: int | None, base: nn.Linear) -> nn.Module:
    """A one-layer model (a copy of `base` named 'layer') with the adapter `kind` attached."""
    model = nn.Sequential(OrderedDict(layer=base))
    if kind == "plain":
        return model.requires_grad_(False)
    attach(model, AdapterConfig(kind=kind, rank=rank, targets={"include": ["layer"]}))
    if kind == "lorad":
        # theta_a starts at zero (Theta = 0); random angles make the rotation real work
        # and the equality check against the hook scheme meaningful.
        with torch.no_grad():
            model.layer.theta_a.normal_(0, 0.5)
    return model


def clear_grads(model: nn.Module, x: torch.Tensor) -> None:
    # set_to_none, as optimizer.zero_grad() does: every step allocates fresh gradients.
    for p in model.parameters():
        p.grad = None
    x.grad = None


def step(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    model(x).backward(grad_out)
    clear_grads(model, x)


def saved_bytes(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[int, int]:
    """(extra, total) bytes autograd saves in one forward, counted once per storage.

    total: every distinct storage saved for backward, the input x and the module's own
    parameters included. extra: total minus the storages of x and of the parameters,
    i.e. what the method holds alive only for backward.
    """
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.backward(grad_out)
    clear_grads(model, x)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own.add(x.untyped_storage().data_ptr())
    total = sum(saved.values())
    return total - sum(n for ptr, n in saved.items() if ptr in own), total


def check_equal_work(lorad: nn.Module, hook: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """LoRaD and the hook scheme must give the same output and gradients."""
    results = []
    for model in (lorad, hook):
        y = model(x)
        y.backward(grad_out)
        grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
        results.append([y.detach()] + [g.clone() for g in grads])
        clear_grads(model, x)
    for name, a, b in zip(("y", "dx", "dtheta_a", "dtheta_b"), *results, strict=True):
        # The closed-form backward and autograd sum in different orders: compare to scale.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=f"{name} differs")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (at most those available)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(min(args.threads, os.cpu_count()))
    # Other processes on a shared CPU distort every number: record how busy it was.
    load_before = os.getloadavg()[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = nn.Linear(args.dim, args.dim, device=device)
    x = torch.randn(1, args.tokens, args.dim, device=device, requires_grad=True)
    grad_out = torch.randn(1, args.tokens, args.dim, device=device)

    def copy_of_base() -> nn.Linear:
        # Every method gets its own copy of the same weights.
        layer = nn.Linear(args.dim, args.dim, device=device)
        layer.load_state_dict(base.state_dict())
        return layer

    methods = {("plain", None): build("plain", None, copy_of_base()),
               ("full", None): build("full", None, copy_of_base())}
    for r in args.ranks:
        for kind in ("lora", "dora", "lorad"):
            methods[(kind, r)] = build(kind, r, copy_of_base())
        lorad = methods[("lorad", r)].layer
        methods[("hook", r)] = HookLoRaD(copy_of_base(), lorad.theta_a.detach(), lorad.theta_b.detach())
        check_equal_work(methods[("lorad", r)], methods[("hook", r)], x, grad_out)

    memory = {key: saved_bytes(m, x, grad_out) for key, m in methods.items()}

    # A shared, noisy CPU: warm up once, then interleave the methods round-robin (starting
    # each round one method later) so a slow spell hits all of them, and keep the median.
    for m in methods.values():
        step(m, x, grad_out)
    keys = list(methods)
    times: dict[tuple, list[float]] = {k: [] for k in keys}
    for i in range(args.rounds):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            sync()
            t0 = time.perf_counter()
            step(methods[key], x, grad_out)
            sync()
            times[key].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    best = {k: 1e3 * min(v) for k, v in times.items()}

    cpu = cpu_name()
    load = (load_before, os.getloadavg()[0])
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else cpu}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"1-min load average {load[0]:.1f} before / {load[1]:.1f} after on {os.cpu_count()} CPUs")
    print(f"nn.Linear({args.dim}, {args.dim}), x {tuple(x.shape)} fp32 requiring grad, "
          f"{args.rounds} rounds, median per method")
    print("saved extra = saved for backward minus x and the module's parameters; total includes them\n")
    header = (f"{'method':<8}{'rank':>5}{'median ms':>11}{'/plain':>8}{'/full':>7}{'min ms':>9}"
              f"{'saved extra MB':>16}{'saved total MB':>16}")
    print(header)
    print("-" * len(header))
    rows = []
    for (kind, r) in keys:
        extra, total = memory[(kind, r)]
        row = dict(method=kind, rank=r, ms=ms[(kind, r)], vs_plain=ms[(kind, r)] / ms[("plain", None)],
                   vs_full=ms[(kind, r)] / ms[("full", None)], min_ms=best[(kind, r)],
                   saved_extra_mb=extra / 2**20, saved_total_mb=total / 2**20)
        rows.append(row)
        print(f"{kind:<8}{r or '-':>5}{row['ms']:>11.1f}{row['vs_plain']:>8.2f}{row['vs_full']:>7.2f}"
              f"{row['min_ms']:>9.1f}{row['saved_extra_mb']:>16.1f}{row['saved_total_mb']:>16.1f}")

    # The extra bytes of both LoRaD and full fine-tuning can be zero, so the memory ratio
    # is taken on the total saved bytes.
    headline = {}
    print()
    for r in args.ranks:
        h = dict(lorad_over_full_time=ms[("lorad", r)] / ms[("full", None)],
                 hook_over_lorad_time=ms[("hook", r)] / ms[("lorad", r)],
                 lorad_over_full_saved=memory[("lorad", r)][1] / memory[("full", None)][1],
                 lorad_over_full_min_time=best[("lorad", r)] / best[("full", None)],
                 hook_over_lorad_min_time=best[("hook", r)] / best[("lorad", r)])
        headline[r] = h
        print(f"rank {r}: LoRaD/full time {h['lorad_over_full_time']:.2f} (target <= 1.1; "
              f"min-based {h['lorad_over_full_min_time']:.2f}), "
              f"hook/LoRaD time {h['hook_over_lorad_time']:.2f} (target >= 1.25; "
              f"min-based {h['hook_over_lorad_min_time']:.2f}), "
              f"LoRaD/full saved total {h['lorad_over_full_saved']:.2f} (target <= 1.1)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=str(device), cpu=cpu, torch=torch.__version__,
                           threads=torch.get_num_threads(), load_average=load, rows=rows,
                           headline=headline), f, indent=2)


if __name__ == "__main__":
    main()
