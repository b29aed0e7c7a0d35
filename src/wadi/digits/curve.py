"""Time to quality: the student scored every few steps while it trains, on the demo's own
evaluation prompts and seeds, in the world's features (Frechet distance and KID against
the reference digits), so the report can show the step where a run reaches its bar. In
this world an evaluation takes a few seconds; the last one scores the final weights, the
numbers the evaluation then reports for the exported student."""

from __future__ import annotations

import time

import numpy as np
import torch

from wadi.files.images import to_uint8
from wadi.models.sampling import Sampling


class QualityCurve:
    """An `after_step` callback of wadi.engine.training.distill: every `every` steps and at the last,
    the student's images (its final weights: the EMA when there is one) scored against
    `reference` features by `features`, a function of (N, H, W, C) uint8 images."""

    def __init__(self, every: int, prompts: list[str], seeds: list[int], features, reference: np.ndarray,
                 kid_subsets: int, kid_subset_size: int):
        from wadi.evaluation.metrics import gaussian_stats

        self.every, self.prompts, self.seeds, self.features = every, prompts, seeds, features
        self.reference, self.stats = reference, gaussian_stats(reference)
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.points: list[dict] = []
        self.seconds = 0.0  # spent here, not distilling

    def __call__(self, distiller) -> None:
        step = distiller.step
        if step % self.every and step != distiller.cfg.train.steps:
            return
        start = time.perf_counter()
        from wadi.evaluation.metrics import frechet_distance, gaussian_stats
        from wadi.evaluation.metrics.kid import kernel_distance

        with distiller.as_role(distiller.student) as net:
            net.eval()
            with distiller.final_weights(), torch.no_grad():
                images = Sampling.for_student(distiller.bb)(distiller.bb, net, self.prompts, self.seeds, 100)
            net.train()
        feats = np.asarray(self.features(to_uint8(images)), dtype=np.float64)
        kid = kernel_distance(self.reference, feats, self.kid_subsets, self.kid_subset_size)
        self.points.append({"step": step, "fid": frechet_distance(*gaussian_stats(feats), *self.stats),
                            "kid": kid.mean, "kid_std": kid.std})
        self.seconds += time.perf_counter() - start


def first_at_or_below(points: list[dict], key: str, bar: float) -> int | None:
    """The first evaluated step whose `key` is at most `bar` (None: never)."""
    return next((p["step"] for p in points if p[key] <= bar), None)
