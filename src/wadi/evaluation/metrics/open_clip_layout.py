"""OpenCLIP checkpoints in transformers' layout: HPSv2's released weights are an OpenCLIP
ViT-H/14 state dict, and wadi scores through transformers' `CLIPModel` (open_clip's import
needs torchvision's compiled operators). The two layouts differ in names, in the attention's
stacked q/k/v projection and in the transposed output projections; nothing else.

    from wadi.evaluation.metrics.open_clip_layout import save_clip_folder
    save_clip_folder("HPS_v2.1_compressed.pt", "hps-v2.1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")

writes the folder `--hps-model` reads (the config and processor of the ViT-H/14 whose weights
HPSv2 fine-tuned).
"""

from __future__ import annotations

import os
import re

import torch

_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_NAMES = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
          "visual.class_embedding": "vision_model.embeddings.class_embedding",
          "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
          "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
          "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
          "positional_embedding": "text_model.embeddings.position_embedding.weight",
          "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_IN_PROJ = re.compile(r"^attn\.in_proj_(weight|bias)$")


def clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP state dict (vision and text towers, projections, logit scale) in the
    names of transformers' CLIPModel; an unknown key is refused."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key == "attn_mask":  # a causal mask buffer, rebuilt by transformers
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        stem, _, leaf = key.rpartition(".")
        if key in _NAMES or stem in _NAMES:
            out[_NAMES[key] if key in _NAMES else f"{_NAMES[stem]}.{leaf}"] = value
            continue
        block = _BLOCK.match(key)
        if block is None:
            raise ValueError(f"not an OpenCLIP CLIP weight: {key}")
        tower = "vision_model" if block[1] else "text_model"
        prefix, rest = f"{tower}.encoder.layers.{block[2]}", block[3]
        in_proj = _IN_PROJ.match(rest)
        if in_proj:  # q, k and v stacked along the output dimension
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}.self_attn.{name}.{in_proj[1]}"] = part.contiguous()
            continue
        module, _, leaf = rest.rpartition(".")
        if module not in _LAYER:
            raise ValueError(f"not an OpenCLIP CLIP weight: {key}")
        out[f"{prefix}.{_LAYER[module]}.{leaf}"] = value
    return out


def save_clip_folder(checkpoint: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike,
                     processor: str | os.PathLike | None = None) -> None:
    """An OpenCLIP checkpoint (a state dict, or one under "state_dict", read without running
    code) as a transformers CLIP folder with `config`'s config and `processor`'s processor
    (default: `config`'s); every weight of the model must be in the checkpoint."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    model = CLIPModel(CLIPConfig.from_pretrained(config))
    missing, unexpected = model.load_state_dict(clip_state_dict(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not fit {config}'s CLIP: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(out)
    CLIPProcessor.from_pretrained(processor or config).save_pretrained(out)
