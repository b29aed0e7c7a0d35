"""What a student was distilled with, recorded in everything that holds it, and checked
wherever it is loaded; and the teacher a run started with, checked when it resumes.

A student needs more than its weights to sample right: its backbone settings (kind,
resolution, text length, the VP generator's abar_T, its steps and their times: the
`BackboneSpec` fields that say how it samples) and the noise process it learnt (the
scheduler values that define it). Its adapter files carry them in their metadata
(`trained_with`), its merged model folder in `wadi_student.json`, an export in its
manifest (`base` and `process`). A loader fills what the user left out from the record
and refuses an option that contradicts it, and refuses a base model whose process is
another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from wadi.adapters.file import SAMPLE_RTOL, content_sample, fingerprint
from wadi.models.backbones import Backbone, BackboneSpec
from wadi.errors import CorruptFile, brief, describe
from wadi.files.atomic import loads_json

TRAINED_WITH = "trained_with"  # the adapter metadata key
STUDENT_RECORD = "wadi_student.json"  # beside a merged student's config.json
RECORD_FORMAT = "wadi-student/1"
# What a student records of its BackboneSpec, and the option that would contradict each.
RECORDED = {"kind": "--kind", "resolution": "--resolution", "max_length": "--max-length",
            "one_step_abar": "--one-step-abar", "student_steps": "model.student_steps",
            "student_timesteps": "model.student_timesteps"}


def process_settings(process) -> dict:
    """The scheduler values that define a noise process (not how it is sampled): VP's
    prediction and schedule, a flow's shift; each under the name a message shows."""
    if process.name == "flow":
        return {"process": "flow", "num_train_timesteps": process.num_train_timesteps, "flow shift": process.shift}
    c = process.config
    betas = c.get("trained_betas")
    return {"process": "vp", "prediction type": process.prediction_type,
            "num_train_timesteps": process.num_train_timesteps, "beta_schedule": c.get("beta_schedule"),
            "beta_start": c.get("beta_start"), "beta_end": c.get("beta_end"),
            "rescale_betas_zero_snr": bool(c.get("rescale_betas_zero_snr", False)),
            "trained_betas": None if betas is None else
            hashlib.sha256(json.dumps([float(b) for b in betas]).encode()).hexdigest()[:16]}


def first_difference(before: dict, now: dict) -> tuple[str, object, object] | None:
    """(name, before, now) of the first setting that differs; None when all agree."""
    for key in [*before, *(k for k in now if k not in before)]:
        if before.get(key) != now.get(key):
            return key, before.get(key), now.get(key)
    return None


@dataclass
class Record:
    """A student's record: its BackboneSpec settings and its process (None: unknown)."""

    spec: BackboneSpec
    process: dict | None

    def to_json(self) -> str:
        return json.dumps({"format": RECORD_FORMAT, "spec": {k: getattr(self.spec, k) for k in RECORDED},
                           "process": self.process})


def record_of(backbone: Backbone) -> Record:
    """What a student on `backbone` samples with, every value as it is in effect."""
    spec = BackboneSpec(kind=backbone.kind.name, resolution=backbone.resolution, max_length=backbone.max_length,
                        one_step_abar=backbone.process.recorded_abar(), student_steps=backbone.student_steps,
                        student_timesteps=backbone.spec.student_timesteps)
    return Record(spec, process_settings(backbone.process))


def checked_process(value, where: str) -> dict | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
                                            for k, v in value.items())):
        raise CorruptFile(f"{where}: process must be a mapping of settings, got {brief(value)}")
    return value


def parse(text: str, where: str) -> Record:
    """A record as written by Record.to_json; damage is one CorruptFile naming `where`."""
    # config imports the loaders through the worlds' presets: imported where it is used
    from wadi.engine.config import recorded_spec

    try:
        data = loads_json(text)
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a {RECORD_FORMAT} record")
        spec = recorded_spec({k: v for k, v in data.get("spec", {}).items() if k in RECORDED}, "spec")
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise CorruptFile(f"{where}: its record of how the student was distilled is damaged "
                          f"({describe(e) or type(e).__name__})") from None
    return Record(spec, checked_process(data.get("process"), where))


def adapter_record(meta: dict[str, str], where: Path) -> Record | None:
    """The record in an adapter file's metadata; None in files written before it was kept."""
    return parse(meta[TRAINED_WITH], str(where)) if TRAINED_WITH in meta else None


def folder_record(folder: Path) -> Record | None:
    """The record beside a merged student model; None when there is none."""
    path = folder / STUDENT_RECORD
    return parse(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else None


def settle(given: BackboneSpec, recorded: BackboneSpec, source) -> BackboneSpec:
    """`given` (what the user asked for) with what it leaves out taken from `recorded`; a
    value of its that contradicts the record is refused in one line."""
    for name, option in RECORDED.items():
        mine, theirs = getattr(given, name), getattr(recorded, name)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"{source} was distilled with {name.replace('_', ' ')} {theirs}, not {mine} "
                             f"({option}): leave {option} out, the student records it")
    return given.filled(**{name: getattr(recorded, name) for name in RECORDED})


def check_process(backbone: Backbone, process: dict | None, source) -> None:
    """Refuse a base model whose noise process is not the one the student learnt."""
    if process is None:
        return
    diff = first_difference(process, process_settings(backbone.process))
    if diff:
        name, theirs, ours = diff
        raise ValueError(f"{source} was distilled under {name} {theirs!r}, but the base model "
                         f"{backbone.spec.path} has {ours!r} (its scheduler); give the base it was distilled from")


# --- a run's teacher -------------------------------------------------------------------------

def teacher_fingerprint(backbone: Backbone) -> dict:
    """What identifies a run's teacher: its kind, process and denoiser class, the names
    and shapes of the denoiser's weights, and a sample of their values."""
    net = backbone.net
    names = [n for n, m in net.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    return {"kind": backbone.kind.name, "process": process_settings(backbone.process),
            "denoiser": type(net).__name__, "layers": fingerprint(net, names), "sample": content_sample(net, names)}


def check_teacher(saved: dict, backbone: Backbone, run) -> None:
    """Refuse to resume `run` on a teacher other than the one it started with, naming what changed."""
    now = teacher_fingerprint(backbone)
    what = {"kind": "backbone kind", "denoiser": "denoiser class", "layers": "denoiser's layers (names and shapes)"}
    diff = first_difference(saved.get("process") or {}, now["process"])
    if diff is None:
        diff = next(((what[k], saved.get(k), now[k]) for k in what if saved.get(k) != now[k]), None)
    if diff is not None:
        name, before, after = diff
        raise ValueError(f"--resume {run}: the teacher's {name} was {before!r} when the run started and is "
                         f"{after!r} now; resume with the teacher the run started with, or start a new run")
    before = saved.get("sample")
    if before is not None and now["sample"] is not None and (len(before) != len(now["sample"]) or not torch.allclose(
            torch.tensor(before, dtype=torch.float32), torch.tensor(now["sample"]), rtol=SAMPLE_RTOL, atol=1e-6)):
        raise ValueError(f"--resume {run}: the teacher has other weights than the run started with (the same "
                         "shapes, other values); resume with the teacher the run started with, or start a new run")
