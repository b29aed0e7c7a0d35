"""ImageReward (Xu et al., 2023): a BLIP image-text encoder and an MLP trained on human
preference rankings; the score of an image for a prompt is the MLP's output on the text
encoder's first token (text attending to the image), standardised by the mean and
deviation the authors measured on their data.

The authors' package builds BLIP from its own copy of LAVIS' code, which current
transformers no longer runs, and fetches its weights itself; here the same network runs
as transformers' `BlipForImageTextRetrieval` (its vision model and its cross-attending text
encoder: ImageReward's `blip.visual_encoder` and `blip.text_encoder`) from a local folder,
with the MLP beside it in `reward_head.safetensors` (ImageReward's `mlp.layers.{0,2,4,6,7}`:
five linear layers with no activation between them, dropout only in training; the mean and
deviation in the file's metadata). `save_folder` writes that folder from the released
`ImageReward.pt` (docs/evaluation.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from wadi.evaluation.metrics.images import ImageLike, to_rgb_uint8

HEAD = "reward_head.safetensors"
HEAD_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
MAX_TOKENS = 35  # ImageReward pads and truncates every prompt to 35 tokens
# The standardisation of ImageReward v1.0 (its `ImageReward.mean` / `.std`).
MEAN, STD = 0.16717362830052426, 1.0333394966054072


def load_head(path: Path) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, float]:
    """The MLP's (weight, bias) pairs in order, and the score's mean and deviation."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"ImageReward's MLP {path} not found: --imagereward-model is a folder with the "
                                f"BLIP model and {HEAD} (docs/evaluation.md)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        missing = [f"{n}.weight" for n in HEAD_LAYERS if f"{n}.weight" not in f.keys()]
        if missing:
            raise ValueError(f"{path} is not an ImageReward head: no {missing[0]}")
        layers = [(f.get_tensor(f"{n}.weight").float(), f.get_tensor(f"{n}.bias").float()) for n in HEAD_LAYERS]
    return layers, float(meta.get("mean", MEAN)), float(meta.get("std", STD))


class ImageReward:
    """BLIP and the reward MLP from `folder` (model, processor and reward_head.safetensors)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.device = device
        self.model = BlipForImageTextRetrieval.from_pretrained(folder).to(device).eval()
        self.processor = BlipProcessor.from_pretrained(folder)
        layers, self.mean, self.std = load_head(Path(folder) / HEAD)
        self.layers = [(w.to(device), b.to(device)) for w, b in layers]

    @torch.inference_mode()
    def batch_rewards(self, images: Sequence[ImageLike], prompts: Sequence[str]) -> np.ndarray:
        pil = [Image.fromarray(to_rgb_uint8(im)) for im in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                        return_tensors="pt").to(self.device)
        image_embeds = self.model.vision_model(pixel_values=pixels)[0]
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        x = self.model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                    encoder_hidden_states=image_embeds, encoder_attention_mask=mask)[0][:, 0]
        for w, b in self.layers:
            x = torch.nn.functional.linear(x.float(), w, b)
        return ((x[:, 0] - self.mean) / self.std).cpu().numpy()

    def rewards(self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 32,
                progress: bool = False) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        starts = range(0, len(images), batch_size)
        return np.concatenate([self.batch_rewards(images[i:i + batch_size], prompts[i:i + batch_size])
                               for i in tqdm(starts, desc="imagereward", unit="batch", disable=not progress)])


# ImageReward.pt's BLIP vision names (LAVIS' ViT) -> transformers' BlipVisionModel's.
_VISION = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
           "patch_embed.proj": "embeddings.patch_embedding", "norm": "post_layernorm"}
_VISION_LAYER = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def converted(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ImageReward.pt's weights as (BlipForImageTextRetrieval's vision model and text encoder,
    the reward head); BLIP's other parts (its projections) do not enter the reward and are left out."""
    model, head = {}, {}
    for key, value in state.items():
        if key.startswith("mlp.layers."):
            head[key.removeprefix("mlp.")] = value
        elif key.startswith("blip.text_encoder."):  # the same BERT names in transformers' BLIP text model
            if not key.endswith("position_ids"):
                model["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            stem, _, leaf = name.rpartition(".")
            block = _BLOCK.match(name)
            if name in _VISION:
                model[f"vision_model.{_VISION[name]}"] = value
            elif stem in _VISION:
                model[f"vision_model.{_VISION[stem]}.{leaf}"] = value
            elif block and block[2] in _VISION_LAYER:
                model[f"vision_model.encoder.layers.{block[1]}.{_VISION_LAYER[block[2]]}.{block[3]}"] = value
            else:
                raise ValueError(f"not an ImageReward BLIP weight: {key}")
    return model, head


def save_folder(checkpoint: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike,
                processor: str | os.PathLike | None = None, image_size: int = 224) -> None:
    """The folder `--imagereward-model` reads, from the released ImageReward.pt (read without
    running code), the BlipConfig and BlipProcessor of a BLIP of its shape (`config`, `processor`:
    folders or hub ids, the processor by default `config`'s), both set to ImageReward's
    `image_size`; every weight of the vision model and text encoder must be in the checkpoint."""
    from safetensors.torch import save_file
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipProcessor

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights, head = converted(state.get("state_dict", state))
    cfg = BlipConfig.from_pretrained(config)
    cfg.vision_config.image_size = image_size
    model = BlipForImageTextRetrieval(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k.startswith(("vision_model.", "text_encoder.")) and not k.endswith("position_ids")]
    absent = [f"{n}.{p}" for n in HEAD_LAYERS for p in ("weight", "bias") if f"{n}.{p}" not in head]
    if missing or unexpected or absent:
        raise ValueError(f"{checkpoint} does not fit {config}'s BLIP and ImageReward's MLP: missing "
                         f"{(missing + absent)[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(out)
    blip_processor = BlipProcessor.from_pretrained(processor or config)
    blip_processor.image_processor.size = {"height": image_size, "width": image_size}
    blip_processor.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in head.items()}, str(Path(out) / HEAD),
              metadata={"mean": repr(MEAN), "std": repr(STD)})
