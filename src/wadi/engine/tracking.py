"""What a run reports while it trains: a JSON-lines log in the run folder, and scalars and
sample grids to accelerate's trackers (TensorBoard, wandb), as the diffusers examples do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from wadi.engine.config import flat_settings


def trackers_for(settings, folder: Path, name: str) -> list:
    """accelerate's `log_with` for a run's settings (`run.report_to`): TensorBoard by name
    (its events in the run folder's tb/), wandb as a tracker made here, so that its project
    and entity are `run.wandb_project` / `run.wandb_entity` (accelerate names the wandb
    project after TensorBoard's folder otherwise) and its files stay in the run folder."""
    names = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"],
             "none": []}[settings.report_to]
    if "wandb" not in names:
        return names
    from accelerate.tracking import WandBTracker

    entity = {"entity": settings.wandb_entity} if settings.wandb_entity else {}
    return [n for n in names if n != "wandb"] + [WandBTracker(settings.wandb_project, dir=str(folder), name=name,
                                                              **entity)]


def _json_value(v):
    """JSON has no NaN or Infinity: non-finite numbers are written as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl; a torn or garbled line (a kill mid-write) is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def hyperparameters(config: dict) -> dict:
    """{section.key: value} with other values as JSON strings, the form trackers store them in."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat_settings(config).items()}


class Progress:
    """What the progress bar shows beside tqdm's step rate and time left: the fake model's
    loss as a moving average (it falls as the fake model catches up with the student and
    rises when the student moves away: the run's pulse), the student's gradient norm
    before clipping, and how many updates were skipped. Not the student's surrogate loss:
    its value is 0.5 mean(g^2) of the score difference, which says how far the teacher and
    the fake model disagree, not how good the student is (docs/method.md)."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing, self.fake, self.skipped = smoothing, None, 0

    def update(self, out: dict) -> dict[str, str]:
        """The bar's fields after a step's `train_step` record."""
        self.skipped += out["skipped"]
        if math.isfinite(out["loss_fake"]):
            self.fake = out["loss_fake"] if self.fake is None else (
                self.smoothing * self.fake + (1 - self.smoothing) * out["loss_fake"])
        norm = out["grad_norm_student"]  # None for a skipped update
        return {"fake_loss": "-" if self.fake is None else f"{self.fake:.3g}",
                "grad": "-" if norm is None else f"{norm:.3g}", "skipped": str(self.skipped)}


class Tracker:
    """Scalars to log.jsonl and the trackers, images to the trackers (main process only)."""

    def __init__(self, log_file: Path, accelerator, start_step: int, config: dict, name: str = "wadi"):
        self.acc = accelerator
        self.file = None
        if accelerator.is_main_process:
            kept = [r for r in read_log(log_file) if r["step"] <= start_step]  # a resumed run rewrites the rest
            log_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.file = log_file.open("a")
        if accelerator.log_with:
            kwargs = {"tensorboard": {"purge_step": start_step or None}}  # a resumed run rewrites what follows
            accelerator.init_trackers("tb", config=hyperparameters(config), init_kwargs=kwargs)

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        record = {k: _json_value(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.acc.log(scalars, step=record["step"])

    def image(self, name: str, image, step: int, caption: str = "") -> None:
        """One PIL image (a sample grid) to every tracker."""
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: [wandb.Image(image, caption=caption)]}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.acc.end_training()
