"""`wadi analyze`: the weight-space analysis of SPEC section 1 for a teacher and a student.

Writes OUT/analysis.json (summary and per layer), OUT/layers.csv, OUT/changes.png (per
layer: mean direction change vs mean norm change), OUT/energy.png (cumulative energy of
the direction residual vs rank fraction) and, with --hybrids, the two norm/direction swap
models under OUT/hybrids/.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..analysis import (DEFAULT_ENERGY, HYBRIDS, Analysis, analyse, check_threshold, load_weights,
                        make_hybrid, save_weights)

_CSV_FIELDS = ["name", "shape", "rows", "zero_rows", "norm_change_mean", "norm_change_std",
               "direction_change_mean", "direction_change_std", "full_rank", "rank_needed", "rank_fraction"]
_ENERGY_CURVES = 6  # layers drawn in energy.png


def register(sub) -> None:
    p = sub.add_parser("analyze", help="norm vs direction change of a student's weights against its teacher's")
    p.add_argument("teacher", help="diffusers model folder, pipeline folder (unet/ or transformer/) "
                                   "or .safetensors state dict")
    p.add_argument("student", help="the same, for the student (same architecture)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--energy", type=float, default=DEFAULT_ENERGY,
                   help="share of the direction-residual energy the rank fraction keeps (default 0.93)")
    p.add_argument("--hybrids", action="store_true",
                   help="also write the student with the teacher's directions and the student with "
                        "the teacher's norms to OUT/hybrids/")
    p.set_defaults(func=run)


def run(args) -> int:
    # Cheap checks first: loading and analysing a real UNet takes minutes.
    check_threshold(args.energy)
    check_out(args.out, args.force)
    teacher, student = load_weights(args.teacher), load_weights(args.student)
    result = analyse(teacher.state_dict, student.state_dict, args.energy, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [write_json(result, args.out / "analysis.json", args.teacher, args.student),
               write_csv(result, args.out / "layers.csv"),
               plot_changes(result, args.out / "changes.png"),
               plot_energy(result, args.out / "energy.png")]
    if args.hybrids:
        for name, (norms, directions) in HYBRIDS.items():
            hybrid = make_hybrid(teacher.state_dict, student.state_dict, norms, directions)
            written.append(save_weights(hybrid, args.out / "hybrids" / name, like=student))
    print(format_summary(result.summary()))
    note = dtype_note(teacher.state_dict, student.state_dict)
    if note:
        print(note)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def dtype_note(teacher: dict, student: dict) -> str | None:
    """A warning when the two are stored at different precisions: the rounding of the
    coarser one then reads as a (small, full-rank) change of every layer."""
    dtypes = [sorted({str(t.dtype).removeprefix("torch.") for t in sd.values() if t.is_floating_point()})
              for sd in (teacher, student)]
    if dtypes[0] == dtypes[1]:
        return None
    return (f"note: teacher weights are {'/'.join(dtypes[0])}, student weights {'/'.join(dtypes[1])}; "
            "rounding counts as change, so unchanged layers show a small full-rank residual")


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --force to write into it")


def write_json(result: Analysis, path: Path, teacher, student) -> Path:
    path.write_text(json.dumps({"teacher": str(teacher), "student": str(student), **result.to_dict()}, indent=1))
    return path


def write_csv(result: Analysis, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for layer in result.layers:
            row = layer.to_dict()
            writer.writerow({**row, "shape": "x".join(map(str, row["shape"]))})
    return path


def plot_changes(result: Analysis, path: Path) -> Path:
    from matplotlib.figure import Figure  # the object API needs no pyplot and renders with Agg

    n = len(result.layers)
    x = list(range(n))
    fig = Figure(figsize=(min(max(6, 0.12 * n + 3), 40), 4.5), layout="constrained")
    ax = fig.subplots()
    dirs, norms = [l.dir_mean for l in result.layers], [l.norm_mean for l in result.layers]
    ax.bar([i - 0.2 for i in x], dirs, width=0.4, label="direction change 1 - cos")
    ax.bar([i + 0.2 for i in x], norms, width=0.4, label="norm change |dn| / n")
    if any(v > 0 for v in dirs + norms):  # identical models have nothing to put on a log scale
        ax.set_yscale("log")  # the two differ by an order of magnitude or more
    ax.set_xlabel("layer (state-dict order; names in layers.csv)")
    ax.set_ylabel("mean over the layer's rows")
    s = result.summary()["layer_averaged"]
    ax.set_title("direction vs norm change, layer-averaged: mean "
                 f"{_times(s['direction_change_mean'], s['norm_change_mean'])}, "
                 f"std {_times(s['direction_change_std'], s['norm_change_std'])}")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def plot_energy(result: Analysis, path: Path) -> Path:
    from matplotlib.figure import Figure

    changed = [l for l in result.layers if l.rank_needed]
    # A few layers spread over the depth of the model.
    step = max(1, len(changed) // _ENERGY_CURVES)
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for layer in changed[::step][:_ENERGY_CURVES]:
        k = layer.energy.numel()
        ax.plot([0] + [(i + 1) / k for i in range(k)], [0] + layer.energy.tolist(), label=layer.name)
    ax.axhline(result.threshold, color="k", linestyle="--", linewidth=1, label=f"{result.threshold:.0%} energy")
    median = result.summary()["rank_fraction_median"]
    if median is not None:
        ax.axvline(median, color="grey", linestyle=":", linewidth=1, label=f"median rank fraction {median:.2f}")
    ax.set_xlabel("rank fraction k / min(out, in)")
    ax.set_ylabel("cumulative energy of the direction residual")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize="x-small", loc="lower right")
    fig.savefig(path, dpi=120)
    return path


def format_summary(s: dict) -> str:
    def line(label: str, r: dict) -> str:
        mean = r["direction_change_mean"], r["norm_change_mean"]
        std = r["direction_change_std"], r["norm_change_std"]
        return (f"  {label:<15} mean {_times(*mean)} ({_num(mean[0])} vs {_num(mean[1])}), "
                f"std {_times(*std)} ({_num(std[0])} vs {_num(std[1])})")

    median = s["rank_fraction_median"]
    energy = (f"{s['energy_threshold']:.0%} of the direction-residual energy: median rank fraction "
              f"{median:.3f} (mean {s['rank_fraction_mean']:.3f}) over {s['changed_layers']} changed layers"
              if median is not None else "no layer changed direction: no residual energy")
    return "\n".join([
        f"{s['layers']} layers, {s['rows']} rows ({s['zero_rows']} zero teacher rows left out)",
        "direction change / norm change:",
        line("layer-averaged:", s["layer_averaged"]),
        line("pooled rows:", s["pooled"]),
        energy,
    ])


def _times(a: float | None, b: float | None) -> str:
    """a / b as "12.3x"; a pure rotation (b = 0) reads "inf"."""
    if a is None or b is None or (a == 0 and b == 0):
        return "n/a"
    return "inf" if b == 0 else f"{a / b:.3g}x"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
