"""The digits world: scikit-learn's handwritten digits and prompts that name them.

Images are (N, 1, 8, 8) floats in [-1, 1] (the 17 grey levels 0..16 mapped linearly).
The split into train and held-out is a fixed, stratified, seeded one: the teacher and
the classifier learn from `train`, the classifier is checked on `heldout`.
"""

from __future__ import annotations

import functools

import torch

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Several phrasings per class, so the student meets the same digit in different words.
TEMPLATES = (
    "a handwritten {word}",
    "the digit {n}",
    "the number {word}",
    "handwritten digit {n}",
    "a picture of the digit {word}",
    "the numeral {n} written by hand",
    "{word}",
    "a scanned handwritten {n}",
)
SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def class_prompts(label: int) -> list[str]:
    """Every phrasing of one class, in template order."""
    if not 0 <= label < len(CLASS_WORDS):
        raise ValueError(f"digit class must be in 0..9, got {label}")
    return [t.format(word=CLASS_WORDS[label], n=label) for t in TEMPLATES]


def all_prompts() -> list[str]:
    """All prompts, class by class."""
    return [p for label in range(len(CLASS_WORDS)) for p in class_prompts(label)]


@functools.lru_cache(maxsize=None)
def prompt_labels() -> dict[str, int]:
    return {p: label for label in range(len(CLASS_WORDS)) for p in class_prompts(label)}


def label_of(prompt: str) -> int:
    try:
        return prompt_labels()[prompt]
    except KeyError:
        raise ValueError(f"{prompt!r} is not a prompt of the digits world") from None


def eval_prompts(per_class: int, seed: int = 0) -> tuple[list[str], list[int], list[int]]:
    """A balanced evaluation set: `per_class` prompts per digit cycling through the
    phrasings, their labels, and one noise seed each (seed, seed + 1, ...)."""
    if per_class <= 0:
        raise ValueError(f"need at least one sample per class, got {per_class}")
    prompts, labels = [], []
    for i in range(per_class):
        for label in range(len(CLASS_WORDS)):
            prompts.append(class_prompts(label)[i % len(TEMPLATES)])
            labels.append(label)
    return prompts, labels, list(range(seed, seed + len(prompts)))


@functools.lru_cache(maxsize=None)
def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    return images, torch.tensor(digits.target, dtype=torch.long)


@functools.lru_cache(maxsize=None)
def _split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified: each class gives HELDOUT_FRACTION of its images to the held-out set."""
    _, labels = _load_all()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, held = [], []
    for c in range(len(CLASS_WORDS)):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * HELDOUT_FRACTION)
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def load(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) in [-1, 1] and labels (N,) of a split: train, heldout or all."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    images, labels = _load_all()
    if split == "all":
        return images, labels
    idx = _split_indices()[0 if split == "train" else 1]
    return images[idx], labels[idx]
