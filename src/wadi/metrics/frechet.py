"""Frechet distance between Gaussians fitted to feature sets (FID's maths), and stats files.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

torchmetrics computes this in `torchmetrics.image.fid._compute_fid`, a private helper
(leading underscore, no stability promise), so we follow pytorch-fid instead: scipy's
sqrtm in float64, a small ridge when the product is singular, and imaginary round-off
dropped. That is also the computation behind the published COCO numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

_META = "meta_"


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d), float64, of an (n, d) feature matrix."""
    x = _as_float64(features)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (n, d) with n >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched stats: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Fewer samples than dimensions make the product singular; a ridge on both
        # covariances gives it a finite square root (pytorch-fid's remedy).
        ridge = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        # Round-off leaves tiny imaginary parts; large ones mean the inputs are no covariances.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has imaginary part up to "
                             f"{np.abs(covmean.imag).max():.3g}: are both matrices covariances?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (n, d) feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
    """Write mu, sigma and scalar metadata (str, int, float, bool) to an .npz file at `path`."""
    arrays = {"mu": _as_float64(mu), "sigma": _as_float64(sigma)}
    for key, value in meta.items():
        value = np.asarray(value)
        if value.ndim or value.dtype.kind not in "biufU":
            raise TypeError(f"stats metadata {key!r} must be a str, int, float or bool, got {type(value)}")
        arrays[_META + key] = value
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # Write then rename: an interrupted run never leaves a half-written stats file behind.
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read (mu, sigma, metadata) written by `save_stats`."""
    with np.load(path, allow_pickle=False) as z:
        meta = {k[len(_META):]: z[k].item() for k in z.files if k.startswith(_META)}
        return z["mu"], z["sigma"], meta
