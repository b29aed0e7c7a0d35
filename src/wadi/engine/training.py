"""A distillation run: settings checked, a run folder, the step loop with logs, sample grids
and checkpoints, and the final student (wadi.engine.distiller holds the step itself).

`distill(config)` starts a run; `distill(resume=RUN_OR_LATEST)` continues one from its
newest complete checkpoint (or from the start when it has none). A resumed run ends on the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from wadi.engine import checkpoint as ckpt
from wadi.files import locks
from wadi.adapters.core import check_attach
from wadi.errors import install_hint
from wadi.models.backbones import Backbone, check_model_path
from wadi.engine.config import DistillConfig, absolute_paths, resolve, resume_config
from wadi.engine.distiller import Distiller
from wadi.files.atomic import atomic_path, read_json_object, write_text
from wadi.files.images import save_grid
from wadi.files.prompts import read_prompts
from wadi.engine.provenance import STUDENT_RECORD, check_teacher, record_of, teacher_fingerprint
from wadi.files.run_folder import RunFolder
from wadi.engine.tracking import Progress, Tracker, trackers_for
from wadi.models.conditioning import masks_on_request


class TrainingStopped(RuntimeError):
    """The run stopped itself (a streak of non-finite losses); its last good checkpoint stays."""


def prepare(cfg: DistillConfig) -> tuple[list[str], Backbone]:
    """Everything that can fail on bad input and needs files or models, before any run
    folder is written: prompts, model folders, the precision, the timestep range."""
    d = cfg.data
    if not d.prompts:
        raise ValueError("no prompts: set data.prompts=FILE (or a Hugging Face dataset: hub id or folder)")
    prompts = read_prompts(d.prompts, d.format, dedupe=d.dedupe, split=d.split, column=d.column)
    if not cfg.model.path:
        raise ValueError("no model: set model.path=FOLDER_OR_HUB_ID")
    check_model_path(cfg.model.path)
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision=fp16 needs a CUDA GPU (on the CPU it is emulated and very slow); "
                         "use train.mixed_precision=bf16 or no")
    if cfg.run.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"run.report_to={cfg.run.report_to} needs wandb: {install_hint('wandb')}")
    backbone = cfg.model.load()
    cfg.model.kind = backbone.kind.name
    backbone.empty_cond()  # the kind's encoder runs once here, so text settings it refuses fail before the run
    if backbone.guidance_mode == "none" and cfg.train.guidance != 1:
        raise ValueError(f"setting train.guidance={cfg.train.guidance:g}: the {backbone.kind.name} model has no "
                         "guidance; use train.guidance=1")
    if backbone.guidance_mode == "embedded" and cfg.train.guidance != 1:
        raise ValueError(f"setting train.guidance={cfg.train.guidance:g}: the {backbone.kind.name} model takes its "
                         "guidance as an input, which teacher, fake model and student share; set model.guidance "
                         "instead and leave train.guidance=1")
    unknown = sorted(set(cfg.train.guidance_options) - set(backbone.kind.guidance_options))
    if unknown:
        has = ", ".join(backbone.kind.guidance_options) or "none"
        raise ValueError(f"setting train.guidance_options.{unknown[0]}: the {backbone.kind.name} model's guidance has "
                         f"no such setting (it has: {has})")
    if cfg.data.mask_prompts and not masks_on_request(backbone.kind):
        raise ValueError(f"setting data.mask_prompts masks the padding of a single CLIP encoder (the sd kind); the "
                         f"{backbone.kind.name} kind encodes prompts as its stock pipeline does: unset it")
    cfg.model.one_step_abar = backbone.process.recorded_abar()  # recorded: which generator the run trains
    last = backbone.num_train_timesteps - 1
    if cfg.train.t_max > last:
        raise ValueError(f"setting train.t_max must be at most {last} (the schedule's last timestep), "
                         f"got {cfg.train.t_max}")
    for role, adapter in (("student", cfg.student), ("fake", cfg.fake)):
        try:
            check_attach(backbone.net, adapter, backbone.kind.name)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{role} adapter: {e}") from None
    return prompts, backbone


def _run_name(cfg: DistillConfig) -> str:
    return "-".join(x for x in (cfg.preset or "custom", cfg.run.desc) if x)


def _resume(distiller: Distiller, run: RunFolder) -> bool:
    """Load the newest complete checkpoint; one that cannot be read falls back to the one
    before. False when none could be read (the run starts over)."""
    ckpt.remove_partial(run.checkpoints)
    for folder in reversed(run.complete_checkpoints()):
        try:
            ckpt.read_pieces(folder, [*distiller.state_pieces(), distiller.rng_piece()])
            return True
        except ckpt.CorruptCheckpoint as e:
            warnings.warn(f"checkpoint {folder.name} cannot be read ({e}); trying the one before")
    return False


def save_checkpoint(distiller: Distiller, run: RunFolder) -> None:
    """Every process writes its piece into one `.tmp` folder; the main process renames it
    once all have (a kill before that leaves the previous checkpoints as they were)."""
    acc = distiller.acc
    checksums = distiller.adapter_checksums()  # a collective: every process takes part
    tmp = run.checkpoint(distiller.step).with_suffix(".tmp")
    if acc.is_main_process:
        ckpt.begin(tmp)
    acc.wait_for_everyone()
    try:
        ckpt.write_pieces(tmp, [distiller.rng_piece()])
        if acc.is_main_process:  # the processes hold the same trained state: one writes it
            ckpt.write_pieces(tmp, distiller.state_pieces(checksums))
    except BaseException:  # a full disk: no half-written .tmp stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit(tmp, distiller.cfg.run.keep_checkpoints, run.complete_checkpoints)
    acc.wait_for_everyone()


def export(distiller: Distiller, run: RunFolder) -> None:
    """The final student (its EMA when there is one) as adapter files and a merged plain model."""
    with distiller.final_weights():
        distiller.fake.save(run.fake_adapter, {"step": distiller.step})
        # student.safetensors appears last (the run is finished), after the merged model; the
        # adapter is saved first: a sharded run merges the student from that file.
        with atomic_path(run.student_adapter) as adapter:
            distiller.student.save(adapter, distiller.student_metadata())
            model = distiller.merged_student(adapter)
            with atomic_path(run.student_model) as tmp:
                model.save_pretrained(tmp)
                (tmp / STUDENT_RECORD).write_text(record_of(distiller.bb).to_json() + "\n", encoding="utf-8")


def sample_grid(distiller: Distiller, run: RunFolder, tracker: Tracker) -> None:
    images = distiller.samples()
    if distiller.acc.is_main_process:
        image = save_grid(images, run.sample_grid(distiller.step), nrow=len(distiller.cfg.run.sample_seeds))
        tracker.image("samples", image, distiller.step, caption=" | ".join(distiller.cfg.data.sample_prompts))


def _multi_cpu() -> bool:
    """Several processes and no CUDA: gloo on the CPU (accelerate needs cpu=True to pick it)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _process_state():
    from accelerate import PartialState

    return PartialState(cpu=_multi_cpu())


def _resumed_run(config: str | DistillConfig | None, overrides: list[str], resume: str) -> RunFolder:
    if config and resume != "latest":
        raise ValueError(f"--config goes with a new run or --resume latest (where it names run.root); --resume "
                         f"{resume} continues with the run's own config.yaml (change what may change as "
                         "key=value)")
    root = config.run.root if isinstance(config, DistillConfig) else (
        resolve(config, overrides).run.root if config else "runs")
    return RunFolder.find(root, resume)


def settings(config: str | DistillConfig | None = None, overrides: list[str] = (),
             resume: str | None = None) -> DistillConfig:
    """The settings `distill` would run with, its local paths absolute (what config.yaml
    records), before any model is loaded; nothing is written."""
    if resume:
        return resume_config(_resumed_run(config, overrides, resume), overrides)
    cfg = config if isinstance(config, DistillConfig) else resolve(config, overrides)
    return absolute_paths(cfg.check())


def distill(config: str | DistillConfig | None = None, overrides: list[str] = (), resume: str | None = None,
            progress: bool = True, after_step: Callable[[Distiller], None] | None = None) -> Path:
    """Run (or continue) a distillation; returns the run folder. The run's lock
    (wadi.files.locks) is held throughout: a second command on the same run refuses.
    `after_step(distiller)` runs after every step, with the global random state saved and
    put back around it (periodic evaluations must not change the run)."""
    if resume:
        run = _resumed_run(config, overrides, resume)
        with locks.hold(run.path, "--resume"):
            cfg = resume_config(run, overrides)
            saved = resolve(str(run.config)).train.steps
            if run.finished and cfg.train.steps < saved:
                raise ValueError(f"--resume {run.path}: the run finished {saved} steps; train.steps={cfg.train.steps} "
                                 "would record fewer")
            cfg.check()
            prompts, backbone = prepare(cfg)
            if run.teacher.is_file():
                check_teacher(read_json_object(run.teacher, "; it records the run's teacher"), backbone, run.path)
            elif _process_state().is_main_process:  # a run from before teachers were recorded: from now on
                write_text(run.teacher, json.dumps(teacher_fingerprint(backbone)) + "\n")
            return _train(cfg, prompts, backbone, run, True, progress, after_step)
    cfg = settings(config, overrides)
    prompts, backbone = prepare(cfg)
    if not _process_state().is_main_process:
        return _train(cfg, prompts, backbone, None, False, progress, after_step)
    root_made = not Path(cfg.run.root).exists()
    run, lock = RunFolder.reserve(cfg.run.root, _run_name(cfg), yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                                  {RunFolder.TEACHER: json.dumps(teacher_fingerprint(backbone)) + "\n"})
    try:
        return _train(cfg, prompts, backbone, run, False, progress, after_step)
    except Exception:
        if not run.complete_checkpoints() and not (run.log.is_file() and run.log.stat().st_size):
            shutil.rmtree(run.path, ignore_errors=True)  # failed before anything was trained: no run to keep
        raise
    finally:
        locks.release(lock)
        if root_made:  # a root this run made, left empty by its failure
            with contextlib.suppress(OSError):
                Path(cfg.run.root).rmdir()


def _train(cfg: DistillConfig, prompts: list[str], backbone: Backbone, run: RunFolder | None, resume: bool,
           progress: bool, after_step: Callable[[Distiller], None] | None = None) -> Path:
    """The run itself: `run` is None on the processes other than the main one of a new run."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    tc, rc = cfg.train, cfg.run
    _process_state()
    multi_cpu = _multi_cpu()
    if not resume:
        run = broadcast_object_list([run])[0]
    acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=multi_cpu, project_dir=str(run.trackers),
                      log_with=trackers_for(rc, run.trackers, run.name) or None)
    torch.manual_seed(tc.seed)
    distiller = Distiller(cfg, backbone, prompts, acc)
    if resume and not _resume(distiller, run) and run.complete_checkpoints():
        torch.manual_seed(tc.seed)  # a checkpoint read in part: start over from a fresh state
        distiller = Distiller(cfg, backbone, prompts, acc)
    if distiller.step > tc.steps:
        raise ValueError(f"--resume {run.path}: its checkpoint is at step {distiller.step}; train.steps={tc.steps} "
                         "would record fewer")
    if resume and acc.is_main_process:
        write_text(run.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    acc.wait_for_everyone()

    tracker = Tracker(run.log, acc, distiller.step, cfg.to_dict(), run.name)
    bar = tqdm(total=tc.steps, initial=distiller.step, disable=not (progress and acc.is_main_process),
               desc=run.name, dynamic_ncols=True)
    t0, shown = time.time(), Progress()
    while distiller.step < tc.steps:
        out = distiller.train_step()
        distiller.nonfinite_streak = distiller.nonfinite_streak + 1 if out["skipped"] else 0
        if out["skipped"]:
            warnings.warn(f"step {distiller.step}: non-finite loss or scores, update skipped")
        if distiller.nonfinite_streak >= tc.max_nonfinite:
            last = run.complete_checkpoints()
            raise TrainingStopped(f"stopped: {distiller.nonfinite_streak} non-finite losses in a row at step "
                               f"{distiller.step}; last good checkpoint: {last[-1] if last else 'none'}")
        step = distiller.step
        bar.update(1)
        bar.set_postfix(shown.update(out))
        if step % rc.log_every == 0 or step == tc.steps:
            tracker.log({"step": step, **out, "time": round(time.time() - t0, 3)})
        if rc.sample_every and (step % rc.sample_every == 0 or step == tc.steps):
            sample_grid(distiller, run, tracker)
        if rc.checkpoint_every and step % rc.checkpoint_every == 0:
            save_checkpoint(distiller, run)
        if after_step is not None:
            with torch.random.fork_rng(devices=[]):
                after_step(distiller)
    bar.close()
    if acc.is_main_process and rc.export:
        export(distiller, run)
    acc.wait_for_everyone()
    tracker.close()
    return run.path
