"""Backbones: what the losses and samplers need from a text-to-image diffusion model, written once.

A `BackboneSpec` says which model to load (kind, folder or hub id, text encoder,
resolution, tokenizer length, the one-step generator's constant); the run config, exports
and worlds all carry one. `KINDS` is the registry: one `Kind` per backbone family holds
everything kind-specific (denoiser class and subfolder, text encoder and tokenizer,
masking, VAE or not, stock pipeline, adapter target presets, how the denoiser is called).
Adding a backbone is one entry here plus tests.

A `Backbone` holds the frozen pieces shared by teacher, student and fake model (text
encoder, tokenizer, VAE, noise schedule) and the teacher's denoiser `net`; student and
fake model are the same net with adapters, and `predict_eps` runs any of the three.
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

from .errors import describe


@dataclass
class Cond:
    """Text conditioning for a batch: token states and, for T5/BERT encoders, their mask."""

    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor | None = None  # (B, L), 1 for real tokens

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def cat(self, other: "Cond") -> "Cond":
        mask = None if self.mask is None else torch.cat([self.mask, other.mask])
        return Cond(torch.cat([self.embeds, other.embeds]), mask)

    def where(self, keep: torch.Tensor, other: "Cond") -> "Cond":
        """Rows of self where keep is True, else rows of other (other may have batch 1)."""
        k = keep.view(-1, 1, 1)
        embeds = torch.where(k, self.embeds, other.embeds.expand_as(self.embeds))
        mask = None if self.mask is None else torch.where(keep.view(-1, 1), self.mask, other.mask.expand_as(self.mask))
        return Cond(embeds, mask)

    def expand(self, n: int) -> "Cond":
        return Cond(self.embeds.expand(n, -1, -1), None if self.mask is None else self.mask.expand(n, -1))

    def to(self, device, dtype=None) -> "Cond":
        return Cond(self.embeds.to(device, dtype), None if self.mask is None else self.mask.to(device))


# --- the registry ----------------------------------------------------------------------

def _call_unet(backbone: "Backbone", net: nn.Module, x_t, t, cond: Cond) -> torch.Tensor:
    return net(x_t, t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask).sample


def _call_pixart(backbone: "Backbone", net: nn.Module, x_t, t, cond: Cond) -> torch.Tensor:
    """PixArt-alpha: 1024 px models take the image size and aspect ratio as micro-conditions
    (as PixArtAlphaPipeline passes them); the output's extra channels are the learned variance."""
    added = {"resolution": None, "aspect_ratio": None}
    if getattr(net, "use_additional_conditions", False):
        size = backbone.resolution
        added = {"resolution": x_t.new_tensor([[size, size]]).expand(len(x_t), 2),
                 "aspect_ratio": x_t.new_tensor([[1.0]]).expand(len(x_t), 1)}
    out = net(x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
              added_cond_kwargs=added).sample
    return out[:, : backbone.channels]


@dataclass(frozen=True)
class Kind:
    """Everything that differs between backbone families."""

    name: str
    denoiser: str  # diffusers class
    subfolder: str  # the denoiser's folder in a pipeline
    encoder: str  # transformers class of the text encoder
    tokenizer: str  # transformers class of the tokenizer
    masked: bool  # the denoiser attends with the tokenizer's mask (T5 / BERT); CLIP kinds attend to all tokens
    vae: bool  # latent space (decoded by the pipeline's VAE) or pixels
    pipeline: str | None  # stock diffusers pipeline; None: loaded by wadi only
    targets: tuple[str, str]  # adapter target presets of (student, fake)
    max_length: int | None  # tokenizer length; None: the tokenizer's own
    call: Callable = _call_unet  # (backbone, net, x_t, t, cond) -> eps (or v), kind-shaped
    pipeline_kwargs: str = ""  # what a one-step call of the stock pipeline needs besides the prompt
    pipeline_extras: dict = field(default_factory=dict)  # components the stock pipeline wants besides ours


KINDS: dict[str, Kind] = {
    # Stable Diffusion 1.5 / 2.1: CLIP text states, the UNet attends to all 77 of them.
    "sd": Kind("sd", "UNet2DConditionModel", "unet", "CLIPTextModel", "CLIPTokenizer", masked=False, vae=True,
               pipeline="StableDiffusionPipeline", targets=("unet-student", "unet-fake"), max_length=None,
               pipeline_extras=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
    # PixArt-alpha: T5 with its attention mask, length 120; eps and variance out.
    "pixart": Kind("pixart", "PixArtTransformer2DModel", "transformer", "T5EncoderModel", "AutoTokenizer",
                   masked=True, vae=True, pipeline="PixArtAlphaPipeline", targets=("dit-student", "dit-fake"),
                   max_length=120, call=_call_pixart, pipeline_kwargs="clean_caption=False"),
    # A pixel-space UNet with any transformers encoder and no VAE (the embedded worlds).
    "pixel": Kind("pixel", "UNet2DConditionModel", "unet", "AutoModel", "AutoTokenizer", masked=True, vae=False,
                  pipeline=None, targets=("unet-student", "unet-fake"), max_length=None),
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


def detect_kind(path: str) -> str:
    """The kind of a diffusers pipeline folder, by its subfolders (a VAE or not); hub ids
    by name (PixArt when the name says so, else Stable Diffusion)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return "pixart" if "pixart" in path.lower() else "sd"
    found = [k.name for k in KINDS.values() if (p / k.subfolder).is_dir() and (p / "vae").is_dir() == k.vae]
    if not found:
        raise ValueError(f"{path}: not a diffusers pipeline folder (no {' or '.join(sorted({k.subfolder for k in KINDS.values()}))}/)")
    return found[0]


# abar_T of the one-step generator in the authors' training and inference scripts, for every
# backbone (docs/method.md). Stable Diffusion's own abar_999 is 0.00466; PixArt-alpha's
# linear schedule ends at 4.0e-5, a different generator that their students are not.
AUTHORS_ONE_STEP_ABAR = 0.0047
SCHEDULER = "scheduler"  # one_step_abar: the scheduler's own abar at T-1


@dataclass
class BackboneSpec:
    """Which model to load. None fields are unknown yet (`filled` completes them) or take
    the model's own value when loaded."""

    kind: str | None = None  # a key of KINDS; None: detected from the folder
    path: str = ""  # local diffusers folder or hub id
    text_encoder: str | None = None  # another folder for text encoder + tokenizer
    resolution: int | None = None  # pixels; None: the net's sample size
    max_length: int | None = None  # tokenizer length; None: the kind's default
    one_step_abar: float | str | None = None  # the generator's abar_T; None: 0.0047; "scheduler": abar at T-1

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
    def __init__(self, spec: BackboneSpec, net: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 vae: nn.Module | None = None):
        self.spec = spec
        self.kind = get_kind(spec.kind)
        self.net = net
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.max_length = spec.max_length or self.kind.max_length or tokenizer.model_max_length
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported; "
                             "use an epsilon or v_prediction checkpoint")
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.scheduler_config = dict(scheduler.config)
        self.channels = net.config.in_channels
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.latent_size = (spec.resolution // self.vae_scale) if spec.resolution else net.config.sample_size
        self._empty: Cond | None = None

    @property
    def resolution(self) -> int:
        """Image size in pixels."""
        return self.latent_size * self.vae_scale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.latent_size, self.latent_size)

    # --- the noise schedule --------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), shaped (B, 1, 1, 1)."""
        abar = self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    @property
    def one_step_abar(self) -> float:
        """abar_T of the one-step generator x0 = (z - sqrt(1 - abar_T) eps) / sqrt(abar_T)."""
        value = self.spec.one_step_abar
        if value == SCHEDULER:
            return float(self.alphas_cumprod[self.num_train_timesteps - 1])
        return AUTHORS_ONE_STEP_ABAR if value is None else float(value)

    def one_step_alpha_sigma(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        abar = torch.tensor(self.one_step_abar, dtype=torch.float32, device=device)
        return abar.sqrt(), (1 - abar).sqrt()

    # --- text -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], mask_encoder: bool = False) -> Cond:
        """Token states of `prompts` padded to max_length. Kinds whose denoiser attends with
        the mask (T5, BERT) always pass it to both; CLIP kinds pass none, as the stock
        pipelines do, unless `mask_encoder` (the authors' training loader): then the
        encoder masks padding, which changes the states at padded positions."""
        device = next(self.text_encoder.parameters()).device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        if self.kind.masked:
            return Cond(self.text_encoder(ids, attention_mask=mask)[0], mask)
        return Cond(self.text_encoder(ids, attention_mask=mask if mask_encoder else None)[0])

    def empty_cond(self) -> Cond:
        """The empty prompt's conditioning (batch 1), computed once."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    # --- the denoiser -------------------------------------------------------------
    def predict_eps(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The noise prediction of `net` (teacher, student or fake) at (x_t, t)."""
        dtype = x_t.dtype
        out = self.kind.call(self, net, x_t, t, cond).to(dtype)
        if self.prediction_type == "v_prediction":  # v = alpha eps - sigma x0  =>  eps = sigma x_t + alpha v
            alpha, sigma = self.alpha_sigma(t)
            return sigma.to(dtype) * x_t + alpha.to(dtype) * out
        return out

    def guided_eps(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                   guidance: float) -> torch.Tensor:
        """eps of `net` in float32 with classifier-free guidance, from one batched
        [uncond; cond] pass; at guidance 1 the conditional pass alone."""
        from .losses import guide

        if guidance == 1:
            return self.predict_eps(net, x, t, cond).float()
        uncond = self.empty_cond().to(x.device, x.dtype).expand(len(x))
        e_u, e_c = self.predict_eps(net, torch.cat([x, x]), t.repeat(2), uncond.cat(cond)).float().chunk(2)
        return guide(e_u, e_c, guidance)

    # --- images ---------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W)."""
        if self.vae is None:
            return x0.clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(x0.to(vae_dtype) / self.vae.config.scaling_factor).sample.float().clamp(-1, 1)

    def to(self, device, dtype=None) -> "Backbone":
        """Move the frozen parts (teacher net, text encoder, VAE)."""
        for m in (self.net, self.text_encoder, self.vae):
            if m is not None:
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
    if spec.text_encoder:
        check_model_path(spec.text_encoder)
    te_path, te_sub, tok_sub = ((spec.text_encoder, None, None) if spec.text_encoder
                                else (spec.path, "text_encoder", "tokenizer"))
    scheduler = _load("diffusers", "DDPMScheduler", spec.path, "scheduler", subfolder="scheduler")
    net = _load("diffusers", kind.denoiser, spec.path, kind.subfolder, dtype=dtype, subfolder=kind.subfolder, **weights)
    encoder = _load("transformers", kind.encoder, te_path, "text encoder", dtype=dtype, subfolder=te_sub, **weights)
    tokenizer = _load("transformers", kind.tokenizer, te_path, "tokenizer", subfolder=tok_sub)
    vae = _load("diffusers", "AutoencoderKL", spec.path, "VAE", dtype=dtype, subfolder="vae", **weights) if kind.vae else None
    for m in (net, encoder, vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return Backbone(spec, net, encoder, tokenizer, scheduler, vae=vae)
