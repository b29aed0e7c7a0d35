"""Evaluation metrics: FID maths and stats files, improved precision/recall, the TF-Inception
feature extractor with clean-fid resizing, and CLIP score; beside them KID (kid), DINOv2
features (dinov2), diversity over seeds, ImageReward, OpenCLIP checkpoints in transformers'
layout, the published protocols, and the registry of every metric `wadi eval` reports."""

from wadi.evaluation.metrics.clip_score import DEFAULT_CLIP, ClipScorer, clip_score
from wadi.evaluation.metrics.frechet import frechet_distance, frechet_distance_features, gaussian_stats, load_stats, save_stats
from wadi.evaluation.metrics.images import list_images, to_rgb_uint8
from wadi.evaluation.metrics.inception import (EXTRACTOR, clean_resize, extract_features, load_inception,
                        reference_stats, weights_path)
from wadi.evaluation.metrics.prdc import PrecisionRecall, kth_nn_radii, precision_recall

__all__ = [
    "DEFAULT_CLIP", "EXTRACTOR", "ClipScorer", "PrecisionRecall", "clean_resize", "clip_score",
    "extract_features", "frechet_distance", "frechet_distance_features",
    "gaussian_stats", "kth_nn_radii", "list_images", "load_inception", "load_stats", "precision_recall",
    "reference_stats", "save_stats", "to_rgb_uint8", "weights_path",
]
