"""A distillation run: settings checked, a run folder, the step loop with logs, sample grids
and checkpoints, and the final student (wadi.distill holds the step itself).

`distill(config)` starts a run; `distill(resume=RUN_OR_LATEST)` continues one from its
newest complete checkpoint (or from the start when it has none). A resumed run ends on the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from . import locks
from .adapters import check_attach
from .errors import install_hint
from .backbones import Backbone, check_model_path
from .config import DistillConfig, resolve, resume_config
from .distill import Distiller
from .files import atomic_path, write_text
from .images import save_grid
from .prompts import read_prompts
from .run_folder import RunFolder
from .tracking import Tracker, trackers_for


class TrainingStopped(RuntimeError):
    """The run stopped itself (a streak of non-finite losses); its last good checkpoint stays."""


def prepare(cfg: DistillConfig) -> tuple[list[str], Backbone]:
    """Everything that can fail on bad input and needs files or models, before any run
    folder is written: prompts, model folders, the precision, the timestep range."""
    if not cfg.data.prompts:
        raise ValueError("no prompt file: set data.prompts=PATH")
    prompts = read_prompts(cfg.data.prompts, cfg.data.format, dedupe=cfg.data.dedupe)
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
    cfg.model.one_step_abar = backbone.process.recorded_abar()  # recorded: which generator the run trains
    last = backbone.num_train_timesteps - 1
    ts = cfg.model.student_timesteps
    if ts and ts[0] != last:
        raise ValueError(f"setting model.student_timesteps must start at {last} (the student starts from pure "
                         f"noise, the schedule's last timestep), got {ts}")
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
    ckpt.write_pieces(tmp, [distiller.rng_piece()])
    if acc.is_main_process:  # the processes hold the same trained state: one writes it
        ckpt.write_pieces(tmp, distiller.state_pieces(checksums))
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
            distiller.student.save(adapter, {"step": distiller.step})
            model = distiller.merged_student(adapter)
            with atomic_path(run.student_model) as tmp:
                model.save_pretrained(tmp)


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


def distill(config: str | DistillConfig | None = None, overrides: list[str] = (), resume: str | None = None,
            progress: bool = True) -> Path:
    """Run (or continue) a distillation; returns the run folder. The run's lock
    (wadi.locks) is held throughout: a second command on the same run refuses."""
    if resume:
        if config and resume != "latest":
            raise ValueError(f"--config goes with a new run or --resume latest (where it names run.root); --resume "
                             f"{resume} continues with the run's own config.yaml (change what may change as "
                             "key=value)")
        root = config.run.root if isinstance(config, DistillConfig) else (
            resolve(config, overrides).run.root if config else "runs")
        run = RunFolder.find(root, resume)
        with locks.hold(run.path, "--resume"):
            cfg = resume_config(run, overrides)
            saved = resolve(str(run.config)).train.steps
            if run.finished and cfg.train.steps < saved:
                raise ValueError(f"--resume {run.path}: the run finished {saved} steps; train.steps={cfg.train.steps} "
                                 "would record fewer")
            cfg.check()
            prompts, backbone = prepare(cfg)
            return _train(cfg, prompts, backbone, run, True, progress)
    cfg = config if isinstance(config, DistillConfig) else resolve(config, overrides)
    cfg.check()
    prompts, backbone = prepare(cfg)
    if not _process_state().is_main_process:
        return _train(cfg, prompts, backbone, None, False, progress)
    run, lock = RunFolder.reserve(cfg.run.root, _run_name(cfg), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        return _train(cfg, prompts, backbone, run, False, progress)
    except Exception:
        if not run.complete_checkpoints() and not (run.log.is_file() and run.log.stat().st_size):
            shutil.rmtree(run.path, ignore_errors=True)  # failed before anything was trained: no run to keep
        raise
    finally:
        locks.release(lock)


def _train(cfg: DistillConfig, prompts: list[str], backbone: Backbone, run: RunFolder | None, resume: bool,
           progress: bool) -> Path:
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
                      log_with=trackers_for(rc.report_to) or None)
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
    t0 = time.time()
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
        bar.set_postfix(student=f"{out['loss_student']:.4g}", fake=f"{out['loss_fake']:.4g}")
        if step % rc.log_every == 0 or step == tc.steps:
            tracker.log({"step": step, **out, "time": round(time.time() - t0, 3)})
        if rc.sample_every and (step % rc.sample_every == 0 or step == tc.steps):
            sample_grid(distiller, run, tracker)
        if rc.checkpoint_every and step % rc.checkpoint_every == 0:
            save_checkpoint(distiller, run)
    bar.close()
    if acc.is_main_process and rc.export:
        export(distiller, run)
    acc.wait_for_everyone()
    tracker.close()
    return run.path
