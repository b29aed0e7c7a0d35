"""`wadi eval` as the papers do it: seeded prompts, images on disk, the metrics of
wadi.evaluation.metrics.registry (FID, KID, precision/recall, FID to the teacher, FD-DINOv2, diversity,
CLIP score, PickScore, HPSv2, ImageReward, a pluggable alignment), one results JSON with each
metric's protocol.

Prompts (wadi.files.prompts): the zero-shot COCO protocols (2014: 30k, 2017: 5k), drawn
reproducibly from the user's COCO caption annotation file (one caption per image, images
and captions picked with a seeded generator), or any prompt file. Image i is made from
prompt i with seed `seed + i`, so a set of images is a pure function of the settings.

Generation is spread over the processes of `accelerate launch` (process r makes the
missing images r, r + n, ...), resumes (an image on disk is never made again; files are
written whole, see sampling.save_png), and refuses to mix images of other settings.
FID and precision/recall use the TF-Inception features with clean-fid's resize (or a
feature function `module:function`); the reference folder's features are cached and
reused. Plug-in functions take the images as read back from disk, an (N, H, W, C) uint8
array: an alignment function `f(images, prompts) -> fraction`, a feature function
`f(images) -> (N, d) features`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from wadi.errors import CorruptFile, describe
from wadi.files.atomic import atomic_path, check_forced, check_out, read_json_object, write_text
from wadi.files.images import read_images, save_png, to_uint8
from wadi.files.prompts import PromptSet
from wadi.models.sampling import Sampling
from wadi.artifacts.students import Loaded
from wadi.evaluation.metrics.registry import load_function
from wadi.worlds import WorldEval

# --- images ------------------------------------------------------------------------

def image_path(folder: Path, i: int) -> Path:
    return folder / f"{i:06d}.png"


def missing_indices(folder: Path, n: int) -> list[int]:
    return [i for i in range(n) if not image_path(folder, i).exists()]


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's share of the images still to make."""
    return indices[rank::world]


def generate(model: Loaded, sampling: Sampling, prompts: PromptSet, seed: int, folder: Path, batch_size: int,
             state, progress: bool = True) -> tuple[int, float]:
    """Make the images of `folder` not yet on disk; every process its share. Returns how many
    this process made and the seconds its sampler took (without writing the files)."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    todo = missing_indices(folder, len(prompts.prompts))
    state.wait_for_everyone()  # every process must see the same list before files appear
    mine = shard(todo, state.process_index, state.num_processes)
    bar = tqdm(total=len(mine), desc=folder.name, unit="img", disable=not (progress and state.is_main_process))
    seconds = 0.0
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        t0 = time.perf_counter()
        images = sampling(model.backbone, model.net, [prompts.prompts[i] for i in chunk],
                          [seed + i for i in chunk], batch_size)
        seconds += time.perf_counter() - t0
        for i, img in zip(chunk, to_uint8(images)):
            save_png(img, image_path(folder, i), {"prompt": prompts.prompts[i], "seed": seed + i,
                                                 "model": model.source, "sampling": sampling.to_dict()})
        bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    return len(mine), seconds


# --- features and the reference set --------------------------------------------------

INCEPTION = "inception"
DINOV2 = "dinov2"


@dataclass(frozen=True)
class Extractor:
    """A feature space: the standard TF-Inception (with clean-fid's resize), DINOv2 (`model`
    a transformers Dinov2Model folder or hub id), or a function `module:function` of
    (N, H, W, C) uint8 images returning (N, d) features (a world's own classifier, say)."""

    spec: str = INCEPTION
    model: str | None = None  # DINOv2's weights
    resize: int | None = None  # a protocol's square size, made before the extractor's own resize

    def check(self) -> None:
        """Fail before any image is generated."""
        if self.spec == DINOV2:
            return  # its model is checked with the other scoring models
        if self.spec != INCEPTION:
            load_function(self.spec, "--features")
            return
        from wadi.evaluation.metrics import weights_path

        try:
            weights_path()
        except ModuleNotFoundError as e:
            raise ValueError(str(e)) from None

    @property
    def identity(self) -> str:
        return "|".join(str(x) for x in (self.spec, self.model, self.resize) if x is not None)

    @property
    def tag(self) -> str:
        """Names cache files: features of different extractors never mix."""
        return self.spec if self.identity == self.spec else hashlib.sha256(self.identity.encode()).hexdigest()[:12]

    def __call__(self, paths: list[Path], batch_size: int, device: str, progress: bool) -> np.ndarray:
        if self.resize:
            paths = [protocol_resize(p, self.resize) for p in paths]
        if self.spec == INCEPTION:
            from wadi.evaluation.metrics import extract_features

            return extract_features(paths, batch_size, device, progress=progress)
        if self.spec == DINOV2:
            from wadi.evaluation.metrics.dinov2 import dinov2_features

            return dinov2_features(paths, self.model, batch_size, device, progress)
        images = np.stack(paths) if self.resize else read_images(paths)
        return np.asarray(load_function(self.spec, "--features")(images), dtype=np.float64)


def protocol_resize(path: Path, size: int) -> np.ndarray:
    """The published COCO protocols' step before the metrics (GigaGAN's, which DMD2 keeps):
    the centred square of the image's short side, resized to size x size with Lanczos."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS))


@dataclass
class Reference:
    """Reference images for the metrics against real images: a folder (its features cached in
    `cache_dir`, keyed by the files and the extractor) or, for Inception FID alone, a
    stats .npz file written by wadi.evaluation.metrics.save_stats."""

    path: Path
    cache_dir: Path

    def check(self, folder_needed: bool) -> None:
        """A folder with images (or, for FID alone, a stats .npz), before any image is made."""
        from wadi.evaluation.metrics import list_images

        if not self.path.exists():
            raise FileNotFoundError(f"--ref {self.path} does not exist")
        if self.path.is_file():
            if folder_needed or self.path.suffix != ".npz":
                raise ValueError(f"--ref {self.path} must be a folder of reference images"
                                 + ("" if folder_needed else " or a stats .npz"))
            return
        list_images(self.path)

    def _cache(self, what: str, extractor: Extractor) -> Path:
        name = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.path.name}-{name}-{extractor.tag}-{what}.npz"

    def stats(self, extractor: Extractor, device: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        from wadi.evaluation.metrics import gaussian_stats, load_stats, reference_stats

        if self.path.is_file():
            if extractor.spec != INCEPTION:
                raise ValueError(f"--features {extractor.spec} needs a folder of reference images, "
                                 f"not the stats file {self.path}")
            mu, sigma, _ = load_stats(self.path)
            return mu, sigma
        if extractor.spec != INCEPTION:
            return gaussian_stats(self.features(extractor, device, progress))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return reference_stats(self.path, self._cache("stats", extractor), device=device, progress=progress)

    def features(self, extractor: Extractor, device: str, progress: bool) -> np.ndarray:
        """Features of every reference image, reused from the cache when the files are unchanged."""
        from wadi.evaluation.metrics import gaussian_stats, list_images, save_stats
        from wadi.evaluation.metrics.inception import EXTRACTOR, folder_key

        if self.path.is_file():
            raise ValueError(f"this metric needs a folder of reference images, not the stats file {self.path}")
        files = list_images(self.path)
        key = f"{extractor.identity}\n{folder_key(self.path, files)}"
        cache = self._cache("features", extractor)
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return z["features"]
        features = extractor(files, 50, device, progress)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=features, key=np.asarray(key))
        if extractor.spec == INCEPTION:  # reference_stats' own cache: FID need not extract again
            save_stats(self._cache("stats", extractor), *gaussian_stats(features), key=folder_key(self.path, files),
                       n=len(files), extractor=EXTRACTOR, folder=str(self.path.resolve()))
        return features


def default_cache_dir() -> Path:
    return Path(os.environ.get("WADI_CACHE", Path.home() / ".cache" / "wadi")) / "reference"


# --- metrics -------------------------------------------------------------------------

@dataclass
class MetricSettings:
    """Which metrics (names of wadi.evaluation.metrics.registry.METRICS) and everything they are computed with."""

    metrics: list[str]
    reference: Reference | None = None
    clip_model: str | None = None
    pr_k: int = 3
    alignment: str | None = None  # "module:function"
    batch_size: int = 50
    features: Extractor = field(default_factory=Extractor)
    dinov2_model: str | None = None
    pickscore_model: str | None = None
    pickscore_processor: str | None = None  # None: the model's own folder
    hps_model: str | None = None
    imagereward_model: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    repeats: int = 1  # images per prompt (recorded by the diversity protocol)
    resize: int | None = None  # a protocol's square size for every metric's input (protocol_resize)
    clip_prefix: str = ""  # put before each prompt for the CLIP score ("A photo depicts " in DMD2's)

    def __post_init__(self):
        from wadi.evaluation.metrics.registry import MAIN, METRICS, REFERENCE, REFERENCE_IMAGES, parse

        chosen = [METRICS[m] for m in parse(",".join(self.metrics))]
        needs = {n for m in chosen for n in m.needs}
        if needs & {REFERENCE, REFERENCE_IMAGES} and self.reference is None:
            names = [m.name for m in chosen if {REFERENCE, REFERENCE_IMAGES} & set(m.needs)]
            raise ValueError(f"{', '.join(names)} need reference images: pass --ref FOLDER")
        for m in chosen:
            if m.model:
                self._check_model(m.model, m.name, next(iter(m.keys.values())))
            if m.check:
                m.check(self)
        if any(m.features == MAIN for m in chosen):
            self.features.check()
        if self.reference is not None and needs & {REFERENCE, REFERENCE_IMAGES}:
            self.reference.check(REFERENCE_IMAGES in needs)
        if self.kid_subsets < 1:
            raise ValueError(f"--kid-subsets must be at least 1, got {self.kid_subsets}")
        if self.kid_subset_size < 2:
            raise ValueError(f"--kid-subset-size must be at least 2, got {self.kid_subset_size}")

    def _check_model(self, name: str, metric: str, label: str) -> None:
        """Its config only: a model that cannot load fails before any image is made."""
        from transformers import AutoConfig

        option = "--" + name.replace("_", "-")
        path = getattr(self, name)
        if not path:
            raise ValueError(f"the metric {metric} needs {option} FOLDER_OR_HUB_ID")
        try:
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the {label} model {path!r} ({option}: {describe(e)})") from None

    def extractor(self, space: str) -> Extractor:
        """The extractor of a registry feature space: the main one (--features) or DINOv2's."""
        from wadi.evaluation.metrics.registry import MAIN

        return replace(self.features if space == MAIN else Extractor(DINOV2, self.dinov2_model), resize=self.resize)

    @property
    def reference_name(self) -> str | None:
        return None if self.reference is None else str(self.reference.path)

    def to_dict(self) -> dict:
        from wadi.evaluation.metrics.registry import METRICS

        d = asdict(self)
        d["reference"] = self.reference_name
        d["features"] = self.features.spec
        d["protocols"] = {m: METRICS[m].protocol(self) for m in self.metrics}
        return d


def world_metric_settings(world: WorldEval, cache_dir: Path, metrics: str | None = None,
                          reference: Path | None = None, features: str | None = None, alignment: str | None = None,
                          **options) -> MetricSettings:
    """A world's metrics, each setting given here replacing the world's own; `options` are
    further MetricSettings fields."""
    return metric_settings(metrics or world.metrics, reference or world.reference, cache_dir,
                           features or world.features, alignment=alignment or world.alignment, **options)


def metric_settings(names: str, reference: Path | None, cache_dir: Path, features: str = INCEPTION,
                    **options) -> MetricSettings:
    """MetricSettings from option values: comma-separated metric names, a reference that must
    exist, and any MetricSettings field by name (None: its default)."""
    from wadi.evaluation.metrics.registry import parse

    if reference is not None and not Path(reference).exists():
        raise FileNotFoundError(f"--ref {reference} does not exist")
    return MetricSettings(parse(names), Reference(Path(reference), cache_dir) if reference is not None else None,
                          features=Extractor(features or INCEPTION),
                          **{k: v for k, v in options.items() if v is not None})


@dataclass
class Scorer:
    """The metric models and the reference's (and teacher's) features, each loaded once and
    used for every evaluated model."""

    settings: MetricSettings
    device: str
    progress: bool = True
    teacher: list[Path] | None = None  # the teacher's images, for the metrics against them
    _cache: dict = field(default_factory=dict)

    def _get(self, what, make):
        if what not in self._cache:
            self._cache[what] = make()
        return self._cache[what]

    def score(self, paths: list[Path], prompts: list[str]) -> dict:
        from wadi.evaluation.metrics.registry import METRICS

        job, out = Job(self, paths, prompts), {}
        for name in self.settings.metrics:
            out.update(METRICS[name].compute(job))
        return out


@dataclass
class Job:
    """One model's images under the metrics: what a registry metric's `compute` reads."""

    scorer: Scorer
    paths: list[Path]
    prompts: list[str]
    _features: dict = field(default_factory=dict)

    @property
    def settings(self) -> MetricSettings:
        return self.scorer.settings

    @property
    def device(self) -> str:
        return self.scorer.device

    @property
    def progress(self) -> bool:
        return self.scorer.progress

    @property
    def images(self) -> list:
        """What the image-text scorers read: the files, or the protocol's resized arrays."""
        size = self.settings.resize
        return self.paths if not size else self.scorer._get(("resized", tuple(self.paths)), lambda: [
            protocol_resize(p, size) for p in self.paths])

    def features(self, space: str) -> np.ndarray:
        if space not in self._features:
            self._features[space] = self.settings.extractor(space)(self.paths, self.settings.batch_size, self.device,
                                                                   self.progress)
        return self._features[space]

    def reference_features(self, space: str) -> np.ndarray:
        s = self.settings
        return self.scorer._get(("reference", space), lambda: s.reference.features(s.extractor(space), self.device,
                                                                                   self.progress))

    def reference_stats(self, space: str) -> tuple[np.ndarray, np.ndarray]:
        """Reused from the reference features when another metric has (or will) read them."""
        from wadi.evaluation.metrics import gaussian_stats
        from wadi.evaluation.metrics.registry import METRICS, REFERENCE_IMAGES

        s = self.settings
        if any(REFERENCE_IMAGES in METRICS[m].needs and METRICS[m].features == space for m in s.metrics):
            return self.scorer._get(("stats", space), lambda: gaussian_stats(self.reference_features(space)))
        return self.scorer._get(("stats", space), lambda: s.reference.stats(s.extractor(space), self.device,
                                                                            self.progress))

    def teacher_features(self, space: str) -> np.ndarray | None:
        """The teacher's images' features; None when these are the teacher's own images."""
        teacher = self.scorer.teacher
        if teacher is None or list(teacher) == list(self.paths):
            return None
        s = self.settings
        return self.scorer._get(("teacher", space), lambda: s.extractor(space)(teacher, s.batch_size, self.device,
                                                                               self.progress))

    def clip(self, model_field: str, processor_field: str | None = None):
        from wadi.evaluation.metrics import ClipScorer

        s = self.settings
        processor = getattr(s, processor_field) if processor_field else None
        return self.scorer._get(("clip", model_field), lambda: ClipScorer(getattr(s, model_field), self.device,
                                                                          processor=processor))

    def model(self, what: str, make):
        return self.scorer._get(("model", what), make)

    def function(self, field_name: str) -> Callable:
        spec = getattr(self.settings, field_name)
        return self.scorer._get(("function", field_name), lambda: load_function(spec, f"--{field_name}"))


# --- the whole evaluation ------------------------------------------------------------------

@dataclass
class Entry:
    """One model under evaluation: its name (its image folder under the output) and how it samples."""

    name: str
    model: Loaded
    sampling: Sampling

    def settings(self) -> dict:
        bb = self.model.backbone
        return {"source": self.model.source, "role": "student" if self.sampling.student else "teacher",
                "sampling": self.sampling.to_dict(), "image_shape": list(bb.latent_shape),
                "dtype": str(next(self.model.net.parameters()).dtype)}


def generation_settings(entries: list[Entry], prompts: PromptSet, seed: int) -> dict:
    """What the images on disk depend on: a resumed evaluation must have the same."""
    return {"prompts": {"source": prompts.source, "n": len(prompts.prompts), "sha256_16": prompts.digest()},
            "seed": seed, "models": {e.name: e.settings() for e in entries}}


def check_resume(out: Path, settings: dict, force: bool) -> None:
    """Refuse to add images to an output made with other settings (unless `force` clears it)."""
    saved = out / "settings.json"
    inputs = [model["source"] for model in settings["models"].values()]
    if not saved.is_file():
        check_out(out, force, inputs=inputs)
        return
    if force:
        check_forced(out, inputs=inputs)
    old = read_json_object(saved, "; use another --out")
    if not isinstance(old.get("models", {}), dict):
        raise CorruptFile(f"{saved}: models is not a mapping; use another --out")
    clash = [name for name, s in settings["models"].items() if old.get("models", {}).get(name, s) != s]
    if old.get("prompts") != settings["prompts"] or old.get("seed") != settings["seed"]:
        clash = list(old.get("models", {}))
    if clash and not force:
        raise FileExistsError(f"--out {out} holds images of other settings (model {clash[0]!r} or the prompts "
                              "differ); use another --out, or --force to delete those images")
    for name in clash:  # only our own numbered PNGs are removed
        for png in (out / name).glob("[0-9]" * 6 + ".png"):
            png.unlink()


TEACHER = "teacher"  # the entry the metrics against the teacher's images compare with


def check_needs(metrics: MetricSettings, entries: list[Entry], prompts: PromptSet) -> None:
    """What the metrics need of the evaluation itself, before any image is made."""
    from wadi.evaluation.metrics.diversity import prompt_groups
    from wadi.evaluation.metrics.registry import METRICS, REPEATS, TEACHER as NEEDS_TEACHER

    for name in metrics.metrics:
        needs = METRICS[name].needs
        if NEEDS_TEACHER in needs and not any(e.name == TEACHER for e in entries):
            raise ValueError(f"the metric {name} compares with the teacher's images of the same prompts and seeds: "
                             "pass --teacher")
        if REPEATS in needs and not prompt_groups(prompts.prompts):
            raise ValueError(f"the metric {name} needs several seeds of a prompt: pass --repeats K (K >= 2)")


def evaluate(entries: list[Entry], prompts: PromptSet, seed: int, out: str | Path, metrics: MetricSettings,
             batch_size: int = 16, force: bool = False, progress: bool = True, device: str | None = None) -> dict:
    """Generate (resumably, across processes) and score every entry; the main process
    writes and returns the results (other processes return {})."""
    from accelerate import PartialState

    from wadi import __version__

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=multi_cpu)
    device = str(state.device) if state.num_processes > 1 else (device or str(state.device))
    out = Path(out)
    for e in entries:  # a scheduler the process has not is refused before anything is written
        e.sampling.check(e.model.backbone)
    check_needs(metrics, entries, prompts)
    settings = generation_settings(entries, prompts, seed)
    if state.is_main_process:
        check_resume(out, settings, force)
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
        write_prompts(out / "prompts.jsonl", prompts, seed)
    state.wait_for_everyone()
    timings = {}
    for e in entries:
        e.model.to(device)
        t0 = time.time()
        made, sampling = generate(e.model, e.sampling, prompts, seed, out / e.name, batch_size, state, progress)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            made = sum(gather_object([made]))
        timings[e.name] = {"made": made, "seconds": round(time.time() - t0, 3),
                           "sampling_seconds": round(sampling, 3)}
        e.model.to("cpu")  # one model on the device at a time
    if not state.is_main_process:
        return {}
    n = len(prompts.prompts)
    teacher = [image_path(out / TEACHER, i) for i in range(n)] if any(e.name == TEACHER for e in entries) else None
    scorer = Scorer(metrics, device, progress, teacher)
    results = {"wadi_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "settings": {**settings, "metrics": metrics.to_dict(), "batch_size": batch_size,
                            "processes": state.num_processes, "device": device},
               "models": {}}
    for e in entries:
        scores = scorer.score([image_path(out / e.name, i) for i in range(n)], prompts.prompts)
        results["models"][e.name] = {**settings["models"][e.name], "images": str(out / e.name),
                                     "num_images": n, "generation": timings[e.name], **scores}
    write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    return results


def write_prompts(path: Path, prompts: PromptSet, seed: int) -> None:
    """One line per image: index, prompt, seed and, for COCO, the image the caption describes."""
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(prompts.prompts):
            row = {"index": i, "prompt": p, "seed": seed + i}
            if prompts.image_files:
                row["coco_image"] = prompts.image_files[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
