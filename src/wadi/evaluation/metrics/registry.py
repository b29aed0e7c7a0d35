"""Every metric `wadi eval` can report, in one table: what each needs, the keys it writes to
results.json, how it is computed and the protocol recorded beside its numbers. The
evaluation (wadi.evaluation.evaluate), the command's options and printout, the digits reports and the
model cards read this table; a new metric is one entry here (and its tests).

A metric's `compute(job)` gets a `Job` (wadi.evaluation.evaluate.Job): the images of one model, their
prompts, the settings, and cached access to features, reference, teacher images and
scoring models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

# What a metric needs beyond the generated images.
REFERENCE = "reference"  # reference images, or for FID alone a stats file
REFERENCE_IMAGES = "reference images"  # a folder of reference images
TEACHER = "teacher"  # the teacher's images of the same prompts and seeds (`--teacher`)
REPEATS = "repeats"  # prompts with several seeds each (`--repeats`)
# Feature spaces: the one `--features` names (TF-Inception unless a world's) and DINOv2's.
MAIN, DINOV2 = "main", "dinov2"


@dataclass(frozen=True)
class Metric:
    name: str  # as --metrics names it
    keys: dict[str, str | None]  # what it writes into a model's results, in table order: key -> column
    # title (None: bookkeeping beside the score, not a score)
    summary: str  # one line: --help and docs
    compute: Callable  # (Job) -> {key: value}
    needs: tuple[str, ...] = ()
    features: str | None = None  # MAIN or DINOV2: the feature space it reads
    model: str | None = None  # the MetricSettings field naming its scoring model (loaded, checked early)
    protocol: Callable[[object], dict] = lambda s: {}  # (MetricSettings) -> what defines the number
    check: Callable[[object], None] | None = None  # (MetricSettings): more to refuse before any image is made


def _fid(job) -> dict:
    from wadi.evaluation.metrics import frechet_distance, gaussian_stats

    return {"fid": frechet_distance(*gaussian_stats(job.features(MAIN)), *job.reference_stats(MAIN))}


def _kid(job) -> dict:
    from wadi.evaluation.metrics.kid import kernel_distance

    s, fake = job.settings, job.features(MAIN)  # the images' features first, then the reference's (once)
    k = kernel_distance(job.reference_features(MAIN), fake, s.kid_subsets, s.kid_subset_size)
    return {"kid": k.mean, "kid_std": k.std, "kid_subset_size": k.subset_size}


def _pr(job) -> dict:
    from wadi.evaluation.metrics import precision_recall

    fake = job.features(MAIN)
    return precision_recall(job.reference_features(MAIN), fake, k=job.settings.pr_k, device=job.device)._asdict()


def _fid_teacher(job) -> dict:
    from wadi.evaluation.metrics import frechet_distance_features

    teacher = job.teacher_features(MAIN)
    return {} if teacher is None else {"fid_teacher": frechet_distance_features(job.features(MAIN), teacher)}


def _fd_dinov2(job) -> dict:
    from wadi.evaluation.metrics import frechet_distance_features

    return {"fd_dinov2": frechet_distance_features(job.features(DINOV2), job.reference_features(DINOV2))}


def _diversity(job) -> dict:
    from wadi.evaluation.metrics.diversity import seed_diversity

    return {"diversity": seed_diversity(job.features(DINOV2), job.prompts)}


def _clip(job) -> dict:
    prompts = [job.settings.clip_prefix + p for p in job.prompts]
    return {"clip_score": float(job.clip("clip_model").scores(job.images, prompts, progress=job.progress).mean())}


def _pickscore(job) -> dict:
    scorer = job.clip("pickscore_model", "pickscore_processor")
    return {"pickscore": scorer.logit_scale * float(scorer.cosines(job.images, job.prompts,
                                                                    progress=job.progress).mean())}


def _hpsv2(job) -> dict:
    return {"hpsv2": float(job.clip("hps_model").cosines(job.images, job.prompts, progress=job.progress).mean())}


def _imagereward(job) -> dict:
    from wadi.evaluation.metrics.image_reward import ImageReward

    model = job.model("imagereward", lambda: ImageReward(job.settings.imagereward_model, job.device))
    return {"imagereward": float(model.rewards(job.images, job.prompts, progress=job.progress).mean())}


def _check_pickscore(s) -> None:
    from transformers import CLIPProcessor

    processor = s.pickscore_processor or s.pickscore_model
    try:
        CLIPProcessor.from_pretrained(processor)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the PickScore processor {processor!r} (--pickscore-processor: {e})") from None


def _check_imagereward(s) -> None:
    from pathlib import Path

    from wadi.evaluation.metrics.image_reward import HEAD, load_head

    load_head(Path(s.imagereward_model) / HEAD)


def _check_alignment(s) -> None:
    if not s.alignment:
        raise ValueError("the alignment metric needs --alignment MODULE:FUNCTION")
    load_function(s.alignment, "--alignment")


def _alignment(job) -> dict:
    from wadi.files.images import read_images

    return {"alignment": float(job.function("alignment")(read_images(job.paths), job.prompts))}


def _features(s) -> dict:
    return {"features": s.features.spec, "reference": s.reference_name, "resize": s.resize}


CLIP_PROTOCOL = "mean over image-prompt pairs of max(cos(image, text), 0) in the model's projected embeddings"
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fid", {"fid": "FID"}, "Frechet distance to the reference images (FID in Inception features)", _fid,
           (REFERENCE,), MAIN, protocol=lambda s: {**_features(s), "estimate": "Gaussians fitted to all images"}),
    Metric("kid", {"kid": "KID", "kid_std": "KID spread", "kid_subset_size": None},
           "kernel distance to the reference (unbiased MMD^2, polynomial kernel), with its spread over subsets",
           _kid, (REFERENCE_IMAGES,), MAIN,
           protocol=lambda s: {**_features(s), "kernel": "(x.y / d + 1)^3", "subsets": s.kid_subsets,
                               "subset_size": s.kid_subset_size, "spread": "std over subsets (ddof 0)"}),
    Metric("pr", {"precision": "precision", "recall": "recall"}, "improved precision and recall against the reference", _pr,
           (REFERENCE_IMAGES,), MAIN, protocol=lambda s: {**_features(s), "k": s.pr_k}),
    Metric("fid_teacher", {"fid_teacher": "FID to teacher"}, "Frechet distance to the teacher's images of the same prompts and seeds",
           _fid_teacher, (TEACHER,), MAIN, protocol=lambda s: {"features": s.features.spec, "against": "teacher"}),
    Metric("fd_dinov2", {"fd_dinov2": "FD-DINOv2"}, "Frechet distance to the reference in DINOv2 features", _fd_dinov2,
           (REFERENCE_IMAGES,), DINOV2, "dinov2_model",
           protocol=lambda s: {"model": s.dinov2_model, "reference": s.reference_name,
                               "input": "224 px, clean bicubic resize, ImageNet normalisation",
                               "feature": "class token after the final layer norm"}),
    Metric("diversity", {"diversity": "diversity"}, "mean pairwise cosine distance in DINOv2 features over the seeds of a prompt",
           _diversity, (REPEATS,), DINOV2, "dinov2_model",
           protocol=lambda s: {"model": s.dinov2_model, "distance": "1 - cos", "repeats": s.repeats}),
    Metric("clip", {"clip_score": "CLIP score"}, "CLIP score: image-prompt cosine in a CLIP model (not x100)", _clip,
           model="clip_model", protocol=lambda s: {"model": s.clip_model, "score": CLIP_PROTOCOL,
                                                   "prompt_prefix": s.clip_prefix, "resize": s.resize}),
    Metric("pickscore", {"pickscore": "PickScore"}, "PickScore: exp(logit scale) x cosine in the PickScore CLIP", _pickscore,
           model="pickscore_model",
           protocol=lambda s: {"model": s.pickscore_model, "processor": s.pickscore_processor,
                               "score": "mean of exp(logit_scale) * cos(image, text)"}, check=_check_pickscore),
    Metric("hpsv2", {"hpsv2": "HPSv2"}, "HPSv2: cosine in the HPS-tuned CLIP ViT-H-14", _hpsv2, model="hps_model",
           protocol=lambda s: {"model": s.hps_model, "score": "mean of cos(image, text)"}),
    Metric("imagereward", {"imagereward": "ImageReward"}, "ImageReward: BLIP with the reward MLP, standardised", _imagereward,
           model="imagereward_model",
           protocol=lambda s: {"model": s.imagereward_model, "score": "mean of (mlp(text-on-image CLS) - mean) / std",
                               "max_tokens": 35}, check=_check_imagereward),
    Metric("alignment", {"alignment": "alignment"}, "a plug-in alignment function (images, prompts) -> fraction", _alignment,
           protocol=lambda s: {"function": s.alignment}, check=_check_alignment),
)}

# Column titles of tables (the digits reports), by result key.
LABELS = {k: title for m in METRICS.values() for k, title in m.keys.items() if title}


def result_keys(names=None) -> list[str]:
    """The score keys of the named metrics (default: all) in the table's order: what the
    printout, the reports and the cards show."""
    return [k for m in METRICS.values() if names is None or m.name in names for k, title in m.keys.items() if title]


def parse(names: str) -> list[str]:
    """Comma-separated metric names, checked."""
    chosen = [m.strip() for m in names.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if not chosen:
        raise ValueError("--metrics names no metric")
    return chosen


def load_function(spec: str, option: str) -> Callable:
    """The function that `module:function` names."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"{option} {spec!r} must look like package.module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{option} {spec!r} cannot be loaded ({e})") from None
