"""`wadi eval` as the papers do it: seeded prompts, images on disk, FID / CLIP score /
precision-recall / a pluggable alignment metric, one results JSON.

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
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from wadi.errors import CorruptFile, describe
from wadi.files.atomic import atomic_path, check_forced, check_out, read_json_object, write_text
from wadi.files.images import read_images, save_png, to_uint8
from wadi.files.prompts import PromptSet
from wadi.models.sampling import Sampling
from wadi.artifacts.students import Loaded
from wadi.worlds import WorldEval

METRICS = ("fid", "clip", "pr", "alignment")


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


def load_function(spec: str, option: str) -> Callable:
    """The function that `module:function` names."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"{option} {spec!r} must look like package.module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{option} {spec!r} cannot be loaded ({e})") from None


@dataclass(frozen=True)
class Extractor:
    """The feature space of FID and precision/recall: the standard TF-Inception (with
    clean-fid's resize), or a function `module:function` of (N, H, W, C) uint8 images
    returning (N, d) features (a world's own classifier, say)."""

    spec: str = INCEPTION

    def check(self) -> None:
        """Fail before any image is generated."""
        if self.spec != INCEPTION:
            load_function(self.spec, "--features")
            return
        from wadi.evaluation.metrics import weights_path

        try:
            weights_path()
        except ModuleNotFoundError as e:
            raise ValueError(str(e)) from None

    @property
    def tag(self) -> str:
        """Names cache files: features of different extractors never mix."""
        return INCEPTION if self.spec == INCEPTION else hashlib.sha256(self.spec.encode()).hexdigest()[:12]

    def __call__(self, paths: list[Path], batch_size: int, device: str, progress: bool) -> np.ndarray:
        if self.spec == INCEPTION:
            from wadi.evaluation.metrics import extract_features

            return extract_features(paths, batch_size, device, progress=progress)
        return np.asarray(load_function(self.spec, "--features")(read_images(paths)), dtype=np.float64)


@dataclass
class Reference:
    """Reference images for FID and precision/recall: a folder (its features cached in
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
            raise ValueError(f"precision/recall needs a folder of reference images, not the stats file {self.path}")
        files = list_images(self.path)
        key = f"{extractor.spec}\n{folder_key(self.path, files)}"
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
    metrics: list[str]
    reference: Reference | None = None
    clip_model: str | None = None
    pr_k: int = 3
    alignment: str | None = None  # "module:function"
    batch_size: int = 50
    features: Extractor = field(default_factory=Extractor)

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        if {"fid", "pr"} & set(self.metrics) and self.reference is None:
            raise ValueError("FID and precision/recall need reference images: pass --ref FOLDER")
        if "alignment" in self.metrics and not self.alignment:
            raise ValueError("the alignment metric needs --alignment MODULE:FUNCTION")
        if "alignment" in self.metrics:
            load_function(self.alignment, "--alignment")  # fail before any image is generated
        if "clip" in self.metrics and not self.clip_model:
            raise ValueError("the CLIP score needs --clip-model")
        if "clip" in self.metrics:
            from transformers import AutoConfig

            try:  # its config only: a model that cannot load fails before any image is made
                AutoConfig.from_pretrained(self.clip_model)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load the CLIP model {self.clip_model!r} ({describe(e)})") from None
        if {"fid", "pr"} & set(self.metrics):
            self.features.check()
            self.reference.check("pr" in self.metrics)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reference"] = None if self.reference is None else str(self.reference.path)
        d["features"] = self.features.spec
        return d


def world_metric_settings(world: WorldEval, cache_dir: Path, metrics: str | None = None,
                          reference: Path | None = None, features: str | None = None, alignment: str | None = None,
                          clip_model: str | None = None, pr_k: int = 3, batch_size: int = 50) -> MetricSettings:
    """A world's metrics, each setting given here replacing the world's own."""
    return metric_settings(metrics or world.metrics, reference or world.reference, cache_dir, clip_model, pr_k,
                           alignment or world.alignment, batch_size, features or world.features)


def metric_settings(names: str, reference: Path | None, cache_dir: Path, clip_model: str | None = None,
                    pr_k: int = 3, alignment: str | None = None, batch_size: int = 50,
                    features: str = INCEPTION) -> MetricSettings:
    """MetricSettings from option values: comma-separated metric names, a reference that must exist."""
    if reference is not None and not Path(reference).exists():
        raise FileNotFoundError(f"--ref {reference} does not exist")
    return MetricSettings([m.strip() for m in names.split(",") if m.strip()],
                          Reference(Path(reference), cache_dir) if reference is not None else None, clip_model, pr_k,
                          alignment, batch_size, Extractor(features))


@dataclass
class Scorer:
    """The metric models, each loaded once and used for every evaluated model."""

    settings: MetricSettings
    device: str
    progress: bool = True
    _cache: dict = field(default_factory=dict)

    def _get(self, what: str, make):
        if what not in self._cache:
            self._cache[what] = make()
        return self._cache[what]

    def score(self, paths: list[Path], prompts: list[str]) -> dict:
        s, out = self.settings, {}
        if {"fid", "pr"} & set(s.metrics):
            from wadi.evaluation.metrics import frechet_distance, gaussian_stats, precision_recall

            feats = s.features(paths, s.batch_size, self.device, self.progress)
            if "pr" in s.metrics:  # first: extracting the reference features caches its stats too
                real = self._get("features", lambda: s.reference.features(s.features, self.device, self.progress))
                out.update(precision_recall(real, feats, k=s.pr_k, device=self.device)._asdict())
            if "fid" in s.metrics:
                ref_mu, ref_sigma = self._get("stats", lambda: s.reference.stats(s.features, self.device,
                                                                                  self.progress))
                out["fid"] = frechet_distance(*gaussian_stats(feats), ref_mu, ref_sigma)
        if "clip" in s.metrics:
            from wadi.evaluation.metrics import ClipScorer

            scorer = self._get("clip", lambda: ClipScorer(s.clip_model, self.device))
            out["clip_score"] = float(scorer.scores(paths, prompts, progress=self.progress).mean())
        if "alignment" in s.metrics:
            fn = self._get("alignment", lambda: load_function(s.alignment, "--alignment"))
            out["alignment"] = float(fn(read_images(paths), prompts))
        return out


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
    scorer = Scorer(metrics, device, progress)
    n = len(prompts.prompts)
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
