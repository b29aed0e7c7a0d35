"""Evaluation settings of the embedded worlds, for `wadi eval --world NAME`.

digits (wadi.digits): the balanced evaluation prompts, the real train-split digits as the
reference set (written once as PNGs), the shipped classifier's alignment, and its
penultimate features as the FID / precision-recall feature space (the world's own "FID";
`--features inception` gives the standard one, slowly on a CPU: each 8x8 digit becomes a
299x299 Inception input). The teacher is the shipped one with the MiniLM text encoder.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .prompts import PromptSet
from .models import BaseOptions


@dataclass
class World:
    prompts: PromptSet
    reference: Path
    alignment: str
    features: str
    metrics: str
    teacher: BaseOptions


def digits_features(images: np.ndarray) -> np.ndarray:
    """The shipped digits classifier's penultimate features of (N, 8, 8, C) uint8 images."""
    from .digits.metrics import classify

    x = torch.from_numpy(np.asarray(images)).float().mean(dim=3, keepdim=True).permute(0, 3, 1, 2)
    return classify(_digits_classifier(), x / 127.5 - 1)[0]


@functools.lru_cache(maxsize=1)
def _digits_classifier():
    from .digits.classifier import load_classifier

    return load_classifier()


def digits_reference(folder: Path) -> Path:
    """The train-split digits as 8x8 grey PNGs in `folder`, written once."""
    from .digits import world
    from .sampling import to_uint8

    images = to_uint8(world.load("train")[0])
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        tmp = folder / f"{i:05d}.png.tmp"
        Image.fromarray(img[..., 0]).save(tmp, format="PNG")
        tmp.replace(folder / f"{i:05d}.png")
    return folder


def digits(num: int, cache_dir: Path) -> World:
    from .digits import paths, world

    if num < 10 or num % 10:
        raise ValueError(f"--num for the digits world must be a positive multiple of 10 (balanced classes), got {num}")
    prompts = world.eval_prompts(num // 10)[0]
    teacher = BaseOptions(str(paths.TEACHER), "pixel", str(paths.minilm_dir()), None, paths.MAX_LENGTH)
    return World(PromptSet(prompts, f"digits world: {num // 10} per class"), digits_reference(cache_dir / "digits-train"),
                 "wadi.digits.metrics:prompt_alignment", "wadi.worlds:digits_features", "fid,pr,alignment", teacher)


WORLDS = {"digits": digits}
