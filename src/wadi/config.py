"""Distillation settings: dataclasses, named presets, YAML files and dotted overrides.

`resolve("sd15-wadi", ["model.path=/data/sd15", "train.steps=1000"])` expands a preset
(or a YAML file, which may name a preset under `preset:`), applies the overrides, and
checks every key. The resolved config is written into each run folder.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .adapters import AdapterConfig
from .digits import paths as _digits


@dataclass
class ModelConfig:
    kind: str = "sd"  # sd | pixart | pixel (see wadi.backbones)
    path: str = ""  # local diffusers folder or hub id
    text_encoder: str | None = None  # another folder for text encoder + tokenizer
    resolution: int | None = None  # pixels; None: the net's sample size
    max_length: int | None = None  # tokenizer length; None: the backbone's default


@dataclass
class DataConfig:
    prompts: str = ""  # prompt file: .txt, .jsonl (JourneyDB too) or COCO captions .json
    format: str = "auto"
    dedupe: bool = True  # sorted unique prompts, as the authors read JourneyDB
    cache_embeddings: bool = False  # encode every prompt once up front (small prompt sets)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road",
        "a bowl of fruit on a wooden table", "an astronaut riding a horse"])


@dataclass
class TrainConfig:
    steps: int = 21875  # 2 epochs over 1.4M prompts at a global batch of 128
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr_student: float = 1e-4
    lr_fake: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # constant schedule after warm-up
    max_grad_norm: float = 1.0
    guidance: float = 1.5  # on both teacher and fake model
    t_min: int = 20
    t_max: int = 980
    fake_uncond_prob: float = 0.1
    mixed_precision: str = "no"  # no | fp16 | bf16; adapter parameters stay fp32
    gradient_checkpointing: bool = False
    adam_8bit: bool = False  # bitsandbytes AdamW8bit when installed
    ema_decay: float | None = None  # EMA of the student's trainable parameters
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


@dataclass
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    student: AdapterConfig = field(default_factory=lambda: AdapterConfig("lorad", 256, "unet-student"))
    fake: AdapterConfig = field(default_factory=lambda: AdapterConfig("lorad", 32, "unet-fake"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_SD = {"train": {"mixed_precision": "fp16", "gradient_checkpointing": True, "adam_8bit": True}}
PRESETS: dict[str, dict] = {
    "sd15-wadi": _deep_update(_SD, {"model": {"kind": "sd", "resolution": 512,
                                              "path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}}),
    "sd21-wadi": _deep_update(_SD, {"model": {"kind": "sd", "resolution": 512,
                                              "path": "stabilityai/stable-diffusion-2-1-base"}}),
    "pixart-wadi": {"model": {"kind": "pixart", "path": "PixArt-alpha/PixArt-XL-2-256x256", "resolution": 256},
                    "student": {"rank": 128, "targets": "dit-student"},
                    "fake": {"targets": "dit-fake"},
                    "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True}},
}
# The paper's rank ablation (student r) and adapter ablation (same targets, matched budget).
for _r in (64, 128, 512):
    PRESETS[f"sd15-wadi-r{_r}"] = _deep_update(PRESETS["sd15-wadi"], {"student": {"rank": _r}})
for _kind in ("lorad", "lora", "dora", "dora-frozen", "full"):
    PRESETS[f"sd15-ablation-{_kind}"] = _deep_update(PRESETS["sd15-wadi"],
                                                     {"student": {"kind": _kind}, "train": {"steps": 10000}})
# The embedded digits world (wadi.digits, `wadi demo`): the shipped teacher and prompt file,
# the MiniLM text encoder from its PyPI package; sized to finish on two CPU cores in minutes.
PRESETS["digits-wadi"] = {
    "model": {"kind": "pixel", "path": str(_digits.TEACHER), "text_encoder": _digits.minilm_dir_or_hint(),
              "max_length": _digits.MAX_LENGTH},
    "student": {"rank": 16}, "fake": {"rank": 8},
    "data": {"prompts": str(_digits.PROMPTS), "cache_embeddings": True,
             "sample_prompts": [f"a handwritten {w}" for w in ("zero", "one", "two", "three", "four", "five",
                                                                "six", "seven", "eight", "nine")]},
    # Measured in this world (docs/digits.md): the student's angles need a larger
    # step than SD's 1e-4 to move in 300 steps, and the teacher's own guidance 4 (SD uses
    # 1.5) gives the student the sharp digits the teacher draws; longer runs drift.
    "train": {"steps": 300, "batch_size": 32, "lr_student": 3e-3, "lr_fake": 1e-2, "guidance": 4.0},
    "run": {"log_every": 5, "checkpoint_every": 100, "sample_every": 100, "sample_seeds": [0, 1, 2, 3]},
}


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _number(value, annotation: str, where: str):
    """Numbers by the field's type: YAML 1.1 reads `1e-3` as a string, and 2 for a float field is 2.0."""
    kind = annotation.split(" |")[0]
    if kind not in ("int", "float") or value is None:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value) if kind == "float" else value
    try:
        return float(value) if kind == "float" else int(str(value))
    except ValueError:
        raise ValueError(f"setting {where} must be {'a number' if kind == 'float' else 'an integer'}, "
                         f"got {value!r}") from None


def _build(cls, values: dict, where: str):
    """A dataclass from a complete dict, with a clear error for unknown keys and non-numbers."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    names = list(types)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown setting {where}{unknown[0]}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in values.items():
        if name in _NESTED and isinstance(value, dict):
            value = _build(_NESTED[name], value, f"{where}{name}.")
        elif name in _NESTED:
            raise ValueError(f"setting {where}{name} must be a section of keys, got {value!r}")
        else:
            value = _number(value, types[name], where + name)
        kwargs[name] = tuple(value) if name == "betas" else value
    return cls(**kwargs)


_NESTED = {"model": ModelConfig, "student": AdapterConfig, "fake": AdapterConfig, "data": DataConfig,
           "train": TrainConfig, "run": RunConfig}


def resolve(config: str, overrides: list[str] = ()) -> DistillConfig:
    """Expand a preset name or YAML file and apply `key=value` overrides."""
    if config in PRESETS:
        values, preset = copy.deepcopy(PRESETS[config]), config
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config {config!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings")
        preset = loaded.pop("preset", "")
        if preset and preset not in PRESETS:
            raise ValueError(f"config file {path} names unknown preset {preset!r}")
        values = _deep_update(PRESETS.get(preset, {}), loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        _set_dotted(values, key, yaml.safe_load(raw))
    values["preset"] = preset
    # Start from the defaults so a section that sets one key keeps the others.
    return _build(DistillConfig, _deep_update(DistillConfig().to_dict(), values), "")
