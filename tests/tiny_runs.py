"""Finished one-step runs on the tiny pipelines, made once per test session and shared by
the sample / export / eval / downstream tests (a training step moves the student off its teacher)."""

from __future__ import annotations

from pathlib import Path

import tiny_pipes
from test_distill import make_cfg
from wadi.distill import distill

SAVERS = {"sd": tiny_pipes.save_tiny_sd, "pixart": tiny_pipes.save_tiny_pixart, "pixel": tiny_pipes.save_tiny_pixel}
_made: dict[str, tuple[Path, Path]] = {}


def tiny_run(tmp_path_factory, kind: str) -> tuple[Path, Path]:
    """(base pipeline folder, run folder) of a one-step run of `kind`."""
    if kind not in _made:
        root = tmp_path_factory.mktemp(f"run-{kind}")
        (root / "prompts.txt").write_text("a cat\na red car\n")
        pipes = {kind: SAVERS[kind](root / kind), "prompts": root / "prompts.txt"}
        cfg = make_cfg(pipes, root, kind=kind, steps=1)
        cfg.run.checkpoint_every = 0
        _made[kind] = (pipes[kind], distill(cfg, progress=False))
    return _made[kind]
