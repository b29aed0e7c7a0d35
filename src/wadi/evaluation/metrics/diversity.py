"""Diversity over seeds: for each prompt with several images (one per seed), the mean
cosine distance 1 - cos(f_i, f_j) over the pairs of its images' features; the score is the
mean over such prompts (0: every seed gives the same image; higher: more varied). In DINOv2
features it measures what a one-step student's mode-seeking loss can cost."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def prompt_groups(prompts: list[str]) -> list[list[int]]:
    """Indices of the images of each prompt that has at least two."""
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    return [g for g in groups.values() if len(g) > 1]


def seed_diversity(features: np.ndarray, prompts: list[str]) -> float:
    """Mean over repeated prompts of the mean pairwise cosine distance of their images' features."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) != len(prompts):
        raise ValueError(f"{len(features)} feature rows but {len(prompts)} prompts")
    groups = prompt_groups(prompts)
    if not groups:
        raise ValueError("diversity needs prompts that repeat (several seeds of one prompt): pass --repeats K")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    scores = []
    for g in groups:
        cos = unit[g] @ unit[g].T
        n = len(g)
        scores.append(float((n * n - cos.sum()) / (n * (n - 1))))  # the diagonal's distances are 0
    return float(np.mean(scores))
