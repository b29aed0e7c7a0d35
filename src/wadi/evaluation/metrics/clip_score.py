"""CLIP score as text-to-image papers report it: the mean over image-prompt pairs of
max(cos(CLIP image embedding, CLIP text embedding), 0), e.g. 0.31; and the two
human-preference scores that are CLIP models with other weights (wadi.evaluation.metrics.preference).

torchmetrics' CLIPScore reports 100x this (31.0); the papers' tables do not.

Default model: OpenCLIP ViT-g/14 trained on LAION-2B, in its transformers format on the
hub. It is the model of the COCO protocol of GigaGAN that DMD/DMD2 follow and WaDi's
0.30-0.31 are on; other CLIP models (e.g. openai/clip-vit-large-patch14) give scores
on a different scale, so compare numbers only under the same model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from wadi.evaluation.metrics.images import ImageLike, to_rgb_uint8

DEFAULT_CLIP = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"


def _embedding(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # 4.x returns the embedding itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A CLIP model and its processor, loaded once from a hub id or a local folder."""

    def __init__(self, model: str | os.PathLike = DEFAULT_CLIP, device: str | None = None,
                 dtype: torch.dtype = torch.float32, processor: str | os.PathLike | None = None):
        # transformers takes seconds to import and only CLIP needs it.
        from transformers import CLIPModel, CLIPProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = CLIPModel.from_pretrained(model).to(self.device, dtype).eval()
        self.processor = CLIPProcessor.from_pretrained(processor or model)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned temperature (100 for OpenAI's CLIP)."""
        return float(self.model.logit_scale.detach().exp())

    @torch.inference_mode()
    def batch_cosines(self, images: Sequence[ImageLike], prompts: Sequence[str]) -> np.ndarray:
        """cos(image embedding, text embedding) for each image-prompt pair of one batch."""
        pil = [Image.fromarray(to_rgb_uint8(im)) for im in images]
        inputs = self.processor(text=list(prompts), images=pil, return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_tokens).to(self.device)
        pixels = inputs["pixel_values"].to(self.model.dtype)
        image = _embedding(self.model.get_image_features(pixel_values=pixels))
        text = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))
        return F.cosine_similarity(image.float(), text.float(), dim=-1).cpu().numpy()

    def cosines(self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
        """cos for each image-prompt pair, in batches."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        starts = range(0, len(images), batch_size)
        return np.concatenate([self.batch_cosines(images[i:i + batch_size], prompts[i:i + batch_size])
                               for i in tqdm(starts, desc="clip", unit="batch", disable=not progress)])

    def scores(self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 64,
               progress: bool = False) -> np.ndarray:
        """max(cos, 0) for each image-prompt pair: the CLIP score's terms."""
        return self.cosines(images, prompts, batch_size, progress).clip(min=0)


def clip_score(images: Sequence[ImageLike], prompts: Sequence[str],
               model: str | os.PathLike | ClipScorer = DEFAULT_CLIP, batch_size: int = 64,
               device: str | None = None, progress: bool = False) -> float:
    """Mean CLIP score (a cosine, not x100) of images against their prompts; `model` is a
    hub id, a local folder or an already loaded ClipScorer."""
    scorer = model if isinstance(model, ClipScorer) else ClipScorer(model, device)
    return float(scorer.scores(images, prompts, batch_size, progress).mean())
