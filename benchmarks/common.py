"""What the benchmarks share: SD-shaped backbones with random weights (nothing is
downloaded), the bytes autograd saves for backward, and a description of the machine."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from wadi.models.backbones import Backbone, BackboneSpec


def char_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP tokenizer over single letters (no merges): SD's 77 tokens, no download."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def sd_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False)


def sd_unet(width: int, latent: int):
    """SD 1.5's UNet block structure at block_out_channels (w, 2w, 4w, 4w) (SD 1.5: w = 320)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)


def sd_backbone(width: int, latent: int, text_layers: int, folder: Path, vae=None) -> Backbone:
    """An SD-1.5-shaped UNet, a CLIP-L-shaped text encoder with `text_layers` layers, SD's
    noise schedule; random weights, no VAE unless given (training never decodes)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = char_tokenizer(folder)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                       num_attention_heads=12, num_hidden_layers=text_layers,
                                       max_position_embeddings=77))
    unet = sd_unet(width, latent)
    for m in (unet, enc, vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return Backbone(BackboneSpec(kind="sd"), unet, enc, tok, dict(sd_scheduler().config), vae=vae)


def sdxl_backbone(latent: int, text_layers: int, folder: Path) -> Backbone:
    """SDXL's UNet itself (wadi.models.archs) at `latent` (SDXL: 128 for 1024 px), CLIP-L- and
    CLIP-G-shaped text encoders with `text_layers` layers each, SD's noise schedule; random
    weights, no VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from wadi.models.archs import get_arch

    tok = char_tokenizer(folder)
    shapes = dict(vocab_size=len(tok), num_hidden_layers=text_layers, max_position_embeddings=77)
    enc = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, **shapes))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                      projection_dim=1280, **shapes))
    unet = UNet2DConditionModel(**{**get_arch("sdxl").config, "sample_size": latent})
    for m in (unet, enc, enc2):
        m.requires_grad_(False).eval()
    return Backbone(BackboneSpec(kind="sdxl", resolution=latent * 8), unet, enc, tok, dict(sd_scheduler().config),
                    more_text={"text_encoder_2": enc2, "tokenizer_2": tok})


class SavedForBackward:
    """Bytes autograd saves for backward, per graph, each storage counted once.

    A graph's forward saves (pack) until its backward starts reading them back (unpack);
    the next save after that starts a new graph. Storages in `exclude` (the models'
    parameters and buffers, which live anyway) are not counted.
    """

    def __init__(self, exclude: set[int]):
        self.exclude, self.graphs, self._open = exclude, [], False

    def _pack(self, t):
        if not self._open:
            self.graphs.append({})
            self._open = True
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.graphs[-1][s.data_ptr()] = s.nbytes()
        return t

    def _unpack(self, t):
        self._open = False
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def megabytes(self) -> list[float]:
        return [sum(g.values()) / 2**20 for g in self.graphs]


def machine(device: torch.device) -> str:
    """The device in words, torch's version and threads, the load before the run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor())
    return (f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
