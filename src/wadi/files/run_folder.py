"""A distillation's run folder: every path it holds, its number, and finding the run to resume.

    runs/00003-sd15-wadi/
        config.yaml           the resolved settings (what --resume reads back)
        teacher.json          what identifies the teacher (--resume refuses another; wadi.engine.provenance)
        log.jsonl             one JSON object per logged step
        tb/                   TensorBoard events (and wandb/ when that tracker is on)
        samples/step-NNNNNNN.png
        checkpoints/step-NNNNNNN/   complete checkpoints (see wadi.engine.checkpoint)
        student.safetensors, fake.safetensors   the final adapters
        student/              the final student merged into a plain diffusers model (with wadi_student.json)

A run folder appears whole with its config.yaml (written in a hidden folder, then renamed
to its number), so no kill leaves a numbered folder that cannot be resumed (a hidden one
left by a kill in those milliseconds is removed by a later run in the root); the rename
fails on a taken number, so two runs started at the same moment in one root get
different numbers. Its command holds `NNNNN-name.lock` beside it (wadi.files.locks).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from wadi.files import locks

_STEP_DIR = re.compile(r"^step-(\d+)$")
_RUN_DIR = re.compile(r"^(\d+)-")
_NEW_RUN = ".new-run-"  # a run folder being made; renamed to its number within milliseconds
STALE_RESERVATION_S = 600


def _remove_stale_reservations(root: Path) -> None:
    """Hidden folders of runs killed between making and renaming them (nothing else
    writes there); young ones may be another process's, still being made."""
    now = time.time()
    for p in root.glob(_NEW_RUN + "*"):
        try:
            if now - p.stat().st_mtime > STALE_RESERVATION_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:  # gone meanwhile
            pass


class RunFolder:
    TEACHER = "teacher.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- the paths ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def teacher(self) -> Path:
        return self.path / self.TEACHER

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def trackers(self) -> Path:
        """accelerate's project folder: TensorBoard writes tb/ below it, wandb wandb/."""
        return self.path

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:07d}.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    @property
    def student_adapter(self) -> Path:
        return self.path / "student.safetensors"

    @property
    def fake_adapter(self) -> Path:
        return self.path / "fake.safetensors"

    @property
    def student_model(self) -> Path:
        return self.path / "student"

    # --- state -------------------------------------------------------------------------
    @staticmethod
    def is_run(path: str | Path) -> bool:
        return Path(path).is_dir() and (Path(path) / "config.yaml").is_file()

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders that were committed, oldest first (`.tmp` ones are not)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=checkpoint_step)

    @property
    def finished(self) -> bool:
        """The final export is written with student.safetensors last."""
        return self.student_adapter.is_file()

    # --- numbering ------------------------------------------------------------------------
    @classmethod
    def reserve(cls, root: str | Path, name: str, config: str | None = None,
                more: dict[str, str] | None = None) -> tuple["RunFolder", FileLock]:
        """Create root/NNNNN-name holding `config` as its config.yaml and the files `more`
        names ({file name: text}), NNNNN one past the highest number there (the next when
        another process takes it first), and take its lock."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_reservations(root)
        tmp = Path(tempfile.mkdtemp(prefix=_NEW_RUN, dir=root))
        try:
            if config is not None:
                (tmp / "config.yaml").write_text(config, encoding="utf-8")
            for file, text in (more or {}).items():
                (tmp / file).write_text(text, encoding="utf-8")
            number = max((int(m.group(1)) for p in root.iterdir() if (m := _RUN_DIR.match(p.name))), default=-1) + 1
            while True:
                path = root / f"{number:05d}-{name}"
                number += 1
                try:
                    lock = locks.acquire(path)
                except locks.InUse:
                    continue
                try:
                    os.rename(tmp, path)  # fails on a taken number (an empty folder it would replace is past max)
                    return cls(path), lock
                except OSError as e:
                    locks.release(lock)
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename

    @classmethod
    def find(cls, root: str | Path, resume: str) -> "RunFolder":
        """The run folder `resume` names, or with 'latest' the newest run under root."""
        if resume != "latest":
            if not cls.is_run(resume):
                raise FileNotFoundError(f"--resume {resume}: not a run folder (no config.yaml)")
            return cls(resume)
        root = Path(root)
        runs = sorted((p for p in root.glob("[0-9]*-*") if cls.is_run(p)),
                      key=lambda p: int(_RUN_DIR.match(p.name).group(1))) if root.is_dir() else []
        if not runs:
            raise FileNotFoundError(f"--resume latest: no run folder under {root}")
        return cls(runs[-1])


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))
