"""The real-digits floor at the evaluation's set size.

The floor row scores real digits the teacher never saw (the held-out split, 359 images)
against the reference (the train split) exactly as a model's images are scored. But a
Frechet distance from n images is biased upwards by about b / n (the covariance estimated
from few images is noisier), so 359 real digits score worse than 500 equally real ones
would, and good 500-image students came out below "the floor". KID has no such bias for
independent draws, but the evaluation's sets are balanced by construction (the same count
of every digit), which makes fewer same-class pairs than independent draws would give
and biases it downwards by about b / n as well.

So both are measured on class-balanced random subsets of the held-out digits at several
sizes k, fitted as a + b / k (least squares over the subsets' means and the full set), and
read at the evaluation's n. The spread is the standard deviation over the subsets of the
largest size (7/8 of the held-out digits, so they overlap much): a lower bound on the
spread of one set of n real digits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FRACTIONS = (0.5, 0.625, 0.75, 0.875)  # subset sizes, as shares of each class's held-out images
DRAWS = 100  # per size: the fitted Frechet floor at 500 moved by 0.05 between seeds of the draws (0.2 at 10)
KID_DRAWS, KID_SUBSETS = 20, 10  # KID costs more; its fit moved by 3 (of -110) between seeds at 10 draws


def balanced_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of round(fraction x count) random images of each class."""
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), round(fraction * np.sum(labels == c)),
                                      replace=False) for c in np.unique(labels)])


def at_size(metric: Callable[[np.ndarray], float], features: np.ndarray, labels: np.ndarray, n: int,
            seed: int = 0, draws: int = DRAWS, whole: float | None = None) -> dict:
    """`metric` of the whole set (or `whole`, its value as the evaluation measured it), its fit
    a + b / k over balanced subsets, read at n, and the spread of the largest subsets."""
    rng = np.random.default_rng(seed)
    sizes, means, spread = [len(features)], [metric(features) if whole is None else whole], 0.0
    for fraction in FRACTIONS:
        subsets = [balanced_subset(labels, fraction, rng) for _ in range(draws)]
        values = [metric(features[idx]) for idx in subsets]
        sizes.append(len(subsets[0]))  # the same per-class counts in every draw
        means.append(float(np.mean(values)))
        spread = float(np.std(values))  # the last, largest size's
    slope, intercept = np.polyfit(1 / np.asarray(sizes, dtype=np.float64), means, 1)
    return {"measured": means[0], "n_measured": len(features), "at_n": float(intercept + slope / n), "n": n,
            "slope": float(slope), "spread": spread}


def real_floor(heldout: np.ndarray, labels: np.ndarray, reference: np.ndarray, n: int,
               measured: dict | None = None) -> dict:
    """Frechet distance and KID of real held-out digits' features against the reference's,
    read at n images (see the module's docstring); `measured` holds the whole set's values as
    the evaluation scored them ("fid", "kid"), where it did."""
    measured = measured or {}
    from wadi.evaluation.metrics import frechet_distance, gaussian_stats
    from wadi.evaluation.metrics.kid import kernel_distance

    mu, sigma = gaussian_stats(reference)
    return {"fid": at_size(lambda f: frechet_distance(*gaussian_stats(f), mu, sigma), heldout, labels, n,
                           whole=measured.get("fid")),
            "kid": at_size(lambda f: kernel_distance(reference, f, KID_SUBSETS).mean, heldout, labels, n,
                           draws=KID_DRAWS, whole=measured.get("kid"))}
