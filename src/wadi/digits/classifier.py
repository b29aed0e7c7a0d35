"""The digits classifier behind the metrics: the world's stand-in for CLIP and Inception.

A small CNN trained on the train split (with one-pixel shifts, so that a digit drawn a
little off-centre is still recognised). Its logits give prompt alignment; its
penultimate layer (FEATURES wide) is the feature space of the Frechet distance.
Shipped as safetensors with a JSON file beside it (architecture, training, accuracy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wadi.digits import paths, world
from wadi.files.atomic import atomic_path, write_text


class DigitClassifier(nn.Module):
    def __init__(self, width: int = 32, features: int = 64, classes: int = 10):
        super().__init__()
        self.config = {"width": width, "features": features, "classes": classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(8 * width, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, features) of images (B, 1, 8, 8) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Move each image by up to one pixel in each direction (background -1 fills in)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(3, (2, len(x)), generator=g)
    return torch.stack([p[:, i:i + 8, j:j + 8] for p, i, j in zip(padded, dy.tolist(), dx.tolist())])


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def train_classifier(out: str | Path, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> Path:
    """Train on the train split; write `out` (.safetensors) and `out` with .json beside it."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"classifier file must end in .safetensors, got {out}")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = world.load("train")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(images) // batch_size))
    t0 = time.time()
    for _ in tqdm(range(epochs), desc="digits classifier", disable=not progress, dynamic_ncols=True):
        model.train()
        for b in torch.randperm(len(images), generator=g).split(batch_size):
            loss = F.cross_entropy(model(_shift(images[b], g)), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    record = {"config": model.config, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_accuracy": accuracy(model, images, labels),
              "heldout_accuracy": accuracy(model, *world.load("heldout")),
              "wall_time_s": round(time.time() - t0, 1),
              "command": f"wadi digits-classifier --out {out} --epochs {epochs} --seed {seed}"}
    write_text(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    return out


def load_classifier(path: str | Path = paths.CLASSIFIER) -> DigitClassifier:
    """The (shipped) classifier, in eval mode."""
    path = Path(path)
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"digits classifier {path} (and {meta.name} beside it) not found; "
                                "make one with `wadi digits-classifier --out FILE.safetensors`")
    model = DigitClassifier(**json.loads(meta.read_text())["config"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()
