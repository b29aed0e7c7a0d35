"""Weight-space analysis of a one-step student against its teacher (docs/method.md).

Works on state dicts, so no model class is needed: a released merged student (a plain
safetensors state dict) is analyzed as it is. Analysed tensors: every floating tensor
with 2 or more dimensions whose name ends in "weight", viewed as rows, one per output
unit: a Linear weight (out x in) as it is, a conv weight (out x in x kh x kw) as
out x (in*kh*kw). Embedding tables are 2-D too and are analyzed alike (one row per
entry). 1-D tensors (biases, norm scales) have no rows and are skipped.

Per row, with t the teacher row and s the student row:
    norm change       | ||s|| - ||t|| | / ||t||
    direction change  1 - cos(s, t)
A zero teacher row has neither a relative change nor a direction: such rows are left out
of the statistics and counted as `zero_rows`. A zero student row counts as orthogonal
(cos = 0).

Aggregation. Per layer: mean and population std over its rows. Over all layers, the
headline (`layer_averaged`) is the paper's reading, "over all layers the mean direction
change is 22x the mean norm change, its std 10x": the mean over layers of the per-layer
means (and of the per-layer stds), every layer counting once as in the paper's per-layer
figures; ratio = direction / norm. `pooled` takes all rows of all layers as one
population instead (big layers weigh more). Both are reported.

Direction residual per layer: D = rows(W_s)/||rows|| - rows(W_t)/||rows||. With its
singular values s_i the cumulative energy is E(k) = sum_{i<=k} s_i^2 / sum_i s_i^2; the
rank fraction for a threshold (the paper's 0.93) is the smallest k with E(k) >= threshold,
divided by the full rank min(out, in*kh*kw). Layers whose D is zero up to rounding
(unchanged or only rescaled rows) need rank 0 and are left out of the rank-fraction median.

Swap hybrids: the student with every analyzed row rebuilt as
w = ||w_norm_source|| * w_dir_source / ||w_dir_source||; everything else is the student's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from wadi.files.weights import check_fits

EPS = 1e-12  # row norms at or below this count as zero
DEFAULT_ENERGY = 0.93
# Energies are float64 sums: "reaches the threshold" allows this slack for rounding.
_ROUNDING = 1e-9
# A residual whose RMS row norm (about the angle in radians) is below this is rounding of
# the weights (float32 keeps ~1e-7 relative), not a change of direction: no residual.
_NOISE = 1e-6
# name: (norms from, directions from)
HYBRIDS = {
    "teacher_dir_student_norm": ("student", "teacher"),
    "student_dir_teacher_norm": ("teacher", "student"),
}
StateDict = Mapping[str, torch.Tensor]


# --- which tensors, and their rows ------------------------------------------------

def state_dict_of(x: nn.Module | StateDict) -> dict[str, torch.Tensor]:
    return dict(x.state_dict()) if isinstance(x, nn.Module) else dict(x)


def analysed_names(state_dict: StateDict) -> list[str]:
    return [n for n, t in state_dict.items()
            if n.endswith("weight") and t.ndim >= 2 and t.is_floating_point()]


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """out x (everything else), in float64."""
    return weight.detach().reshape(weight.shape[0], -1).to(torch.float64)


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norms; zero rows stay zero."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(EPS)


def row_changes(teacher_rows: torch.Tensor, student_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm change and direction change of every row whose teacher row is not zero.

    1 - cos is taken as ||u_s - u_t||^2 / 2 for the unit rows u: equal rows give exactly 0
    and small angles lose nothing to cancellation (1 - cos would)."""
    nt, ns = teacher_rows.norm(dim=1), student_rows.norm(dim=1)
    keep = nt > EPS
    norm_change = (ns[keep] - nt[keep]).abs() / nt[keep]
    half_sq = (unit_rows(student_rows) - unit_rows(teacher_rows)).square().sum(1) / 2
    dir_change = torch.where(ns > EPS, half_sq, 1.0)  # a vanished student row: orthogonal
    return norm_change, dir_change[keep]


def squared_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """s_i^2, largest first, as the eigenvalues of the smaller Gram matrix: one matmul and
    a symmetric eigensolve run many times faster than svdvals on CPU, and in float64 the
    energies are exact to ~1e-16 of their total."""
    m = matrix.to(torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # rounding can dip below 0


def cumulative_energy(residual: torch.Tensor) -> torch.Tensor:
    """E(k) for k = 1..min(out, in); all zeros when the residual is no more than rounding."""
    if residual.square().sum() <= residual.shape[0] * _NOISE**2:
        return torch.zeros(min(residual.shape), dtype=torch.float64)
    s2 = squared_singular_values(residual)
    return s2.cumsum(0) / s2.sum()


def rank_for_energy(energy: torch.Tensor, threshold: float) -> int:
    """Smallest k with E(k) >= threshold (E non-decreasing); 0 when there is no energy."""
    if energy.numel() == 0 or energy[-1] <= 0:
        return 0
    return min(int((energy < threshold - _ROUNDING).sum()) + 1, energy.numel())


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")


# --- the analysis -----------------------------------------------------------------

@dataclass
class LayerStats:
    name: str
    shape: tuple[int, ...]
    rows: int  # rows in the statistics: those with a non-zero teacher row
    zero_rows: int
    norm_mean: float
    norm_std: float
    dir_mean: float
    dir_std: float
    full_rank: int  # min(out, in*kh*kw)
    rank_needed: int  # smallest k keeping the threshold's share of the residual energy
    energy: torch.Tensor = field(repr=False)  # E(k), k = 1..full_rank

    @property
    def rank_fraction(self) -> float:
        return self.rank_needed / self.full_rank

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rows": self.rows, "zero_rows": self.zero_rows,
                "norm_change_mean": _finite(self.norm_mean), "norm_change_std": _finite(self.norm_std),
                "direction_change_mean": _finite(self.dir_mean), "direction_change_std": _finite(self.dir_std),
                "full_rank": self.full_rank, "rank_needed": self.rank_needed, "rank_fraction": self.rank_fraction}


def analyze_layer(name: str, teacher_weight: torch.Tensor, student_weight: torch.Tensor,
                  threshold: float = DEFAULT_ENERGY) -> LayerStats:
    t, s = as_rows(teacher_weight), as_rows(student_weight)
    norm_change, dir_change = row_changes(t, s)
    energy = cumulative_energy(unit_rows(s) - unit_rows(t))
    return LayerStats(name, tuple(teacher_weight.shape), norm_change.numel(), t.shape[0] - norm_change.numel(),
                      *_mean_std(norm_change), *_mean_std(dir_change),
                      energy.numel(), rank_for_energy(energy, threshold), energy)


@dataclass
class Analysis:
    layers: list[LayerStats]
    threshold: float

    def summary(self) -> dict:
        used = [l for l in self.layers if l.rows]  # layers whose teacher is all zero have no statistics
        changed = [l.rank_fraction for l in self.layers if l.rank_needed]
        averages = [_layer_average(used, a) for a in ("norm_mean", "norm_std", "dir_mean", "dir_std")]
        return {"layers": len(self.layers), "rows": sum(l.rows for l in self.layers),
                "zero_rows": sum(l.zero_rows for l in self.layers),
                "layer_averaged": _ratios(*averages),
                "pooled": _ratios(*_pooled(used, "norm"), *_pooled(used, "dir")),
                "energy_threshold": self.threshold, "changed_layers": len(changed),
                "rank_fraction_median": statistics.median(changed) if changed else None,
                "rank_fraction_mean": statistics.fmean(changed) if changed else None}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "layers": [l.to_dict() for l in self.layers]}


def analyze(teacher: nn.Module | StateDict, student: nn.Module | StateDict,
            threshold: float = DEFAULT_ENERGY, progress: bool = False) -> Analysis:
    """Analyze every weight of two models (or state dicts) of one architecture."""
    check_threshold(threshold)
    teacher, student = state_dict_of(teacher), state_dict_of(student)
    check_fits(student, teacher, "the student does not fit the teacher")
    names = analysed_names(teacher)
    if not names:
        raise ValueError("nothing to analyze: no floating tensor of 2+ dimensions named '*weight'")
    layers = [analyze_layer(n, teacher[n], student[n], threshold)
              for n in tqdm(names, desc="analyze", unit="layer", disable=not progress)]
    return Analysis(layers, threshold)


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return math.nan, math.nan
    return x.mean().item(), x.std(correction=0).item()


def _layer_average(layers: list[LayerStats], attr: str) -> float:
    return statistics.fmean(getattr(l, attr) for l in layers) if layers else math.nan


def _pooled(layers: list[LayerStats], which: str) -> tuple[float, float]:
    """Mean and std of all rows of all layers, from the per-layer counts, means and stds."""
    n = sum(l.rows for l in layers)
    if not n:
        return math.nan, math.nan
    ms = [(l.rows, getattr(l, f"{which}_mean"), getattr(l, f"{which}_std")) for l in layers]
    mean = sum(k * m for k, m, _ in ms) / n
    second = sum(k * (s * s + m * m) for k, m, s in ms) / n  # law of total variance
    return mean, math.sqrt(max(second - mean * mean, 0.0))


def _ratios(norm_mean: float, norm_std: float, dir_mean: float, dir_std: float) -> dict:
    return {"norm_change_mean": _finite(norm_mean), "norm_change_std": _finite(norm_std),
            "direction_change_mean": _finite(dir_mean), "direction_change_std": _finite(dir_std),
            "mean_ratio": _finite(_ratio(dir_mean, norm_mean)), "std_ratio": _finite(_ratio(dir_std, norm_std))}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (math.inf if a > 0 else math.nan)


def _finite(x: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return x if math.isfinite(x) else None


# --- swap hybrids -----------------------------------------------------------------

def swap_rows(norm_source: torch.Tensor, direction_source: torch.Tensor) -> torch.Tensor:
    """Rows with the norms of one weight and the directions of the other (float64).
    A zero direction row gives a zero row."""
    norms = as_rows(norm_source).norm(dim=1, keepdim=True)
    return (norms * unit_rows(as_rows(direction_source))).reshape(direction_source.shape)


def make_hybrid(teacher: nn.Module | StateDict, student: nn.Module | StateDict,
                norms_from: str, directions_from: str) -> dict[str, torch.Tensor]:
    """The student's state dict with every analyzed weight rebuilt from the norms of
    `norms_from` and the directions of `directions_from` ("teacher" or "student")."""
    models = {"teacher": state_dict_of(teacher), "student": state_dict_of(student)}
    if {norms_from, directions_from} - models.keys():
        raise ValueError("norms and directions come from 'teacher' or 'student', "
                         f"got {norms_from!r}, {directions_from!r}")
    check_fits(models["student"], models["teacher"], "the student does not fit the teacher")
    hybrid = dict(models["student"])
    for name in analysed_names(hybrid):
        w = swap_rows(models[norms_from][name], models[directions_from][name])
        hybrid[name] = w.to(hybrid[name].dtype)
    return hybrid
