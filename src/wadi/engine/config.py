"""Distillation settings: dataclasses, YAML files and dotted overrides over a preset (wadi.engine.presets).

`resolve("sd15-wadi", ["model.path=/data/sd15", "train.steps=1000"])` expands a preset
(or a YAML file, which may name a preset under `preset:`), applies the overrides, converts
every value to its field's type and checks every key, range and relation, so that a bad
setting is one clear line before anything is loaded or written. The resolved config is
written into each run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wadi.adapters.core import AdapterConfig, adapter_class
from wadi.models.backbones import KINDS, BackboneSpec, get_kind
from wadi.errors import brief
from wadi.models.process import SCHEDULER
from wadi.engine.presets import deep_update, preset_names, preset_values
from wadi.files.prompts import FORMATS as PROMPT_FORMATS
from wadi.files.prompts import check_prompts
from wadi.adapters.targets import resolve_rule

MIXED_PRECISION = ("no", "fp16", "bf16")  # accelerate's names
PARALLEL = ("ddp", "fsdp2")
FSDP_PARAM_DTYPES = ("keep", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
REPORT_TO = ("tensorboard", "wandb", "all", "none")  # accelerate's trackers
MAX_SEED = 2**64 - 1  # the largest torch.Generator.manual_seed takes


@dataclass
class DataConfig:
    prompts: str = ""  # prompt file (.txt, .jsonl with JourneyDB's too, COCO captions .json) or a dataset: hub id,
    # saved folder, .parquet / .csv / .arrow file
    format: str = "auto"  # auto | txt | jsonl | coco | dataset (a .json or .jsonl read by datasets)
    split: str = "train"  # a dataset's split
    column: str | None = None  # a dataset's text column; None: the first of prompt, caption, text
    dedupe: bool = True  # sorted unique prompts, as the authors read JourneyDB
    cache_embeddings: bool = False  # encode every prompt once up front (small prompt sets)
    mask_prompts: bool = False  # the sd kind: mask CLIP's padding for training prompts (the authors' loader)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road",
        "a bowl of fruit on a wooden table", "an astronaut riding a horse"])


@dataclass
class TrainConfig:
    steps: int = 21875  # 2 epochs over 1.4M prompts at a global batch of 128
    batch_size: int = 16  # per process: a step's global batch is batch_size x processes x grad_accum
    grad_accum: int = 1
    lr_student: float = 1e-4
    lr_fake: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: constant | cosine | linear (decay to 0 at the last step)
    max_grad_norm: float = 1.0
    guidance: float = 1.5  # on both teacher and fake model
    guidance_options: dict[str, float] = field(default_factory=dict)  # the kind's further guidance settings
    t_min: int = 20
    t_max: int = 980
    fake_uncond_prob: float = 0.1
    fake_steps: int = 1  # fake-model updates per student update (DMD2's two time-scale rule uses 5)
    mixed_precision: str = "no"  # no | fp16 | bf16; adapter parameters stay fp32
    gradient_checkpointing: bool = False  # activation checkpointing of the denoiser's blocks
    parallel: str = "ddp"  # several processes: every one holds the frozen base whole (ddp) or a shard (fsdp2)
    fsdp_param_dtype: str = "keep"  # fsdp2: the base's blocks gathered in their own dtype (keep) or bf16
    cpu_offload: bool = False  # fsdp2: the base's shards wait in CPU memory between uses (needs CUDA)
    adam_8bit: bool = False  # bitsandbytes AdamW8bit when installed
    ema_decay: float | None = None  # EMA of the student's trainable parameters: the final student
    seed: int = 0
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops


@dataclass
class RunConfig:
    root: str = "runs"  # numbered run folders go here
    desc: str = ""  # appended to the folder name
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 500  # validation grid; 0 disables
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1])
    export: bool = True  # write the merged student as a plain diffusers model at the end
    report_to: str = "tensorboard"  # tensorboard | wandb | all | none, through accelerate's trackers
    wandb_project: str = "wadi"  # the W&B project of the run
    wandb_entity: str | None = None  # the W&B team or user; None: your default entity


@dataclass
class DistillConfig:
    model: BackboneSpec = field(default_factory=lambda: BackboneSpec(kind="sd"))
    student: AdapterConfig = field(default_factory=lambda: AdapterConfig("lorad", 256))
    fake: AdapterConfig = field(default_factory=lambda: AdapterConfig("lorad", 32))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> "DistillConfig":
        """Every range and relation that needs no model; raises ValueError naming the setting."""
        _check_config(self)
        return self


# --- YAML and types ----------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans,
    which turns `train.mixed_precision=no` into False."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _refuse_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML keeps the last of two silently."""
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {brief(key)}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.construct_mapping = _refuse_duplicates


def load_yaml(text: str):
    """YAML as settings read it; nesting deeper than Python recurses is a YAMLError too."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value, annotation, where: str):
    """`value` as the field's type, or a ValueError naming the setting."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"setting {where} must be true or false, got {brief(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"setting {where} must be an integer, got {brief(value)}") from None
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise ValueError(f"setting {where} must be a number, got {brief(value)}") from None
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"setting {where} must be a string, got {brief(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"setting {where} must be a list, got {brief(value)}")
        if origin is tuple:
            if len(value) != len(args):
                raise ValueError(f"setting {where} must be a list of {len(args)} values, got {brief(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"setting {where} must be a mapping, got {brief(value)}")
        return value
    raise TypeError(f"no conversion for the type of {where}: {annotation}")


_NESTED = {"model": BackboneSpec, "student": AdapterConfig, "fake": AdapterConfig, "data": DataConfig,
           "train": TrainConfig, "run": RunConfig}


def _build(cls, values: dict, where: str):
    """A dataclass from a complete dict, with a clear error for unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown setting {where}{unknown[0]}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in values.items():
        if name in _NESTED and cls is DistillConfig:
            if not isinstance(value, dict):
                raise ValueError(f"setting {where}{name} must be a section of keys, got {brief(value)}")
            value = _build(_NESTED[name], value, f"{where}{name}.")
        elif name == "targets" and cls is AdapterConfig:
            if value is not None and not isinstance(value, (str, dict)):
                raise ValueError(f"setting {where}targets must be a preset name or include/exclude lists, "
                                 f"got {brief(value)}")
        else:
            value = _coerce(value, hints[name], where + name)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where.rstrip('.')}: {e}") from None


def resolve(config: str, overrides: list[str] = (), expand_preset: bool = True) -> DistillConfig:
    """Expand a preset name or YAML file, apply `key=value` overrides, convert and check.
    A run's saved config.yaml is complete: `expand_preset=False` reads it as saved, its
    `preset` a name only (today's preset may differ from the one the run was made with)."""
    values = preset_values(config)
    preset = config if values is not None else ""
    if values is None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config {config!r} is neither a preset ({', '.join(preset_names())}) "
                                    "nor a YAML file")
        try:
            loaded = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {path} is unreadable ({e})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings")
        preset = loaded.pop("preset", "") or ""
        if not isinstance(preset, str):
            raise ValueError(f"config file {path}: preset must be a preset name, got {brief(preset)}")
        base = preset_values(preset) if preset and expand_preset else {}
        if base is None:
            raise ValueError(f"config file {path} names unknown preset {brief(preset)}")
        values = deep_update(base, loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            parsed = load_yaml(raw)
        except yaml.YAMLError:
            parsed = raw
        _set_dotted(values, key, parsed)
    values["preset"] = preset
    # Start from the defaults so a section that sets one key keeps the others.
    cfg = _build(DistillConfig, deep_update(DistillConfig().to_dict(), values), "")
    kind = get_kind(cfg.model.kind) if cfg.model.kind else None
    for role, adapter in (("student", cfg.student), ("fake", cfg.fake)):
        if adapter.targets is None and kind is not None:  # the backbone's preset for this role
            adapter.targets = kind.targets[0 if role == "student" else 1]
    return cfg.check()


def absolute_paths(cfg: DistillConfig) -> DistillConfig:
    """A copy of `cfg` whose local paths (model, text encoder, prompts, run root) are
    absolute, so that a run folder's config.yaml means the same from any directory (a run
    resumes from anywhere); hub ids, and names of nothing on disk, stay as written."""
    out = copy.deepcopy(cfg)

    def absolute(path: str) -> str:  # links kept: the path as the user named it
        return os.path.abspath(os.path.expanduser(path))

    def local(path: str | None) -> str | None:
        return absolute(path) if path and os.path.exists(os.path.expanduser(path)) else path

    out.model.path, out.model.text_encoder, out.data.prompts = (
        local(cfg.model.path), local(cfg.model.text_encoder), local(cfg.data.prompts))
    out.run.root = absolute(cfg.run.root)
    return out


# What a resumed run may change (recorded in its config.yaml); every other setting defines
# the run (model, adapters, batch, rates, schedule, seed, ...) and must stay as it was.
RESUMABLE = {"train.steps", "train.max_nonfinite", "run.log_every", "run.checkpoint_every",
             "run.keep_checkpoints", "run.sample_every", "run.sample_seeds", "data.sample_prompts",
             "run.export", "run.report_to", "run.wandb_project", "run.wandb_entity", "train.batch_size",
             "train.parallel", "train.fsdp_param_dtype", "train.cpu_offload"}  # a new batch size must keep the global batch


def run_config(run, overrides: list[str] = ()) -> DistillConfig:
    """The resolved config of a run folder (a RunFolder), with `overrides`: the one reader of
    config.yaml, which is read as saved (not re-expanded through today's presets)."""
    return resolve(str(run.config), overrides, expand_preset=False)


def resume_config(run, overrides: list[str]) -> DistillConfig:
    """The config of a run folder with `overrides`, refused where they change the run itself."""
    saved = absolute_paths(run_config(run))
    cfg = absolute_paths(run_config(run, overrides))
    old, new = flat_settings(saved.to_dict()), flat_settings(cfg.to_dict())
    changed = [k for k in new if new[k] != old.get(k) and k not in RESUMABLE]
    if changed:
        k = changed[0]
        raise ValueError(f"--resume {run.path}: {k} was {old.get(k)!r} in this run and cannot change "
                         f"(asked: {new[k]!r}); a resumed run may change only {', '.join(sorted(RESUMABLE))}. "
                         "Start a new run for other settings")
    return cfg


def flat_settings(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("targets",):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"setting {p} must be a section of keys, got {brief(nxt)}")
        d = nxt
    d[parts[-1]] = value


# --- checks --------------------------------------------------------------------------

def _require(ok: bool, setting: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"setting {setting} must be {what}, got {brief(value)}")


def recorded_spec(values, where: str) -> BackboneSpec:
    """A BackboneSpec from what a file records (an export's manifest): typed and checked
    as the model settings are; unknown keys (a newer version's) are left out."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(BackboneSpec)}
    spec = _build(BackboneSpec, {k: v for k, v in values.items() if k in names}, f"{where}.")
    _check_model(spec)
    return spec


def _check_model(m: BackboneSpec) -> None:
    _require(m.kind is None or m.kind in KINDS, "model.kind", f"one of {', '.join(KINDS)}", m.kind)
    _require(m.resolution is None or m.resolution > 0, "model.resolution", "a positive number of pixels",
             m.resolution)
    _require(m.max_length is None or m.max_length > 0, "model.max_length", "positive", m.max_length)
    _require(m.student_steps is None or m.student_steps >= 1, "model.student_steps", "at least 1", m.student_steps)
    ts = m.student_timesteps
    if ts is not None:
        _require(len(ts) >= 1 and all(b < a for a, b in zip(ts, ts[1:])) and min(ts) >= 0,
                 "model.student_timesteps", "timestep indices >= 0, strictly decreasing", ts)
        _require(len(ts) == (m.student_steps or 1), "model.student_timesteps",
                 f"one timestep per student step (model.student_steps={m.student_steps or 1})", ts)
    _require(m.guidance is None or (math.isfinite(m.guidance) and m.guidance > 0), "model.guidance",
             "a positive number", m.guidance)
    abar = m.one_step_abar
    _require(abar in (None, SCHEDULER) or (not isinstance(abar, str) and 0 < abar < 1), "model.one_step_abar",
             f"a number in (0, 1) or {SCHEDULER!r}", abar)


def _check_config(c: DistillConfig) -> None:
    m, d, t, r = c.model, c.data, c.train, c.run
    _check_model(m)
    for role, a in (("student", c.student), ("fake", c.fake)):
        if adapter_class(a.kind).ranked and a.targets is not None:
            resolve_rule(a.targets)  # an unknown preset or a bad rule raises here
    _require(d.format in PROMPT_FORMATS, "data.format", ", ".join(PROMPT_FORMATS), d.format)
    _require(bool(d.split), "data.split", "a split name", d.split)
    _require(t.steps >= 1, "train.steps", "at least 1", t.steps)
    _require(t.batch_size >= 1, "train.batch_size", "at least 1", t.batch_size)
    _require(t.grad_accum >= 1, "train.grad_accum", "at least 1", t.grad_accum)
    for name in ("lr_student", "lr_fake"):
        v = getattr(t, name)
        _require(math.isfinite(v) and v > 0, f"train.{name}", "a positive number", v)
    _require(all(0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)", list(t.betas))
    _require(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", "at least 0",
             t.weight_decay)
    _require(t.warmup_steps >= 0, "train.warmup_steps", "at least 0", t.warmup_steps)
    _require(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", " or ".join(LR_SCHEDULES), t.lr_schedule)
    _require(math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0, "train.max_grad_norm", "a positive number",
             t.max_grad_norm)
    _require(math.isfinite(t.guidance), "train.guidance", "a finite number", t.guidance)
    for name, v in t.guidance_options.items():
        _require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 f"train.guidance_options.{name}", "a finite number", v)
    _require(t.t_min >= 0, "train.t_min", "at least 0", t.t_min)
    _require(t.t_max >= t.t_min, "train.t_max", f"at least train.t_min ({t.t_min})", t.t_max)
    _require(0 <= t.fake_uncond_prob <= 1, "train.fake_uncond_prob", "a probability in [0, 1]", t.fake_uncond_prob)
    _require(t.fake_steps >= 1, "train.fake_steps", "at least 1", t.fake_steps)
    _require(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision", " or ".join(MIXED_PRECISION),
             t.mixed_precision)
    _require(t.parallel in PARALLEL, "train.parallel", " or ".join(PARALLEL), t.parallel)
    _require(t.fsdp_param_dtype in FSDP_PARAM_DTYPES, "train.fsdp_param_dtype", " or ".join(FSDP_PARAM_DTYPES),
             t.fsdp_param_dtype)
    if t.parallel == "fsdp2":
        for role, a in (("student", c.student), ("fake", c.fake)):
            _require(a.kind != "full", f"{role}.kind", "an adapter (full fine-tuning trains every weight, which "
                     "train.parallel=fsdp2 does not shard; use train.parallel=ddp)", a.kind)
    _require(not t.cpu_offload or t.parallel == "fsdp2", "train.cpu_offload", "false unless train.parallel=fsdp2",
             t.cpu_offload)
    _require(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", "in (0, 1) or null", t.ema_decay)
    _require(0 <= t.seed <= MAX_SEED, "train.seed", f"in 0..{MAX_SEED}", t.seed)
    _require(t.max_nonfinite >= 1, "train.max_nonfinite", "at least 1", t.max_nonfinite)
    _require(bool(r.root), "run.root", "a folder", r.root)
    _require("/" not in r.desc and "\\" not in r.desc, "run.desc", "a name without slashes", r.desc)
    _require(r.report_to in REPORT_TO, "run.report_to", " or ".join(REPORT_TO), r.report_to)
    _require(bool(r.wandb_project.strip()), "run.wandb_project", "a W&B project name", r.wandb_project)
    _require(r.log_every >= 1, "run.log_every", "at least 1", r.log_every)
    _require(r.checkpoint_every >= 0, "run.checkpoint_every", "at least 0 (0: only the final export)",
             r.checkpoint_every)
    _require(r.keep_checkpoints >= 1, "run.keep_checkpoints", "at least 1", r.keep_checkpoints)
    _require(r.sample_every >= 0, "run.sample_every", "at least 0 (0: no sample grids)", r.sample_every)
    if r.sample_every:
        _require(bool(d.sample_prompts) and all(p.strip() for p in d.sample_prompts), "data.sample_prompts",
                 "a list of non-empty prompts (or set run.sample_every=0)", d.sample_prompts)
        check_prompts(d.sample_prompts, "setting data.sample_prompts")
        _require(bool(r.sample_seeds) and all(0 <= s <= MAX_SEED for s in r.sample_seeds), "run.sample_seeds",
                 f"a list of seeds in 0..{MAX_SEED}", r.sample_seeds)
