"""Images in for the metric extractors: file paths, arrays and tensors as uint8 RGB arrays."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """An HxWx3 uint8 array from a file path, a numpy HxW / HxWx1 / HxWx3 uint8 array,
    or a torch HxW / 1xHxW / 3xHxW uint8 tensor (torch images are channels-first)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        image = (t.permute(1, 2, 0) if t.ndim == 3 else t).numpy()
    arr = np.asarray(image)
    # Float images are refused rather than guessed at: [0, 1] and [-1, 1] both occur.
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {arr.shape}")
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files
