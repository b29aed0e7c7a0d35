"""`wadi demo`: distill a digits world's shipped teacher into a one-step student with the
same engine as Stable Diffusion (the world's preset: digits-wadi for the UNet, digits-flow-wadi
for the rectified-flow MMDiT), once per seed, and report what it got.

One demo folder holds everything: the distillation runs (`runs/`), the evaluation
(`eval/`, written by wadi.evaluation.evaluate exactly as `wadi eval --world WORLD` writes it: the
teacher at 25 steps with the distilled guidance, at one step with and without it, every
student), and the report (`report.md`, `metrics.json`, `grid.png`, `loss.png`).
`--compare` runs the paper's adapter ablation in the same way. Every `eval_every` steps
the demo scores each student on the same prompts and seeds while it trains (wadi.digits.curve),
and the report plots those numbers against the step (`quality.png`).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from wadi.adapters.config import ADAPTERS
from wadi.adapters.core import adapter_class, attach
from wadi.engine.config import DistillConfig, resolve
from wadi.engine.presets import preset_values
from wadi.files import locks
from wadi.evaluation.evaluate import (Entry, Job, MetricSettings, Scorer, default_cache_dir, evaluate, image_path,
                                      load_function, world_metric_settings)
from wadi.files.atomic import check_out, write_text
from wadi.files.images import read_images, save_png, to_uint8
from wadi.files.run_folder import RunFolder
from wadi.models.sampling import Sampling
from wadi.artifacts.students import load_student, load_teacher
from wadi.evaluation.metrics.registry import MAIN, result_keys
from wadi.digits import paths, plugin, report, world
from wadi.digits.curve import QualityCurve
from wadi.digits.floor import real_floor

WORLDS = {w.name: w for w in (plugin.WORLD, plugin.FLOW_WORLD)}
TEACHER_STEPS = 25
# What "distillation works" means here (docs/digits.md), as shares of the 25-step teacher's
# numbers and of where the student starts (the unguided one-step teacher).
BAR = {"alignment": 0.95,  # every seed: at least this share of the teacher's alignment
       "median": 2.0, "worst": 3.0,  # Frechet: median and worst seed at most this many times the teacher's
       "from_start": 0.5,  # every seed at most this share of the unguided one-step teacher's Frechet
       "teacher": 3.0}  # the teacher distilled: at most this many times the real digits' own Frechet
# The student's learning rate per adapter, each in its own units (angles, low-rank factors,
# weights), from short sweeps in this world (docs/digits.md).
# LoRaD's is each world's preset's; the others were swept on the digits world only.
STUDENT_LR = {"lorad": preset_values(plugin.WORLD.preset_name)["train"]["lr_student"], "lora": 3e-4, "dora": 3e-4,
              "dora-frozen": 3e-4, "full": 3e-5}


@dataclass
class DemoSettings:
    world: str = plugin.WORLD.name
    adapter: str = "lorad"
    rank: int | None = None  # None: the preset's
    fake_rank: int | None = None
    steps: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    per_class: int = 50  # evaluation images per digit
    eval_every: int = 250  # steps between the evaluations of the quality curve; 0: none
    root: str = "runs"  # where the numbered demo folder goes
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.world not in WORLDS:
            raise ValueError(f"unknown world {self.world!r}; the demo runs one of {', '.join(WORLDS)}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {', '.join(ADAPTERS)}")
        for name in ("rank", "fake_rank", "steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.per_class < 1:
            raise ValueError(f"--per-class must be at least 1, got {self.per_class}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be 0 (none) or a number of steps, got {self.eval_every}")
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct seeds >= 0, got {self.seeds}")
        if any(o.startswith(("train.seed=", "run.root=")) for o in self.overrides):
            raise ValueError("the demo sets train.seed (use --seeds) and run.root (use --root or --out) itself")


def distill_config(s: DemoSettings, root: Path, seed: int, adapter: str | None = None) -> DistillConfig:
    adapter = adapter or s.adapter
    preset = WORLDS[s.world].preset_name
    lr = preset_values(preset)["train"]["lr_student"] if adapter == "lorad" else STUDENT_LR[adapter]
    overrides = [f"student.kind={adapter}", f"train.lr_student={lr}", f"run.root={root}",
                 f"run.desc={adapter}-seed{seed}", f"train.seed={seed}"]
    overrides += [f"student.rank={s.rank}"] if s.rank else []
    overrides += [f"fake.rank={s.fake_rank}"] if s.fake_rank else []
    overrides += [f"train.steps={s.steps}"] if s.steps else []
    return resolve(preset, overrides + list(s.overrides))


def check(s: DemoSettings, compare: bool = False) -> list[DistillConfig]:
    """Every distillation the demo will run, resolved and checked (nothing is written)."""
    if compare:
        if len(s.seeds) > 1 or s.adapter != DemoSettings.adapter:
            raise ValueError("--compare runs every adapter at one seed: give it neither --adapter nor several --seeds")
        return [distill_config(s, Path("."), s.seeds[0], kind) for kind in ADAPTERS]
    return [distill_config(s, Path("."), seed) for seed in s.seeds]


def trainable(cfg: DistillConfig, net: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters of student and fake model (counted on empty meta copies) and the teacher's size."""
    def count(adapter_cfg) -> int:
        with torch.device("meta"):
            empty = type(net).from_config(net.config)
        return attach(empty, adapter_cfg).num_trainable()

    return {"student": count(cfg.student), "fake": count(cfg.fake), "teacher": sum(p.numel() for p in net.parameters())}


def _metric_settings(s: DemoSettings) -> tuple[MetricSettings, object]:
    """The world's evaluation, as `wadi eval --world WORLD` runs it."""
    ev = WORLDS[s.world].evaluation(10 * s.per_class, default_cache_dir())
    return world_metric_settings(ev, default_cache_dir()), ev


def _curve(s: DemoSettings, metrics: MetricSettings, ev) -> QualityCurve | None:
    """The periodic evaluation of one run: the evaluation's prompts and seeds, its features and reference."""
    if not s.eval_every:
        return None
    n = len(ev.prompts.prompts)
    reference = Job(Scorer(metrics, "cpu", False), [], []).reference_features(MAIN)
    return QualityCurve(s.eval_every, ev.prompts.prompts, list(range(n)), load_function(metrics.features.spec,
                        "--features"), reference, metrics.kid_subsets, metrics.kid_subset_size)


def _one_step(spec):
    """The teacher's spec for its one-step rows, whatever steps the students take."""
    return replace(spec, student_steps=None, student_timesteps=None)


def _teacher_entries(teacher, guidance: float) -> list[Entry]:
    return [Entry("teacher-25", teacher, Sampling(student=False, steps=TEACHER_STEPS, guidance=guidance)),
            Entry("teacher-1", teacher, Sampling(guidance=guidance)),
            Entry("teacher-1-unguided", teacher, Sampling())]


TITLES = {"teacher-25": f"teacher, {TEACHER_STEPS} steps", "teacher-1": "teacher, 1 step",
          "teacher-1-unguided": "teacher, 1 step, no guidance"}


def _real_rows(out: Path, scorer: Scorer, n: int) -> list[dict]:
    """Real held-out digits, written and scored like generated ones, and the floor: their
    Frechet distance and KID read at the evaluation's n images (wadi.digits.floor)."""
    images, labels = world.load("heldout")
    folder = out / "real-heldout"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [world.class_prompts(int(label))[0] for label in labels]
    for i, img in enumerate(to_uint8(images)):
        save_png(img, image_path(folder, i))
    paths_ = [image_path(folder, i) for i in range(len(images))]
    scores = scorer.score(paths_, prompts)
    job = Job(scorer, paths_, prompts)
    floor = real_floor(job.features(MAIN), labels.numpy(), job.reference_features(MAIN), n, scores)
    measured = {"name": f"real digits (held-out, {len(images)} images)", "nfe": None, "n": len(images),
                "images_per_s": None, **scores}
    return [measured, {"name": f"real digits at {n} images (the floor)", "nfe": None, "n": n, "images_per_s": None,
                       "fid": floor["fid"]["at_n"], "kid": floor["kid"]["at_n"], "floor": floor}]


def _rows(results: dict, names: list[str], metrics: MetricSettings) -> list[dict]:
    keys = result_keys(metrics.metrics)
    rows = []
    for name in names:
        r = results["models"][name]
        nfe = Sampling(**{k: v for k, v in r["sampling"].items() if k in ("student", "steps", "guidance")}).nfe
        rows.append({"name": TITLES.get(name, name), "entry": name, "nfe": nfe, "n": r["num_images"],
                     "images_per_s": round(r["num_images"] / max(r["generation"]["sampling_seconds"], 1e-9), 1),
                     **{k: r[k] for k in keys}})
    return rows


def criteria(teacher: dict, unguided: dict, students: list[dict], real: dict) -> dict:
    """The bar, as numbers and verdicts."""
    fids = [r["fid"] for r in students]
    median, worst = statistics.median(fids), max(fids)
    return {"teacher_vs_real": teacher["fid"] / real["fid"],
            "teacher_ok": teacher["fid"] <= BAR["teacher"] * real["fid"],
            "alignment_ratios": [r["alignment"] / teacher["alignment"] for r in students],
            "alignment_ok": all(r["alignment"] >= BAR["alignment"] * teacher["alignment"] for r in students),
            "median_fid": median, "median_ratio": median / teacher["fid"],
            "median_ok": median <= BAR["median"] * teacher["fid"],
            "worst_fid": worst, "worst_ratio": worst / teacher["fid"], "worst_ok": worst <= BAR["worst"] * teacher["fid"],
            "from_start_ratios": [f / unguided["fid"] for f in fids],
            "from_start_ok": all(f <= BAR["from_start"] * unguided["fid"] for f in fids),
            # The floor holds when no student is closer to the reference than real digits of its set size.
            "below_floor": [r["name"] for r in students if any(k in r and k in real and r[k] < real[k]
                                                               for k in ("fid", "kid"))]}


def _images(out: Path, name: str, n: int):
    return read_images([image_path(out / name, i) for i in range(n)])


@contextlib.contextmanager
def _folder(s: DemoSettings, out: str | Path | None, force: bool, name: str) -> Iterator[Path]:
    """The demo folder for the block; one this command made goes again when the block fails
    before anything was written into it (a distillation refused at its start)."""
    made = out is None or not Path(out).exists()
    root_made = out is None and not Path(s.root).exists()
    if out is None:
        folder, lock = RunFolder.reserve(s.root, name)
        locks.release(lock)  # a new number: no other command looks for it
        folder = folder.path
    else:
        folder = check_out(out, force)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for path in [folder] * made + [Path(s.root)] * root_made:
            with contextlib.suppress(OSError):  # only an empty one
                path.rmdir()
        raise


def run_demo(s: DemoSettings, out: str | Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """A distillation per seed, evaluated together; returns the demo folder."""
    from wadi.engine.training import distill

    t0 = time.perf_counter()
    paths.minilm_dir()  # a missing text encoder fails here, before any work
    configs = check(s)  # bad settings fail before any folder
    metrics, ev = _metric_settings(s)
    runs, seconds, curves, curve_seconds = [], [], {}, 0.0
    with _folder(s, out, force, f"{s.world}-demo") as folder:
        for seed in s.seeds:
            curve = _curve(s, metrics, ev)
            start = time.perf_counter()
            runs.append(distill(distill_config(s, folder / "runs", seed), progress=progress, after_step=curve))
            seconds.append(time.perf_counter() - start - (curve.seconds if curve else 0))
            if curve is not None:
                curves[seed], curve_seconds = curve.points, curve_seconds + curve.seconds
    cfg = configs[0]
    t_eval = time.perf_counter()
    teacher = load_teacher(None, _one_step(cfg.model))
    students = {f"student-seed{seed}": load_student(run) for seed, run in zip(s.seeds, runs)}
    entries = _teacher_entries(teacher, cfg.train.guidance) + [Entry(n, m, Sampling.for_student(m.backbone)) for n, m in students.items()]
    results = evaluate(entries, ev.prompts, 0, folder / "eval", metrics, batch_size=100, progress=progress,
                       device="cpu")
    n = len(ev.prompts.prompts)
    real = _real_rows(folder / "eval", Scorer(metrics, "cpu", progress), n)
    eval_s = time.perf_counter() - t_eval
    rows = _rows(results, [e.name for e in entries], metrics)
    student_rows = rows[3:]
    for row, seed, run, secs in zip(student_rows, s.seeds, runs, seconds):
        row.update(seed=seed, run_dir=str(run), distill_seconds=round(secs, 1))
    summary = {"world": s.world, "preset": WORLDS[s.world].preset_name, "settings": asdict(s),
               "trainable": trainable(cfg, teacher.net), "bar": BAR,
               "distill": {"adapter": cfg.student.kind, "student_rank": cfg.student.rank if
                           adapter_class(cfg.student.kind).ranked else None, "fake_rank": cfg.fake.rank,
                           "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
                           "lr_student": cfg.train.lr_student, "lr_fake": cfg.train.lr_fake,
                           "guidance": cfg.train.guidance, "t_min": cfg.train.t_min, "t_max": cfg.train.t_max,
                           "student_steps": cfg.model.student_steps or 1},
               "teacher_sampling": {"steps": TEACHER_STEPS, "guidance": cfg.train.guidance,
                                    "scheduler": teacher.backbone.process.default_sampler},
               "seconds": {"distill": [round(x, 1) for x in seconds], "quality_curve": round(curve_seconds, 1),
                           "evaluate": round(eval_s, 1),
                           "total": round(time.perf_counter() - t0, 1)},
               "rows": rows + real, "eval_every": s.eval_every, "curves": curves,
               "criteria": criteria(rows[0], rows[2], student_rows, real[-1])}
    panels = {row["name"]: _images(folder / "eval", row["entry"], n) for row in rows[:3]}
    by_fid = sorted(student_rows, key=lambda r: r["fid"])
    shown = [by_fid[0]] if len(by_fid) == 1 else [by_fid[0], by_fid[-1]]
    for row, label in zip(shown, ["student, 1 step" if len(by_fid) == 1 else "best seed", "worst seed"]):
        panels[f"{label} ({row['seed']})" if len(by_fid) > 1 else label] = _images(folder / "eval", row["entry"], n)
    report.side_by_side(panels).save(folder / "grid.png")
    for row in student_rows:
        report.side_by_side({f"seed {row['seed']}": _images(folder / "eval", row["entry"], n)}).save(
            folder / "eval" / f"grid-seed{row['seed']}.png")
    report.loss_plot({f"seed {seed}": RunFolder(run).log for seed, run in zip(s.seeds, runs)}, folder / "loss.png")
    if curves:
        report.quality_plot(summary, folder / "quality.png")
    write_text(folder / "metrics.json", json.dumps(summary, indent=1) + "\n")
    write_text(folder / "report.md", report.demo_markdown(summary))
    return folder


def run_compare(s: DemoSettings, out: str | Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """The adapter ablation: the same distillation (the first seed) with every adapter kind, one table."""
    from wadi.engine.training import distill

    t0 = time.perf_counter()
    paths.minilm_dir()
    seed = s.seeds[0]
    configs = dict(zip(ADAPTERS, check(s, compare=True)))
    metrics, ev = _metric_settings(s)
    shared = configs["lorad"]
    entries, results_extra = [], {}
    with _folder(s, out, force, f"{s.world}-compare") as folder:
        teacher = load_teacher(None, _one_step(shared.model))
        entries.append(_teacher_entries(teacher, shared.train.guidance)[0])
        for kind in ADAPTERS:
            start = time.perf_counter()
            run = distill(distill_config(s, folder / "runs", seed, kind), progress=progress)
            student = load_student(run)
            entries.append(Entry(f"student-{kind}", student, Sampling.for_student(student.backbone)))
            results_extra[kind] = {"run_dir": str(run), "distill_seconds": round(time.perf_counter() - start, 1),
                                   "trainable": trainable(configs[kind], teacher.net)["student"]}
    results = evaluate(entries, ev.prompts, 0, folder / "eval", metrics, batch_size=100, progress=progress,
                       device="cpu")
    rows = _rows(results, [e.name for e in entries], metrics)
    adapters = [{"adapter": kind, "rank": configs[kind].student.rank if adapter_class(kind).ranked else None,
                 "lr": configs[kind].train.lr_student, **results_extra[kind], **row}
                for kind, row in zip(ADAPTERS, rows[1:])]
    n = len(ev.prompts.prompts)
    panels = {rows[0]["name"]: _images(folder / "eval", "teacher-25", n)}
    panels.update({kind: _images(folder / "eval", f"student-{kind}", n) for kind in ADAPTERS})
    report.side_by_side(panels, columns=4).save(folder / "grid.png")
    summary = {"world": s.world, "preset": WORLDS[s.world].preset_name, "settings": asdict(s),
               "teacher_params": sum(p.numel() for p in teacher.net.parameters()),
               "teachers": rows[:1], "adapters": adapters, "seconds": round(time.perf_counter() - t0, 1)}
    write_text(folder / "compare.json", json.dumps(summary, indent=1) + "\n")
    write_text(folder / "compare.md", report.compare_markdown(summary))
    return folder
