"""Images on disk: uint8 pixels rounded as diffusers does, PNGs that carry their prompt and
seed, and grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wadi.files.atomic import atomic_path

GRID_MIN_SIZE = 128  # tiny images (the digits world's 8x8) are blown up to at least this to be seen


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] to (B, H, W, C) uint8, rounded as diffusers' VaeImageProcessor does."""
    x = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path, text: dict | None = None) -> Path:
    """One HxWxC uint8 image as a PNG whose text chunks hold `text` (prompt, seed, ...).

    Written whole or not at all (resumed evaluations skip the images already on disk).
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():  # iTXt: UTF-8, prompts are not Latin-1
        info.add_itxt(k, v if isinstance(v, str) else json.dumps(v))
    with atomic_path(path) as tmp:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG written by save_png."""
    with Image.open(path) as im:
        return dict(im.text)


def read_images(paths: list[Path]) -> np.ndarray:
    """(N, H, W, C) uint8 as stored (C = 1 for grey PNGs)."""
    arrays = [np.asarray(Image.open(p)) for p in paths]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


def grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, scale: int | None = None) -> Image.Image:
    """A PIL grid of (B, C, H, W) images in [-1, 1] (or (B, H, W, C) uint8), `nrow` a row,
    1 px white borders; `scale` (default: enough for GRID_MIN_SIZE) blows pixels up."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, k = divmod(i, nrow)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = img
    out = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    scale = scale if scale is not None else max(1, GRID_MIN_SIZE // w)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def save_grid(images, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Image.Image:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = grid(images, nrow, scale)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image
