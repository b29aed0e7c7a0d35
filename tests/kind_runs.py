"""What the tests of the z-image and flux2-klein kinds share: their tiny pipelines loaded
as backbones and as stock pipelines, the teacher sampled both ways, and tiny distillation
runs of one and of four student steps."""

from __future__ import annotations

import json
from pathlib import Path

import tiny_pipes
import torch

from wadi.adapters.config import AdapterConfig
from wadi.models.backbones import BackboneSpec
from wadi.models.sampling import sample_student, sample_teacher

PROMPTS = ["a photo of a cat", "the red car on the table"]
SEEDS = [3, 7]
MAX_LENGTH = 24  # tokens: a short prompt length keeps the tiny runs fast; the call passes it on


def backbone(folder: Path, **spec):
    return BackboneSpec(path=str(folder), **{"resolution": 16, "max_length": MAX_LENGTH, **spec}).load()


def stock(folder: Path):
    """The folder's stock pipeline, by its model_index.json's class."""
    import diffusers

    name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_teacher(folder: Path, bb, steps: int, **guidance) -> torch.Tensor:
    """The stock pipeline's images in [0, 1] at `steps` steps: the call the kind says for its
    students, with `guidance` (the pipeline's own arguments) over it."""
    pipe = stock(folder)
    call = {**bb.kind.pipeline_call(bb, steps), **guidance}
    return pipe(prompt=list(PROMPTS), generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                **call).images


def wadi_teacher(bb, steps: int, scale: float) -> torch.Tensor:
    """wadi's teacher sampling (flow-matching Euler, the kind's schedule and guidance) in [0, 1]."""
    return sample_teacher(bb, bb.net, PROMPTS, SEEDS, steps, scale, "euler") / 2 + 0.5


def distil(kind: str, folder: Path, root: Path, student_steps: int, **train) -> Path:
    """A tiny run of `kind` (its own target presets) with a student of `student_steps` steps."""
    from wadi.engine.training import distill

    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("a cat\na red car\n")
    cfg = tiny_pipes.make_cfg({"sd": folder, "prompts": root / "prompts.txt"}, root, steps=3,
                              lr_student=3e-2, **train)
    family = bb_family(kind)
    cfg.model = BackboneSpec(kind=kind, path=str(folder), resolution=16, max_length=MAX_LENGTH,
                             student_steps=student_steps)
    cfg.student = AdapterConfig("lorad", 4, f"{family}-student")
    cfg.fake = AdapterConfig("lorad", 2, f"{family}-fake")
    cfg.run.checkpoint_every = 0
    return distill(cfg, progress=False)


def bb_family(kind: str) -> str:
    from wadi.models.registry import KINDS

    return KINDS[kind].targets[0].removesuffix("-student")


def student_images(run: Path) -> torch.Tensor:
    """`wadi sample`'s images of a run's student in [0, 1] (the library call behind it)."""
    from wadi.artifacts.students import load_student

    student = load_student(run)
    return sample_student(student.backbone, student.net, PROMPTS, SEEDS) / 2 + 0.5


def run_card(export: Path, monkeypatch) -> None:
    """The Python snippet of an export's card, run as written (in the export's parent folder)."""
    from test_ecosystem import card_snippet

    language, code = card_snippet((export / "README.md").read_text())
    assert language == "python" and "prompt=" in code
    monkeypatch.chdir(export.parent)
    exec(compile(code, "card", "exec"), {})
    assert (export.parent / "image.png").is_file()
