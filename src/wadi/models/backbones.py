"""Backbones: what the losses and samplers need from a text-to-image diffusion model, written once.

A `BackboneSpec` says which model to load (kind, folder or hub id, text encoder,
resolution, tokenizer length, the one-step generator's constant, the student's steps); the
run config, exports and worlds all carry one. What differs between backbone families is
their `Kind` in the registry (wadi.models.registry); this module only reads it.

A `Backbone` holds the frozen pieces shared by teacher, student and fake model (text
encoder, tokenizer, VAE, noise schedule) and the teacher's denoiser `net`; student and
fake model are the same net with adapters, and `predict` runs any of the three. The noise
process (schedule, prediction, generator, stock schedulers) is `Backbone.process` (wadi.models.process).
"""

from __future__ import annotations

import copy
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from wadi.errors import CorruptFile, describe
from wadi.models.conditioning import Cond
from wadi.models.process import process_of, student_times
from wadi.models.registry import DENOISER_SUBFOLDERS, KINDS, IncompleteFolder, Kind, detect_kind, get_kind, kind_of  # noqa: F401

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype a precision name means; accelerate's mixed precision "no" is fp32."""
    return DTYPES["fp32" if name == "no" else name]


@dataclass
class BackboneSpec:
    """Which model to load. None fields are unknown yet (`filled` completes them) or take
    the model's own value when loaded."""

    kind: str | None = None  # a key of KINDS; None: detected from the folder
    path: str = ""  # local diffusers folder or hub id
    text_encoder: str | None = None  # another folder for text encoder + tokenizer
    resolution: int | None = None  # pixels; None: the net's sample size
    max_length: int | None = None  # tokenizer length; None: the kind's default
    one_step_abar: float | str | None = None  # VP only: the generator's abar_T; None: 0.0047; "scheduler": abar at T-1
    student_steps: int | None = None  # the student's sampling steps; None: 1
    student_timesteps: list[int] | None = None  # their time indices, first T-1; None: evenly spaced
    guidance: float | None = None  # embedded-guidance kinds: the input teacher, fake and student share; None: default
    revision: str | None = None  # hub: a branch, tag or commit of `path`; None: main
    variant: str | None = None  # the weight files' variant (e.g. "fp16": model.fp16.safetensors); None: the plain ones

    @property
    def hub_options(self) -> dict:
        """What every from_pretrained of `path` takes besides it."""
        return {k: v for k, v in (("revision", self.revision), ("variant", self.variant)) if v is not None}

    def filled(self, **known) -> "BackboneSpec":
        """A copy whose unset fields take the values `known` gives."""
        out = copy.copy(self)
        for k, v in known.items():
            if getattr(out, k) in (None, ""):
                setattr(out, k, v)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


    def load(self, dtype: torch.dtype = torch.float32, allow_bin: bool = False) -> "Backbone":
        if not self.path:
            raise ValueError("no base model: pass --base FOLDER_OR_HUB_ID (the teacher the student was distilled from)")
        return load_backbone(self.filled(kind=detect_kind(self.path)) if self.kind is None else self, dtype, allow_bin)


# --- the backbone ------------------------------------------------------------------------

def check_resolution(resolution: int, multiple: int, net: nn.Module) -> None:
    """A resolution the denoiser can take: a multiple of what its kind says (the VAE's factor
    times the net's patch size or packing), within its position table if it has one."""
    if resolution % multiple:
        raise ValueError(f"setting model.resolution (--resolution) must be a multiple of {multiple} (what the "
                         f"{type(net).__name__}'s VAE factor and patches take), got {resolution}")
    positions = getattr(net.config, "pos_embed_max_size", None)
    if positions and resolution // multiple > positions:
        raise ValueError(f"setting model.resolution (--resolution) must be at most {positions * multiple} (the "
                         f"{type(net).__name__}'s {positions} positions of {multiple} pixels), got {resolution}")


class StudentStepsError(ValueError):
    """A student's steps or timesteps that its model's schedule does not have."""


def check_student_steps(spec: BackboneSpec, num_train_timesteps: int) -> None:
    """What the model's schedule bounds (the settings check the rest: timesteps strictly
    decreasing, one per step): at most as many steps as it has training timesteps (more
    would never end, or fail at the first step), timesteps starting at its last."""
    steps, last = spec.student_steps or 1, num_train_timesteps - 1
    if steps > num_train_timesteps:
        raise StudentStepsError(f"setting model.student_steps must be at most {num_train_timesteps} (the model's "
                                f"training timesteps), got {steps}")
    ts = spec.student_timesteps
    if ts and ts[0] != last:
        raise StudentStepsError(f"setting model.student_timesteps must start at {last} (the student starts from pure "
                                f"noise, the schedule's last timestep), got {ts}")


class Backbone:
    def __init__(self, spec: BackboneSpec, net: nn.Module, text_encoder: nn.Module, tokenizer, scheduler_config: dict,
                 vae: nn.Module | None = None, more_text: dict | None = None):
        self.spec = spec
        self.kind = get_kind(spec.kind)
        self.net = net
        # Every text component under its pipeline name (text_encoder, tokenizer, text_encoder_2, ...).
        self.text = {"text_encoder": text_encoder, "tokenizer": tokenizer, **(more_text or {})}
        self.vae = vae
        self.max_length = spec.max_length or self.kind.max_length or tokenizer.model_max_length
        if spec.guidance is not None and self.guidance_mode != "embedded":
            raise ValueError(f"setting model.guidance={spec.guidance:g} is the guidance input of a guidance-distilled "
                             f"model; this {self.kind.name} model has none (leave it unset)")
        # The encoder whose token length max_length is (SD3's T5; T5's positions are relative: none).
        positions = getattr(self.text[self.kind.long_encoder].config, "max_position_embeddings", None)
        if positions and self.max_length > positions:
            raise ValueError(f"max_length {self.max_length} (model.max_length / --max-length) is beyond the text "
                             f"encoder's {positions} positions")
        self.channels = net.config.in_channels
        self.vae_scale = self.kind.vae_scale(vae) if vae is not None else 1
        if spec.resolution is not None:
            check_resolution(spec.resolution, self.kind.resolution_multiple(self), net)
        size = getattr(net.config, "sample_size", None)
        if spec.resolution is None and not isinstance(size, int):
            raise ValueError(f"the {self.kind.name} model does not say its resolution; give model.resolution "
                             "(--resolution)")
        self.latent_size = (spec.resolution // self.vae_scale) if spec.resolution else size
        tokens = self.kind.image_tokens(self) if self.kind.image_tokens else None
        steps_mu = (lambda steps: self.kind.steps_mu(self, steps)) if self.kind.steps_mu else None
        self.process = process_of(dict(scheduler_config), spec.one_step_abar, tokens, steps_mu)
        check_student_steps(spec, self.process.num_train_timesteps)
        self._empty: Cond | None = None
        self._times: list | None = None

    @property
    def guidance_mode(self) -> str:
        """This model's guidance mode (wadi.models.guidance): its kind's, or its own where the
        kind's checkpoints differ (FLUX.1-dev takes guidance as an input, schnell has none)."""
        return self.kind.guidance_of(self) if self.kind.guidance_of else self.kind.guidance

    @property
    def resolution(self) -> int:
        """Image size in pixels."""
        return self.latent_size * self.vae_scale

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape each image's noise is drawn in: the kind's stock pipeline's."""
        return tuple(self.kind.noise_shape(self))

    @property
    def student_steps(self) -> int:
        return self.spec.student_steps or 1

    def student_times(self, device=None) -> list[torch.Tensor]:
        """The process time of each student step: the given indices, else the times of the
        exported scheduler as the stock pipeline sets them for the student's steps."""
        if self.spec.student_timesteps:
            return [self.process.time(torch.tensor(i, device=device)) for i in self.spec.student_timesteps]
        if self._times is None:
            self._times = student_times(self.process, self.student_steps, self.kind.sigmas)
        return [torch.tensor(t, device=device) for t in self._times]

    def student_scheduler(self):
        """The stock scheduler an export ships: its `student_steps`-step sampling is the
        student's. Timesteps of one's own choosing have none."""
        scheduler = self.process.student_scheduler(self.student_steps, self.kind.sigmas is not None)
        if self.spec.student_timesteps and [t.item() for t in self.student_times()] != \
                student_times(self.process, self.student_steps, self.kind.sigmas):
            raise ValueError(f"the student's timesteps {self.spec.student_timesteps} are not a stock scheduler's "
                             f"{self.student_steps} evenly spaced steps; sample it with wadi sample, or distil "
                             "with the default model.student_timesteps")
        return scheduler

    def set_timesteps(self, scheduler, steps: int, device=None) -> None:
        """Set a stock scheduler's timesteps for `steps` steps as the kind's pipeline does."""
        self.process.set_timesteps(scheduler, steps, self.kind.sigmas, device)

    def pipeline_call(self) -> dict:
        """The stock pipeline's call arguments (besides prompt and generator) that sample the
        student as `wadi sample` does; the kind says them."""
        if self.kind.pipeline_call is None:
            raise ValueError(f"the {self.kind.name} kind has no stock diffusers pipeline")
        return self.kind.pipeline_call(self, self.student_steps)

    @property
    def text_encoder(self) -> nn.Module:
        return self.text["text_encoder"]

    @property
    def tokenizer(self):
        return self.text["tokenizer"]

    @property
    def num_train_timesteps(self) -> int:
        return self.process.num_train_timesteps

    # --- text -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], mask_encoder: bool = False) -> Cond:
        """The conditioning of `prompts` as the kind encodes it (`Kind.encode`)."""
        return self.kind.encode(self, prompts, mask_encoder)

    def empty_cond(self) -> Cond:
        """The empty prompt's conditioning (batch 1), computed once."""
        if self._empty is None:
            self._empty = self.kind.empty(self) if self.kind.empty else self.encode_prompts([""])
        return self._empty

    # --- the denoiser -------------------------------------------------------------
    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """What `net` (teacher, student or fake) predicts at (x_t, process time t), in the
        prediction the process works in (eps for VP, the velocity for flow)."""
        out = self.kind.call(self, net, x_t, t, cond).to(x_t.dtype)
        return self.process.to_work(out, x_t, t)

    def guided(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float,
               **options) -> torch.Tensor:
        """`predict` in float32, guided at scale `guidance` in the kind's mode
        (wadi.models.guidance), with the kind's further guidance `options`; at 1 the
        conditional prediction alone."""
        return self.kind.guide(self, net, x, t, cond, guidance, **options)

    # --- images ---------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W), from latents in the drawn layout."""
        return self.kind.decode(self, x0)

    def vae_dtype(self) -> torch.dtype:
        """The dtype the VAE decodes in: its own, or float32 for a kind whose VAE overflows in fp16."""
        dtype = next(self.vae.parameters()).dtype
        if self.kind.upcast_vae and dtype == torch.float16:
            self.vae.float()
            dtype = torch.float32
        return dtype

    def to(self, device, dtype=None) -> "Backbone":
        """Move the frozen parts (teacher net, text encoders, VAE)."""
        for m in (self.net, self.vae, *self.text.values()):
            if isinstance(m, nn.Module):
                m.to(device)
                if dtype is not None and next(m.parameters()).dtype != dtype:
                    m.to(dtype)
        self._empty = None
        return self


# --- loading ------------------------------------------------------------------------------

def check_model_path(path: str) -> None:
    """Fail fast on a local path that does not exist (hub ids 'org/name' pass through)."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1 or not re.fullmatch(r"[\w.-]+/[\w.-]+", path)
    if looks_local:
        raise FileNotFoundError(f"model path {path!r} does not exist; give a diffusers folder or a hub id 'org/name'")


def _load(library: str, class_name: str, path: str, what: str, dtype: torch.dtype | None = None, **kwargs):
    """`library.class_name` (diffusers or transformers) from a folder or hub id. A model
    (given a dtype) whose weights lack a tensor is refused: the libraries would fill it
    with random values (transformers) or leave it on the meta device (diffusers)."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    model = dtype is not None
    if model:  # diffusers and transformers name the argument differently
        kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
        kwargs["output_loading_info"] = True
    if kwargs.get("subfolder", "") is None:  # transformers 5 fails on subfolder=None
        del kwargs["subfolder"]
    try:
        loaded = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the {what} from {path!r}: {describe(e)}") from None
    except (KeyError, EOFError, pickle.UnpicklingError) as e:
        if kwargs.get("use_safetensors"):  # not what a damaged .bin raises in transformers' torch.load
            raise
        raise CorruptFile(f"could not load the {what} from {path!r}: its weights file is unreadable "
                          f"({type(e).__name__} {describe(e)[:100]})") from None
    if not model:
        return loaded
    loaded, info = loaded
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        where = Path(path, kwargs.get("subfolder") or "")
        raise ValueError(f"the {what} in {where} lacks {len(missing)} of its tensors ({missing[0]}"
                         f"{', ...' if len(missing) > 1 else ''}): its weights file is incomplete or of "
                         "another model")
    return loaded


def load_denoiser(like: nn.Module, path: str | Path, dtype: torch.dtype) -> nn.Module:
    """A denoiser of `like`'s diffusers class from a model folder (a merged student)."""
    return _load("diffusers", type(like).__name__, str(path), "denoiser", dtype=dtype, use_safetensors=True)


def scheduler_config(path: str, revision: str | None = None) -> dict:
    """The scheduler config of a pipeline folder or hub id (whatever its class: it says
    which noise process the model was trained with)."""
    from diffusers import DDPMScheduler

    try:  # any scheduler class reads any scheduler's scheduler_config.json
        config = DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the scheduler from {path!r}: {describe(e)}") from None
    except (AttributeError, TypeError):  # a JSON value that is not an object
        raise ValueError(f"{path}: scheduler/scheduler_config.json is not a JSON object") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: scheduler/scheduler_config.json is not a JSON object")
    return dict(config)


def load_backbone(spec: BackboneSpec, dtype: torch.dtype = torch.float32, allow_bin: bool = False) -> Backbone:
    """Load a backbone the way diffusers does: the kind's denoiser subfolder, text_encoder,
    tokenizer, vae and scheduler of a local folder or a hub repository (`spec.text_encoder`
    names another folder for the text encoder and tokenizer).

    Weights come from safetensors; `allow_bin` also lets diffusers and transformers read
    .bin weights, which both do with torch.load(weights_only=True): tensors only, no code.
    """
    kind = get_kind(spec.kind)
    weights = {"use_safetensors": None if allow_bin else True}
    check_model_path(spec.path)
    if Path(spec.path).expanduser().is_dir():
        try:
            found = detect_kind(spec.path)
        except IncompleteFolder:
            raise
        except ValueError:
            found = spec.kind  # an incomplete folder: the loaders below say what is missing
        if found != spec.kind:
            raise ValueError(f"{spec.path} is a {found} pipeline folder, not {spec.kind}; "
                             f"give model.kind={found} (--kind {found}) or the right folder")
    if spec.text_encoder:
        check_model_path(spec.text_encoder)
    te_path, te_sub, tok_sub = ((spec.text_encoder, None, None) if spec.text_encoder
                                else (spec.path, "text_encoder", "tokenizer"))
    scheduler = scheduler_config(spec.path, spec.revision)
    # The revision and variant are the model's (a text encoder from another folder takes
    # neither); tokenizers have no weight variants.
    weights.update(spec.hub_options)
    revision = {"revision": spec.revision} if spec.revision else {}
    te_weights, te_revision = ({"use_safetensors": weights["use_safetensors"]}, {}) if spec.text_encoder else (
        weights, revision)
    net = _load("diffusers", kind.denoiser, spec.path, kind.subfolder, dtype=dtype, subfolder=kind.subfolder, **weights)
    encoder = _load("transformers", kind.encoder, te_path, "text encoder", dtype=dtype, subfolder=te_sub, **te_weights)
    tokenizer = _load("transformers", kind.tokenizer, te_path, "tokenizer", subfolder=tok_sub, **te_revision)
    vae = _load("diffusers", kind.vae, spec.path, "VAE", dtype=dtype, subfolder="vae", **weights) if kind.vae else None
    more = {name: _load("transformers", cls, spec.path, name.replace("_", " "), subfolder=name,
                        **(revision if name.startswith("tokenizer") else dict(dtype=dtype, **weights)))
            for name, cls in kind.text}
    for m in (net, encoder, vae, *more.values()):
        if isinstance(m, nn.Module):
            m.requires_grad_(False).eval()
    return Backbone(spec, net, encoder, tokenizer, scheduler, vae=vae, more_text=more)


def load_base_denoiser(spec: BackboneSpec, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model's denoiser alone, frozen, as load_backbone loads it (safetensors only)."""
    kind = get_kind(spec.kind)
    net = _load("diffusers", kind.denoiser, spec.path, kind.subfolder, dtype=dtype, subfolder=kind.subfolder,
                use_safetensors=True)
    return net.requires_grad_(False).eval()
