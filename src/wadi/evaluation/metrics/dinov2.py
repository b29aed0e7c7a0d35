"""DINOv2 features for Frechet distance and diversity (FD_DINOv2, Stein et al., 2023, who
found it ranks generated images as people do where Inception does not).

Weights: transformers' `Dinov2Model` from a folder or hub id the user has, ViT-L/14 for the
published numbers (`facebook/dinov2-large`, the weights of torch hub's dinov2_vitl14). The
feature is the layer-normed class token (`pooler_output`, what torch hub's model returns);
images are resized to 224 x 224 with clean-fid's float bicubic resize and normalised with
ImageNet's mean and deviation, as dgm-eval feeds the model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from wadi.evaluation.metrics.images import ImageLike, to_rgb_uint8
from wadi.evaluation.metrics.inception import clean_resize

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_DINOV2 = "facebook/dinov2-large"


def model_input(image: ImageLike) -> torch.Tensor:
    """One image as DINOv2's 3 x 224 x 224 normalised input."""
    x = (clean_resize(to_rgb_uint8(image), SIZE) / 255 - MEAN) / STD
    return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)


@functools.lru_cache(maxsize=4)
def load_dinov2(model: str, device: str):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(model).to(device).eval()


@torch.inference_mode()
def dinov2_features(images: Sequence[ImageLike], model: str | os.PathLike = DEFAULT_DINOV2, batch_size: int = 50,
                    device: str = "cpu", progress: bool = False) -> np.ndarray:
    """(n, d) float64 class-token features of a sequence of images (paths, arrays, tensors)."""
    net = load_dinov2(str(model), device)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="dinov2 features", unit="batch", disable=not progress):
        x = torch.stack([model_input(im) for im in images[start:start + batch_size]]).to(device)
        out.append(net(pixel_values=x).pooler_output.double().cpu())
    return torch.cat(out).numpy()
