"""Metrics of the digits world, computed with the shipped classifier and plugged into
wadi.evaluation.evaluate (`wadi eval --world digits`, and `wadi demo` through the same code):

- alignment (`prompt_alignment`): the fraction of images the classifier assigns to the
  prompted digit (the world's CLIP score);
- `features`: the classifier's penultimate features, the feature space of the Frechet
  distance to the real train-split digits (the world's FID) and of precision / recall.
The standard Inception FID is `--features inception`, slow on a CPU (every 8x8 digit
becomes a 299x299 input).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from wadi.digits import world
from wadi.digits.classifier import DigitClassifier, load_classifier


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


def alignment(predictions: np.ndarray, labels: list[int] | np.ndarray) -> float:
    labels = np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"got {len(predictions)} predictions for {len(labels)} labels")
    return float((predictions == labels).mean())


def features(images: np.ndarray) -> np.ndarray:
    """The shipped classifier's penultimate features of (N, 8, 8, C) uint8 images, as
    `wadi eval` reads them back: the world's feature space of Frechet distance and
    precision / recall (`--features wadi.digits.metrics:features`)."""
    return classify(shipped_classifier(), _as_input(images))[0]


def prompt_alignment(images: np.ndarray, prompts: list[str]) -> float:
    """Alignment of (N, H, W, C) uint8 images (as `wadi eval` reads them back) with their
    digits-world prompts; images larger than 8x8 are area-averaged down to 8x8."""
    predictions = classify(shipped_classifier(), _as_input(images))[1]
    return alignment(predictions, [world.label_of(p) for p in prompts])


def _as_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 to the classifier's (N, 1, 8, 8) in [-1, 1]: grey, and area-averaged
    down to 8x8 when larger."""
    x = torch.from_numpy(np.asarray(images)).float().mean(dim=3, keepdim=True).permute(0, 3, 1, 2)
    if x.shape[-2:] != (8, 8):
        x = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    return x / 127.5 - 1


@functools.lru_cache(maxsize=1)
def shipped_classifier() -> DigitClassifier:
    return load_classifier()
