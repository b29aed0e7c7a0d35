"""Metrics of the digits world, computed with the shipped classifier.

- alignment: the fraction of generated images the classifier assigns to the prompted
  digit (the world's CLIP score);
- frechet: Frechet distance between Gaussians fitted to the classifier's penultimate
  features of the generated images and of the real train-split digits (the world's FID);
- precision / recall: improved precision and recall in the same feature space;
- fid (on request): the standard TF-Inception FID against the real train-split digits.

`prompt_alignment` plugs the alignment into `wadi eval --alignment wadi.digits.metrics:prompt_alignment`.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import scipy.linalg
import torch

from ..metrics import frechet_distance_features, precision_recall
from . import world
from .classifier import DigitClassifier, load_classifier


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, d) and predicted classes (N,) of images (N, 1, 8, 8) in [-1, 1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digits images must be (N, 1, 8, 8), got {tuple(images.shape)}")
    feats, preds = [], []
    for x in images.float().split(batch_size):
        f = model.features(x)
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


@functools.lru_cache(maxsize=4)
def reference_features(model: DigitClassifier) -> np.ndarray:
    """Features of the real train-split digits (what the teacher learned from)."""
    return classify(model, world.load("train")[0])[0]


def alignment(predictions: np.ndarray, labels: list[int] | np.ndarray) -> float:
    labels = np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"got {len(predictions)} predictions for {len(labels)} labels")
    return float((predictions == labels).mean())


def score(model: DigitClassifier, images: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """alignment, frechet, precision and recall of generated images with their prompted labels."""
    feats, preds = classify(model, images)
    ref = reference_features(model)
    pr = precision_recall(ref, feats, device="cpu")
    with warnings.catch_warnings():
        # Collapsed samples (an untrained one-step model) leave ReLU features constant and
        # the covariance singular; frechet_distance handles it, scipy need not shout.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        frechet = frechet_distance_features(feats, ref)
    return {"alignment": alignment(preds, labels), "frechet": frechet, "precision": pr.precision, "recall": pr.recall}


def inception_fid(images: torch.Tensor, progress: bool = True) -> float:
    """Standard TF-Inception FID of images (N, 1, 8, 8) against the real train-split digits
    (each 8x8 image resized to 299x299 the clean-fid way, as any FID pipeline would)."""
    from ..metrics.inception import extract_features
    from ..images import to_uint8

    real = extract_features(list(to_uint8(world.load("train")[0])), device="cpu", progress=progress)
    fake = extract_features(list(to_uint8(images)), device="cpu", progress=progress)
    return frechet_distance_features(fake, real)


def prompt_alignment(images: np.ndarray, prompts: list[str]) -> float:
    """Alignment of (N, H, W, C) uint8 images (as `wadi eval` reads them back) with their
    digits-world prompts; images larger than 8x8 are area-averaged down to 8x8."""
    x = torch.from_numpy(np.asarray(images)).float().mean(dim=3, keepdim=True).permute(0, 3, 1, 2)
    if x.shape[-2:] != (8, 8):
        x = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    predictions = classify(shipped_classifier(), x / 127.5 - 1)[1]
    return alignment(predictions, [world.label_of(p) for p in prompts])


@functools.lru_cache(maxsize=1)
def shipped_classifier() -> DigitClassifier:
    return load_classifier()
