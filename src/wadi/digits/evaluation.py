"""Sample a model on the balanced evaluation prompts, time it, and score it.

Every model sees the same prompts and noise seeds (world.eval_prompts), so images can be
compared side by side and numbers row by row. Each row carries its sampling cost:
network evaluations per image (NFE) and images per second on this machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..backbones import Backbone
from ..sampling import Sampling
from . import metrics, world
from .classifier import DigitClassifier

CHUNK = 50  # images per progress-bar tick and per sampler call


@dataclass
class Row:
    name: str
    nfe: int  # network evaluations per image
    seconds: float
    scores: dict[str, float]
    images: torch.Tensor = field(repr=False)

    @property
    def images_per_s(self) -> float:
        return len(self.images) / self.seconds

    def to_dict(self) -> dict:
        return {"name": self.name, "nfe": self.nfe, "n": len(self.images), "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 2), **self.scores}


@torch.no_grad()
def sample_row(name: str, backbone: Backbone, net: torch.nn.Module, sampling: Sampling, classifier: DigitClassifier,
               per_class: int, fid: bool = False, progress: bool = True) -> Row:
    from tqdm.auto import tqdm

    prompts, labels, seeds = world.eval_prompts(per_class)
    net.eval()
    chunks = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(prompts), CHUNK), desc=f"sampling: {name}", disable=not progress, dynamic_ncols=True):
        chunks.append(sampling(backbone, net, prompts[i:i + CHUNK], seeds[i:i + CHUNK], batch_size=CHUNK))
    seconds = time.perf_counter() - t0
    images = torch.cat(chunks)
    scores = metrics.score(classifier, images, labels)
    if fid:
        scores["inception_fid"] = metrics.inception_fid(images, progress=progress)
    return Row(name, sampling.nfe, seconds, scores, images)


def real_row(classifier: DigitClassifier) -> dict:
    """The floor the metrics can reach: held-out real digits scored like generated ones."""
    images, labels = world.load("heldout")
    return {"name": "real digits (held-out)", "nfe": None, "n": len(images), "seconds": None, "images_per_s": None,
            **metrics.score(classifier, images, labels.tolist())}
