"""Improved precision and recall (Kynkaanniemi et al., 2019) on feature sets.

Each set's manifold is the union of balls around its samples, each ball reaching the
sample's k-th nearest neighbour within the set. Precision: the fraction of generated
samples inside the real manifold (fidelity). Recall: the fraction of real samples inside
the generated manifold (coverage of the real distribution).

Distances are computed block by block, so 30k x 30k sets never hold a full distance matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    # float64 stays float64 (exact comparisons in tests); everything else runs in float32.
    return t if t.dtype == torch.float64 else t.float()


def kth_nn_radii(features: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Distance from each row of `features` to its k-th nearest other row."""
    if not 0 < k < len(features):
        raise ValueError(f"k must be in [1, {len(features) - 1}] for {len(features)} samples, got {k}")
    radii = []
    for rows in features.split(block):
        dist = torch.cdist(rows, features)
        # The k + 1 smallest include the row itself at distance 0.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor,
                    block: int = 1024) -> torch.Tensor:
    """For each query row: whether it lies within radii[j] of some points[j]."""
    return torch.cat([(torch.cdist(rows, points) <= radii).any(dim=1) for rows in queries.split(block)])


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     block: int = 1024, device: str | torch.device | None = None) -> PrecisionRecall:
    """Improved precision and recall of generated features `fake` against `real`, both (n, d)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    real = _as_tensor(real, device)
    fake = _as_tensor(fake, device).to(real.dtype)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two (n, d) feature sets of equal d, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii, fake_radii = kth_nn_radii(real, k, block), kth_nn_radii(fake, k, block)
    precision = inside_manifold(fake, real, real_radii, block).double().mean().item()
    recall = inside_manifold(real, fake, fake_radii, block).double().mean().item()
    return PrecisionRecall(precision, recall)
