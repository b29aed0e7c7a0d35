"""Kernel Inception Distance (Binkowski et al., 2018): the unbiased estimate of the squared
maximum mean discrepancy between two feature sets under the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets, with its spread over them.

The recipe is torchmetrics' KernelInceptionDistance (and clean-fid's): `subsets` draws
of `subset_size` rows from each set, each set drawn without replacement on its own;
the mean and the population standard deviation of the per-subset estimates. torchmetrics
ships it only inside a metric class that owns its feature extractor, so the maths is here
in float64, on features any extractor made; tests/test_kid.py checks it against the
double sum written out.

Unlike Frechet distance, the estimate has no bias from the set sizes: two sets drawn from
one distribution score 0 in expectation (and can score below it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SUBSETS = 100
SUBSET_SIZE = 1000
COEF = 1.0


class KID(NamedTuple):
    mean: float
    std: float
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x.y / d + 1)^3 for every pair of rows (cubed by products: a float power is several times slower)."""
    k = x @ y.T / x.shape[1] + COEF
    return k * k * k


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equally sized sets: the within-set sums leave out each row's kernel
    with itself (the U-statistic), the cross sum keeps every pair."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m ** 2)


def kernel_distance(real: np.ndarray, fake: np.ndarray, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
                    seed: int = 0) -> KID:
    """KID of (n, d) features `fake` against `real`; subsets smaller than `subset_size` when
    a set is smaller (the size used is returned: it belongs to the protocol)."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two (n, d) feature sets of equal d, got {real.shape} and {fake.shape}")
    size = min(subset_size, len(real), len(fake))
    if size < 2 or subsets < 1:
        raise ValueError(f"KID needs at least 2 images in each set and one subset, got {len(fake)} against "
                         f"{len(real)} and {subsets} subsets")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                            fake[rng.choice(len(fake), size, replace=False)]) for _ in range(subsets)]
    return KID(float(np.mean(values)), float(np.std(values)), size)
