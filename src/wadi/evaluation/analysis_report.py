"""The weight-space analysis written out: analysis.json, layers.csv, the plots and the
printed summary (wadi analyze)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from wadi.evaluation.analysis import Analysis

_CSV_FIELDS = ["name", "shape", "rows", "zero_rows", "norm_change_mean", "norm_change_std",
               "direction_change_mean", "direction_change_std", "full_rank", "rank_needed", "rank_fraction"]
_ENERGY_CURVES = 6  # layers drawn in energy.png


def dtype_note(teacher: dict, student: dict) -> str | None:
    """A warning when the two are stored at different precisions: the rounding of the
    coarser one then reads as a (small, full-rank) change of every layer."""
    dtypes = [sorted({str(t.dtype).removeprefix("torch.") for t in sd.values() if t.is_floating_point()})
              for sd in (teacher, student)]
    if dtypes[0] == dtypes[1]:
        return None
    return (f"note: teacher weights are {'/'.join(dtypes[0])}, student weights {'/'.join(dtypes[1])}; "
            "rounding counts as change, so unchanged layers show a small full-rank residual")


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


def _block(name: str) -> str:
    """The part of the network a layer belongs to, for colouring: down, mid, up or other."""
    for part in ("down_blocks", "mid_block", "up_blocks", "transformer_blocks"):
        if part in name:
            return part
    return "other"


def plot_changes(result: Analysis, path: Path) -> Path:
    """One point per layer: mean direction change against mean norm change, coloured by
    block; readable at any number of layers (Stable Diffusion has 282)."""
    from matplotlib.figure import Figure  # the object API needs no pyplot and renders with Agg

    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    tiny = 1e-12  # unchanged layers sit on the axes' floor of a log scale
    for block in ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "other"):
        layers = [l for l in result.layers if _block(l.name) == block]
        if layers:
            ax.scatter([max(l.norm_mean, tiny) for l in layers], [max(l.dir_mean, tiny) for l in layers], s=12,
                       alpha=0.7, label=f"{block} ({len(layers)})")
    values = [v for l in result.layers for v in (l.norm_mean, l.dir_mean) if v > 0]
    if values:  # identical models have nothing to put on a log scale
        lo, hi = min(values), max(values)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--", label="direction = norm")
    ax.set_xlabel("mean norm change |dn| / n of the layer's rows")
    ax.set_ylabel("mean direction change 1 - cos")
    s = result.summary()["layer_averaged"]
    ax.set_title(f"{len(result.layers)} layers; layer-averaged direction / norm: mean "
                 f"{_times(s['direction_change_mean'], s['norm_change_mean'])}, "
                 f"std {_times(s['direction_change_std'], s['norm_change_std'])}", fontsize="medium")
    ax.legend(fontsize="small")
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
