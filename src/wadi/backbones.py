"""Backbones: what the losses and samplers need from a text-to-image diffusion model, written once.

A `BackboneSpec` says which model to load (kind, folder or hub id, text encoder,
resolution, tokenizer length, the one-step generator's constant); the run config, exports
and worlds all carry one. `KINDS` is the registry: one `Kind` per backbone family holds
everything kind-specific (denoiser class and subfolder, text encoder and tokenizer,
masking, VAE or not, stock pipeline, adapter target presets, how the denoiser is called).
Adding a backbone is one entry here plus tests.

A `Backbone` holds the frozen pieces shared by teacher, student and fake model (text
encoder, tokenizer, VAE, noise schedule) and the teacher's denoiser `net`; student and
fake model are the same net with adapters, and `predict` runs any of the three. The noise
process (schedule, prediction, generator, stock schedulers) is `Backbone.process` (wadi.process).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from .conditioning import (Cond, call_mmdit, call_pixart, call_sana, call_sdxl, call_unet, empty_sana,
                           empty_sdxl, encode_sana, encode_sd3, encode_sdxl, encode_states,
                           encode_states_pooled)
from .errors import describe
from .process import process_of, student_times


# --- the registry ----------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """Everything that differs between backbone families."""

    name: str
    denoiser: str  # diffusers class
    subfolder: str  # the denoiser's folder in a pipeline
    encoder: str  # transformers class of the text encoder
    tokenizer: str  # transformers class of the tokenizer
    masked: bool  # the denoiser attends with the tokenizer's mask (T5 / BERT); CLIP kinds attend to all tokens
    vae: str | None  # the diffusers class of the VAE of a latent kind; None: pixels
    pipeline: str | None  # stock diffusers pipeline; None: loaded by wadi only
    targets: tuple[str, str]  # adapter target presets of (student, fake)
    max_length: int | None  # tokenizer length; None: the tokenizer's own
    call: Callable = call_unet  # (backbone, net, x_t, t, cond) -> what the net predicts, kind-shaped
    encode: Callable = encode_states  # (backbone, prompts, mask_encoder) -> Cond
    empty: Callable | None = None  # (backbone) -> the empty prompt's Cond, where not encode([""])
    text: tuple[tuple[str, str], ...] = ()  # more text components (pipeline name, transformers class)
    upcast_vae: bool = False  # decode in float32 under half precision (SDXL's VAE overflows in fp16)
    long_encoder: str = "text_encoder"  # the text component whose token length is max_length
    pipeline_kwargs: str = ""  # what a one-step call of the stock pipeline needs besides the prompt
    pipeline_extras: dict = field(default_factory=dict)  # components the stock pipeline wants besides ours


KINDS: dict[str, Kind] = {
    # Stable Diffusion 1.5 / 2.1: CLIP text states, the UNet attends to all 77 of them.
    "sd": Kind("sd", "UNet2DConditionModel", "unet", "CLIPTextModel", "CLIPTokenizer", masked=False, vae="AutoencoderKL",
               pipeline="StableDiffusionPipeline", targets=("unet-student", "unet-fake"), max_length=None,
               pipeline_extras=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
    # PixArt-alpha: T5 with its attention mask, length 120; eps and variance out.
    "pixart": Kind("pixart", "PixArtTransformer2DModel", "transformer", "T5EncoderModel", "AutoTokenizer",
                   masked=True, vae="AutoencoderKL", pipeline="PixArtAlphaPipeline", targets=("dit-student", "dit-fake"),
                   max_length=120, call=call_pixart, pipeline_kwargs="clean_caption=False"),
    # A pixel-space UNet with any transformers encoder and no VAE (the embedded worlds).
    "pixel": Kind("pixel", "UNet2DConditionModel", "unet", "AutoModel", "AutoTokenizer", masked=True, vae=None,
                  pipeline=None, targets=("unet-student", "unet-fake"), max_length=None),
    # A pixel-space SD3-class MMDiT with a sentence encoder (token states + their mean as the
    # pooled embedding) and no VAE: the flow-matching world.
    "pixel-mmdit": Kind("pixel-mmdit", "SD3Transformer2DModel", "transformer", "AutoModel", "AutoTokenizer",
                        masked=False, vae=None, pipeline=None, targets=("mmdit-student", "mmdit-fake"),
                        max_length=None, call=call_mmdit, encode=encode_states_pooled),
    # SDXL: a UNet on two CLIPs' penultimate states, the second's pooled output and size
    # micro-conditions; zeros for the empty prompt; its VAE decodes in float32.
    "sdxl": Kind("sdxl", "UNet2DConditionModel", "unet", "CLIPTextModel", "CLIPTokenizer", masked=False,
                 vae="AutoencoderKL", pipeline="StableDiffusionXLPipeline", targets=("unet-student", "unet-fake"),
                 max_length=None, call=call_sdxl, encode=encode_sdxl, empty=empty_sdxl, upcast_vae=True,
                 text=(("text_encoder_2", "CLIPTextModelWithProjection"), ("tokenizer_2", "CLIPTokenizer"))),
    # SD3 / SD3.5: an MMDiT on two CLIPs' penultimate states and T5's (length 256), the CLIPs'
    # pooled outputs, a 16-channel VAE with a shift; rectified flow.
    "sd3": Kind("sd3", "SD3Transformer2DModel", "transformer", "CLIPTextModelWithProjection", "CLIPTokenizer",
                masked=False, vae="AutoencoderKL", pipeline="StableDiffusion3Pipeline",
                targets=("mmdit-student", "mmdit-fake"), max_length=256, call=call_mmdit, encode=encode_sd3,
                long_encoder="text_encoder_3",
                text=(("text_encoder_2", "CLIPTextModelWithProjection"), ("tokenizer_2", "CLIPTokenizer"),
                      ("text_encoder_3", "T5EncoderModel"), ("tokenizer_3", "AutoTokenizer"))),
    # Sana: a linear-attention DiT on Gemma-2's states under their mask (length 300, after
    # the pipeline's instruction), the deep-compression autoencoder; rectified flow.
    "sana": Kind("sana", "SanaTransformer2DModel", "transformer", "AutoModel", "AutoTokenizer", masked=True,
                 vae="AutoencoderDC", pipeline="SanaPipeline", targets=("sana-student", "sana-fake"), max_length=300,
                 call=call_sana, encode=encode_sana, empty=empty_sana),
}


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype a precision name means; accelerate's mixed precision "no" is fp32."""
    return DTYPES["fp32" if name == "no" else name]


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown backbone kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_of(model: nn.Module) -> Kind:
    """The first kind whose denoiser class `model` is (UNets are "sd")."""
    for kind in KINDS.values():
        if kind.denoiser == type(model).__name__:
            return kind
    raise ValueError(f"no backbone kind has a {type(model).__name__} denoiser; give the adapter explicit targets")


# Hub ids are recognised by name (a folder by its contents): the first word that matches.
HUB_NAMES = (("pixart", "pixart"), ("sana", "sana"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3"),
             ("stable-diffusion-xl", "sdxl"), ("sdxl", "sdxl"))


def _denoiser_class(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def detect_kind(path: str) -> str:
    """The kind of a diffusers pipeline folder, by its contents: the denoiser's subfolder
    and class, a VAE or not, the kind's further text components. Hub ids by name."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return next((kind for word, kind in HUB_NAMES if word in path.lower()), "sd")
    found = [k.name for k in KINDS.values()
             if (p / k.subfolder).is_dir() and (p / "vae").is_dir() == bool(k.vae)
             and _denoiser_class(p / k.subfolder) in (k.denoiser, None)
             and all((p / name).is_dir() for name, _ in k.text)]
    if not found:
        raise ValueError(f"{path}: not a diffusers pipeline folder of a known kind "
                         f"({', '.join(KINDS)}): no matching {' or '.join(sorted({k.subfolder for k in KINDS.values()}))}/")
    # A kind that asks for more components is the better match (sd3 over a plain MMDiT).
    return max(found, key=lambda name: len(KINDS[name].text))


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

    def filled(self, **known) -> "BackboneSpec":
        """A copy whose unset fields take the values `known` gives."""
        out = copy.copy(self)
        for k, v in known.items():
            if getattr(out, k) in (None, ""):
                setattr(out, k, v)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def load(self, dtype: torch.dtype = torch.float32, allow_bin: bool = False) -> "Backbone":
        if not self.path:
            raise ValueError("no base model: pass --base FOLDER_OR_HUB_ID (the teacher the student was distilled from)")
        return load_backbone(self.filled(kind=detect_kind(self.path)) if self.kind is None else self, dtype, allow_bin)


# --- the backbone ------------------------------------------------------------------------

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
        self.process = process_of(dict(scheduler_config), spec.one_step_abar)
        # The encoder whose token length max_length is (SD3's T5; T5's positions are relative: none).
        positions = getattr(self.text[self.kind.long_encoder].config, "max_position_embeddings", None)
        if positions and self.max_length > positions:
            raise ValueError(f"max_length {self.max_length} (model.max_length / --max-length) is beyond the text "
                             f"encoder's {positions} positions")
        self.channels = net.config.in_channels
        # AutoencoderKL names its widths block_out_channels, AutoencoderDC encoder_block_out_channels.
        widths = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels if vae else ()
        self.vae_scale = 2 ** (len(widths) - 1) if vae is not None else 1
        self.latent_size = (spec.resolution // self.vae_scale) if spec.resolution else net.config.sample_size
        self._empty: Cond | None = None
        self._times: list | None = None

    @property
    def resolution(self) -> int:
        """Image size in pixels."""
        return self.latent_size * self.vae_scale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.latent_size, self.latent_size)

    @property
    def student_steps(self) -> int:
        return self.spec.student_steps or 1

    def student_times(self, device=None) -> list[torch.Tensor]:
        """The process time of each student step: the given indices, else the stock
        scheduler's N evenly spaced steps (the export's)."""
        if self.spec.student_timesteps:
            return [self.process.time(torch.tensor(i, device=device)) for i in self.spec.student_timesteps]
        if self._times is None:
            self._times = student_times(self.process, self.student_steps)
        return [torch.tensor(t, device=device) for t in self._times]

    def student_scheduler(self):
        """The stock scheduler an export ships: its `student_steps`-step sampling is the
        student's. Timesteps of one's own choosing have none."""
        scheduler = self.process.student_scheduler(self.student_steps)
        if self.spec.student_timesteps and [t.item() for t in self.student_times()] != \
                student_times(self.process, self.student_steps):
            raise ValueError(f"the student's timesteps {self.spec.student_timesteps} are not a stock scheduler's "
                             f"{self.student_steps} evenly spaced steps; sample it with wadi sample, or distil "
                             "with the default model.student_timesteps")
        return scheduler

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

    def guided(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        """`predict` in float32 with classifier-free guidance, from one batched [uncond; cond]
        pass; at guidance 1 the conditional pass alone. (Guidance is affine, so guiding eps
        or v is the same.)"""
        from .losses import guide

        if guidance == 1:
            return self.predict(net, x, t, cond).float()
        uncond = self.empty_cond().to(x.device, x.dtype).expand(len(x))
        e_u, e_c = self.predict(net, torch.cat([x, x]), t.repeat(2), uncond.cat(cond)).float().chunk(2)
        return guide(e_u, e_c, guidance)

    # --- images ---------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W)."""
        if self.vae is None:
            return x0.clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        if self.kind.upcast_vae and vae_dtype == torch.float16:
            self.vae.float()
            vae_dtype = torch.float32
        latents = x0.to(vae_dtype) / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)  # SD3's VAE is shifted as well as scaled
        if shift is not None:
            latents = latents + shift
        return self.vae.decode(latents).sample.float().clamp(-1, 1)

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
    """`library.class_name` (diffusers or transformers) from a folder or hub id."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    if dtype is not None:  # diffusers and transformers name the argument differently
        kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
    if kwargs.get("subfolder", "") is None:  # transformers 5 fails on subfolder=None
        del kwargs["subfolder"]
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the {what} from {path!r}: {describe(e)}") from None


def scheduler_config(path: str) -> dict:
    """The scheduler config of a pipeline folder or hub id (whatever its class: it says
    which noise process the model was trained with)."""
    from diffusers import DDPMScheduler

    try:  # any scheduler class reads any scheduler's scheduler_config.json
        return dict(DDPMScheduler.load_config(path, subfolder="scheduler"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the scheduler from {path!r}: {describe(e)}") from None


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
        except ValueError:
            found = spec.kind  # an incomplete folder: the loaders below say what is missing
        if found != spec.kind:
            raise ValueError(f"{spec.path} is a {found} pipeline folder, not {spec.kind}; "
                             f"give model.kind={found} (--kind {found}) or the right folder")
    if spec.text_encoder:
        check_model_path(spec.text_encoder)
    te_path, te_sub, tok_sub = ((spec.text_encoder, None, None) if spec.text_encoder
                                else (spec.path, "text_encoder", "tokenizer"))
    scheduler = scheduler_config(spec.path)
    net = _load("diffusers", kind.denoiser, spec.path, kind.subfolder, dtype=dtype, subfolder=kind.subfolder, **weights)
    encoder = _load("transformers", kind.encoder, te_path, "text encoder", dtype=dtype, subfolder=te_sub, **weights)
    tokenizer = _load("transformers", kind.tokenizer, te_path, "tokenizer", subfolder=tok_sub)
    vae = _load("diffusers", kind.vae, spec.path, "VAE", dtype=dtype, subfolder="vae", **weights) if kind.vae else None
    more = {name: _load("transformers", cls, spec.path, name.replace("_", " "), subfolder=name,
                        **({} if name.startswith("tokenizer") else dict(dtype=dtype, **weights)))
            for name, cls in kind.text}
    for m in (net, encoder, vae, *more.values()):
        if isinstance(m, nn.Module):
            m.requires_grad_(False).eval()
    return Backbone(spec, net, encoder, tokenizer, scheduler, vae=vae, more_text=more)


def load_denoiser(spec: BackboneSpec, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The denoiser alone, frozen, as load_backbone loads it (safetensors only)."""
    kind = get_kind(spec.kind)
    net = _load("diffusers", kind.denoiser, spec.path, kind.subfolder, dtype=dtype, subfolder=kind.subfolder,
                use_safetensors=True)
    return net.requires_grad_(False).eval()
