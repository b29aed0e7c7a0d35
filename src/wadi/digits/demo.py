"""`wadi demo`: distil the shipped digits teacher into a one-step student with the same
engine as Stable Diffusion (wadi.distill.distill, preset digits-wadi) and report what it got.

One run: distil, then sample the teacher at 25 steps with guidance, the teacher at one
step (with the same guidance, and without: the student's starting point) and the student
at one step, all on the same prompts and seeds; score them; write report.md, grid.png,
loss.png and metrics.json. --compare runs the paper's adapter ablation in this world.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapters import KINDS, adapter_class, attach
from ..config import DistillConfig, preset_values, resolve
from ..run_folder import RunFolder
from ..sampling import Sampling
from . import evaluation, paths, report
from .classifier import load_classifier
from .teacher import load_teacher

PRESET = "digits-wadi"
TEACHER_STEPS = 25
# What "the student kept the teacher's quality" means (the acceptance bar).
MIN_ALIGNMENT_RATIO = 0.9  # student alignment / 25-step teacher alignment
MAX_FRECHET_RATIO = 1.5  # student Frechet / 25-step teacher Frechet


@dataclass
class DemoSettings:
    adapter: str = "lorad"
    rank: int | None = None  # None: the preset's
    fake_rank: int | None = None
    steps: int | None = None
    per_class: int = 50  # evaluation images per digit
    fid: bool = False
    root: str = "runs"
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.adapter not in KINDS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {', '.join(KINDS)}")
        for name in ("rank", "fake_rank", "steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.per_class < 1:
            raise ValueError(f"--per-class must be at least 1, got {self.per_class}")


# The student's learning rate per adapter, each in its own units (angles, low-rank factors,
# weights), from short sweeps in this world at seed 0 (docs/digits.md). Full
# fine-tuning at LoRaD's rate diverges within 300 steps.
STUDENT_LR = {"lorad": preset_values(PRESET)["train"]["lr_student"], "lora": 3e-4, "dora": 3e-4, "dora-frozen": 3e-4,
              "full": 3e-6}


def distill_config(s: DemoSettings, adapter: str | None = None) -> DistillConfig:
    adapter = adapter or s.adapter
    overrides = [f"student.kind={adapter}", f"train.lr_student={STUDENT_LR[adapter]}", f"run.root={s.root}",
                 f"run.desc={adapter}"]
    overrides += [f"student.rank={s.rank}"] if s.rank else []
    overrides += [f"fake.rank={s.fake_rank}"] if s.fake_rank else []
    overrides += [f"train.steps={s.steps}"] if s.steps else []
    return resolve(PRESET, overrides + list(s.overrides))


def trainable_counts(cfg: DistillConfig, backbone) -> dict[str, int]:
    """Trainable parameters of student and fake model, and the teacher's size."""
    return {"student": attach(copy.deepcopy(backbone.net), cfg.student).num_trainable(),
            "fake": attach(copy.deepcopy(backbone.net), cfg.fake).num_trainable(),
            "teacher": sum(p.numel() for p in backbone.net.parameters())}


def distill_student(cfg: DistillConfig, progress: bool):
    """Run the engine; the exported merged student and the run's folder and wall time."""
    from diffusers import UNet2DConditionModel

    from ..training import distill

    t0 = time.perf_counter()
    run_dir = distill(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    return UNet2DConditionModel.from_pretrained(run_dir / "student").eval(), run_dir, seconds


def teacher_rows(backbone, classifier, guidance: float, s: DemoSettings, progress: bool) -> list[evaluation.Row]:
    """The teacher at 25 steps and at one with the guidance the student distils (the distribution it
    learns), and unguided in one step (the student's sampler, where distillation starts)."""
    rows = [(f"teacher, {TEACHER_STEPS} steps", Sampling(one_step=False, steps=TEACHER_STEPS, guidance=guidance)),
            ("teacher, 1 step", Sampling(guidance=guidance)),
            ("teacher, 1 step, no guidance", Sampling())]
    return [evaluation.sample_row(name, backbone, backbone.net, sampling, classifier, s.per_class, s.fid, progress)
            for name, sampling in rows]


def criteria(teacher: dict, teacher_1: dict, student: dict) -> dict:
    """The acceptance bar, as numbers and verdicts."""
    a_ratio = student["alignment"] / max(teacher["alignment"], 1e-12)
    f_ratio = student["frechet"] / max(teacher["frechet"], 1e-12)
    # "Far worse": below half the alignment, or at least twice the distance, of the worse of the two.
    far_worse = (teacher_1["alignment"] < 0.5 * min(teacher["alignment"], student["alignment"])
                 or teacher_1["frechet"] >= 2 * max(teacher["frechet"], student["frechet"]))
    return {"alignment_ratio": a_ratio, "alignment_ok": a_ratio >= MIN_ALIGNMENT_RATIO,
            "frechet_ratio": f_ratio, "frechet_ok": f_ratio <= MAX_FRECHET_RATIO,
            "teacher_1_step_far_worse": far_worse}


def run_demo(s: DemoSettings, out: str | Path | None = None, progress: bool = True) -> Path:
    """One distillation and its report; returns the report folder (the run folder by default)."""
    t0 = time.perf_counter()
    paths.minilm_dir()  # a missing text encoder fails here, before any work
    classifier = load_classifier()
    cfg = distill_config(s)
    backbone = load_teacher(cfg.model.path)  # the teacher distilled, also under a model.path override
    counts = trainable_counts(cfg, backbone)
    student, run_dir, distill_s = distill_student(cfg, progress)
    t_eval = time.perf_counter()
    rows = teacher_rows(backbone, classifier, cfg.train.guidance, s, progress)
    rows.append(evaluation.sample_row("student, 1 step", backbone, student, Sampling(), classifier,
                                      s.per_class, s.fid, progress))
    eval_s = time.perf_counter() - t_eval
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    report.side_by_side({r.name: r.images for r in rows}).save(out / "grid.png")
    report.loss_plot(run_dir / "log.jsonl", out / "loss.png")
    table = [r.to_dict() for r in rows] + [evaluation.real_row(classifier)]
    summary = {"run_dir": str(run_dir), "settings": asdict(s), "trainable": counts,
               "distill": {"adapter": cfg.student.kind,
                           "student_rank": cfg.student.rank if adapter_class(cfg.student.kind).ranked else None, "fake_rank": cfg.fake.rank,
                           "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
                           "lr_student": cfg.train.lr_student, "lr_fake": cfg.train.lr_fake,
                           "fake_adapter": cfg.fake.kind, "guidance": cfg.train.guidance},
               "teacher_sampling": {"steps": TEACHER_STEPS, "guidance": cfg.train.guidance, "scheduler": "ddim"},
               "seconds": {"distill": round(distill_s, 1), "evaluate": round(eval_s, 1),
                           "total": round(time.perf_counter() - t0, 1)},
               "rows": table, "criteria": criteria(*(r.to_dict() for r in (rows[0], rows[1], rows[-1])))}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(report.demo_markdown(summary))
    return out


def run_compare(s: DemoSettings, out: str | Path | None = None, progress: bool = True) -> Path:
    """The adapter ablation: the same distillation with every adapter kind, one table."""
    t0 = time.perf_counter()
    paths.minilm_dir()
    classifier = load_classifier()
    shared = distill_config(s)  # what every adapter's run has in common: teacher, guidance
    backbone = load_teacher(shared.model.path)
    out = Path(out) if out else RunFolder.reserve(s.root, "digits-compare").path
    teachers = teacher_rows(backbone, classifier, shared.train.guidance, s, progress)
    results, panels = [], {teachers[0].name: teachers[0].images}
    for kind in KINDS:
        cfg = distill_config(s, kind)
        counts = trainable_counts(cfg, backbone)
        student, run_dir, distill_s = distill_student(cfg, progress)
        row = evaluation.sample_row(f"student, {kind}", backbone, student, Sampling(), classifier, s.per_class,
                                    s.fid, progress)
        panels[kind] = row.images
        results.append({"adapter": kind, "rank": cfg.student.rank if adapter_class(kind).ranked else None,
                        "lr": cfg.train.lr_student,
                        "trainable": counts["student"], **row.to_dict(), "distill_seconds": round(distill_s, 1),
                        "run_dir": str(run_dir)})
    out.mkdir(parents=True, exist_ok=True)
    report.side_by_side(panels, columns=4).save(out / "grid.png")
    summary = {"settings": asdict(s), "teacher_params": sum(p.numel() for p in backbone.net.parameters()),
               "teachers": [r.to_dict() for r in teachers], "adapters": results,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "compare.md").write_text(report.compare_markdown(summary))
    return out
