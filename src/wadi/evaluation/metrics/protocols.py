"""Published evaluation protocols that `wadi eval --protocol NAME` reproduces: how many
prompts, which metrics, the images' size before the metrics and the CLIP score's model and
prompt prefix. The prompts and weights come from the user (docs/evaluation.md)."""

from __future__ import annotations

from dataclasses import dataclass

from wadi.evaluation.metrics.clip_score import DEFAULT_CLIP


@dataclass(frozen=True)
class Protocol:
    num: int  # prompts (one image each)
    metrics: str  # the default --metrics
    resize: int | None = None  # centre square, Lanczos to this size before every metric
    clip_model: str = DEFAULT_CLIP
    clip_prefix: str = ""


# DMD2 (Yin et al., 2024), after GigaGAN: captions of COCO 2014 val in the file order of their
# caption list, images centre-cropped and resized to 256 with Lanczos, then clean-fid's
# Inception FID against the COCO val2014 images treated the same way, and the CLIP score
# in OpenCLIP ViT-g/14 (laion2b_s12b_b42k) with "A photo depicts " before each caption.
# 10k prompts for SDXL, 30k for SD 1.5.
PROTOCOLS = {
    "dmd2-coco10k": Protocol(10000, "fid,clip", 256, DEFAULT_CLIP, "A photo depicts "),
    "dmd2-coco30k": Protocol(30000, "fid,clip", 256, DEFAULT_CLIP, "A photo depicts "),
}
