"""Backbones: what the losses need from a text-to-image diffusion model, written once.

A Backbone holds the frozen pieces shared by teacher, student and fake model (text
encoder, tokenizer, VAE, noise schedule) and the teacher's denoiser `net`. Student and
fake model are copies of `net` with adapters; `predict_eps` runs any of the three.

Kinds (loaded from a local diffusers folder or a hub id, as diffusers does):
- "sd":     Stable Diffusion 1.5 / 2.1: UNet2DConditionModel, CLIP text encoder, VAE.
- "pixart": PixArt-alpha: PixArtTransformer2DModel, T5 (max length 120, attention mask),
            VAE; the transformer predicts eps and variance, we keep the first channels.
- "pixel":  a pixel-space UNet2DConditionModel with any transformers text encoder and
            no VAE (the embedded digits world).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

KINDS = ("sd", "pixart", "pixel")


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


class Backbone:
    def __init__(self, kind: str, net: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 vae: nn.Module | None = None, max_length: int | None = None, resolution: int | None = None):
        self.kind = kind
        self.family = "dit" if kind == "pixart" else "unet"
        self.net = net
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.max_length = max_length or tokenizer.model_max_length
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported; "
                             "use an epsilon or v_prediction checkpoint")
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.scheduler_config = dict(scheduler.config)
        self.channels = net.config.in_channels
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.latent_size = (resolution // scale) if resolution else net.config.sample_size
        self._empty: Cond | None = None

    # --- the noise schedule --------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), shaped (B, 1, 1, 1)."""
        abar = self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.latent_size, self.latent_size)

    # --- text -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        device = next(self.text_encoder.parameters()).device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(device)
        if self.kind == "sd":  # CLIP: the UNet attends to all 77 states, no mask (as SD does)
            return Cond(self.text_encoder(ids)[0])
        mask = tok.attention_mask.to(device)
        return Cond(self.text_encoder(ids, attention_mask=mask)[0], mask)

    def empty_cond(self) -> Cond:
        """The empty prompt's conditioning (batch 1), computed once."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    # --- the denoiser -------------------------------------------------------------
    def predict_eps(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The noise prediction of `net` (teacher, student or fake) at (x_t, t)."""
        dtype = x_t.dtype
        if self.family == "dit":
            out = net(x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            out = out[:, : self.channels]  # the rest is the learned variance
        else:
            out = net(x_t, t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask).sample
        out = out.to(dtype)
        if self.prediction_type == "v_prediction":  # v = alpha eps - sigma x0  =>  eps = sigma x_t + alpha v
            alpha, sigma = self.alpha_sigma(t)
            return sigma.to(dtype) * x_t + alpha.to(dtype) * out
        return out

    def predict_x0(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return (x_t - sigma * self.predict_eps(net, x_t, t, cond)) / alpha

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


def check_model_path(path: str) -> None:
    """Fail fast on a local path that does not exist (hub ids 'org/name' pass through)."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1 or not re.fullmatch(r"[\w.-]+/[\w.-]+", path)
    if looks_local:
        raise FileNotFoundError(f"model path {path!r} does not exist; give a diffusers folder or a hub id 'org/name'")


def _load(cls, path: str, what: str, dtype: torch.dtype | None = None, **kwargs):
    if dtype is not None:  # diffusers and transformers name the argument differently
        kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = dtype
    if kwargs.get("subfolder", "") is None:  # transformers 5 fails on subfolder=None
        del kwargs["subfolder"]
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"could not load the {what} from {path!r}: {first}") from None


def load_backbone(kind: str, path: str, text_encoder: str | None = None, resolution: int | None = None,
                  max_length: int | None = None, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a backbone the way diffusers does: subfolders unet|transformer, text_encoder,
    tokenizer, vae, scheduler of a local folder or a hub repository.

    `text_encoder` names another folder for the text encoder and tokenizer (the pixel
    kind uses it for an encoder shipped elsewhere).
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    if kind not in KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; choose one of {', '.join(KINDS)}")
    check_model_path(path)
    if text_encoder:
        check_model_path(text_encoder)
    te_path, te_sub = (text_encoder, None) if text_encoder else (path, "text_encoder")
    tok_sub = None if text_encoder else "tokenizer"
    scheduler = _load(DDPMScheduler, path, "scheduler", subfolder="scheduler")
    if kind == "sd":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        net = _load(UNet2DConditionModel, path, "UNet", subfolder="unet", dtype=dtype)
        enc = _load(CLIPTextModel, te_path, "text encoder", subfolder=te_sub, dtype=dtype)
        tok = _load(CLIPTokenizer, te_path, "tokenizer", subfolder=tok_sub)
        vae = _load(AutoencoderKL, path, "VAE", subfolder="vae", dtype=dtype)
    elif kind == "pixart":
        from diffusers import PixArtTransformer2DModel
        from transformers import AutoTokenizer, T5EncoderModel

        net = _load(PixArtTransformer2DModel, path, "transformer", subfolder="transformer", dtype=dtype)
        enc = _load(T5EncoderModel, te_path, "text encoder", subfolder=te_sub, dtype=dtype)
        tok = _load(AutoTokenizer, te_path, "tokenizer", subfolder=tok_sub)
        vae = _load(AutoencoderKL, path, "VAE", subfolder="vae", dtype=dtype)
        max_length = max_length or 120  # PixArt-alpha's T5 length
    else:
        from diffusers import UNet2DConditionModel
        from transformers import AutoModel, AutoTokenizer

        net = _load(UNet2DConditionModel, path, "UNet", subfolder="unet", dtype=dtype)
        enc = _load(AutoModel, te_path, "text encoder", subfolder=te_sub, dtype=dtype)
        tok = _load(AutoTokenizer, te_path, "tokenizer", subfolder=tok_sub)
        vae = None
    for m in (net, enc, vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return Backbone(kind, net, enc, tok, scheduler, vae=vae, max_length=max_length, resolution=resolution)
