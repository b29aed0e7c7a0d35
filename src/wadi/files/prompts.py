"""Prompt files: plain text, JSON lines (JourneyDB annotations included), COCO captions, or
a Hugging Face dataset (wadi.files.prompt_datasets); and the prompt sets of evaluation (the
zero-shot COCO protocols, any prompt file).

WaDi trains on text alone. Every reader returns a list of non-empty prompts, and every
problem with the file is a one-line error raised before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wadi.files.atomic import DuplicateKey, loads_json

FORMATS = ("auto", "txt", "jsonl", "coco", "dataset")
# Text encoders read 77 (CLIP) to 300 (T5) tokens and truncate the rest; a longer prompt is
# a mistake (a file pasted as one), and would be copied into every PNG's metadata.
MAX_PROMPT_CHARS = 4000
PROTOCOLS = {"coco2014-30k": 30000, "coco2017-5k": 5000}  # zero-shot COCO: images (one caption each)
_JSONL_KEYS = ("prompt", "caption", "text")


def _jsonl_prompt(obj: dict, where: str) -> str | None:
    task2 = obj.get("Task2")
    if isinstance(task2, dict):  # JourneyDB: {"Task2": {"Caption": "..."}}
        for key in ("Caption", "Caption:", "caption"):
            if key in task2:
                if not isinstance(task2[key], str):
                    raise ValueError(f"{where}: Task2.{key} must be a string, got {type(task2[key]).__name__}")
                return task2[key]
    for key in _JSONL_KEYS:
        if key in obj:
            if not isinstance(obj[key], str):
                raise ValueError(f"{where}: {key} must be a string, got {type(obj[key]).__name__}")
            return obj[key]
    raise ValueError(f"{where}: no prompt field; expected one of {', '.join(_JSONL_KEYS)} or JourneyDB's Task2.Caption")


def _read_jsonl(text: str, path: Path) -> list[str]:
    prompts = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = loads_json(line)
        except DuplicateKey as e:
            raise ValueError(f"{path}:{i} has a {e}: which one is the prompt?") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i} is not a JSON object")
        prompts.append(_jsonl_prompt(obj, f"{path}:{i}"))
    return prompts


def _coco_data(text: str, path: Path) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO caption file (no 'annotations' list)")
    return data


def _read_coco(text: str, path: Path) -> list[str]:
    captions = []
    for i, a in enumerate(_coco_data(text, path)["annotations"]):
        if not (isinstance(a, dict) and isinstance(a.get("caption"), str)):
            raise ValueError(f"{path}: annotation {i} has no caption string; is it a COCO caption file?")
        captions.append(a["caption"])
    return captions


def check_prompts(prompts: list[str], where: str) -> list[str]:
    """Refuse a prompt longer than MAX_PROMPT_CHARS, or one that is not text (bytes that
    were not UTF-8 on the command line), naming it by its number."""
    for i, p in enumerate(prompts, 1):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: prompt {i} is not valid UTF-8 text") from None
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"{where}: prompt {i} is {len(p)} characters long; at most {MAX_PROMPT_CHARS} "
                             "(text encoders read a few hundred tokens)")
    return prompts


def _detect(path: Path, text: str) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        return "coco"
    if path.suffix == ".txt":
        return "txt"
    first = text.lstrip()[:1]
    return "coco" if first == "{" and '"annotations"' in text[:10000] else ("jsonl" if first == "{" else "txt")


def read_prompts(path: str | Path, fmt: str = "auto", dedupe: bool = False, split: str = "train",
                 column: str | None = None) -> list[str]:
    """Prompts of a file, in file order (sorted unique when `dedupe`, as the authors do), or
    of a Hugging Face dataset's `split` and `column` (wadi.files.prompt_datasets)."""
    from wadi.files.prompt_datasets import dataset_prompts, is_dataset

    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if is_dataset(str(path), fmt):
        return _cleaned(dataset_prompts(str(path), split, column), f"dataset {path}", dedupe)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompt file {path} is unreadable ({e.__class__.__name__}: {e})") from None
    fmt = _detect(path, text) if fmt == "auto" else fmt
    if fmt == "txt":
        prompts = text.splitlines()
    elif fmt == "jsonl":
        prompts = _read_jsonl(text, path)
    else:
        prompts = _read_coco(text, path)
    return _cleaned(prompts, f"prompt file {path}", dedupe)


def _cleaned(prompts: list[str], where: str, dedupe: bool) -> list[str]:
    """Stripped, blank ones left out, checked (check_prompts), sorted unique when `dedupe`."""
    prompts = check_prompts([p.strip() for p in prompts if p.strip()], where)
    if dedupe:
        prompts = sorted(set(prompts))
    if not prompts:
        raise ValueError(f"{where} holds no prompts")
    return prompts


# --- evaluation prompt sets ---------------------------------------------------------

@dataclass
class PromptSet:
    prompts: list[str]
    source: str
    image_files: list[str] | None = None  # the COCO image each caption belongs to

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]


def coco_prompts(path: str | Path, n: int, seed: int = 0) -> PromptSet:
    """n captions of n distinct COCO images: images drawn without replacement and one of
    each image's captions drawn, both with a generator seeded by `seed`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the COCO caption file {path} ({e})") from None
    data = _coco_data(text, path)
    captions: dict[int, list[tuple[int, str]]] = {}
    for i, a in enumerate(data["annotations"]):
        if not (isinstance(a, dict) and isinstance(a.get("caption"), str)
                and isinstance(a.get("image_id"), (int, str)) and isinstance(a.get("id"), (int, str))):
            raise ValueError(f"{path}: annotation {i} lacks an id, image_id or caption; is it a COCO caption file?")
        captions.setdefault(a["image_id"], []).append((a["id"], a["caption"].strip()))
    if n > len(captions):
        raise ValueError(f"{path} has captions for {len(captions)} images, fewer than the {n} asked for")
    files = {im["id"]: im.get("file_name", str(im["id"])) for im in data.get("images", [])
             if isinstance(im, dict) and "id" in im}
    rng = np.random.default_rng(seed)
    images = sorted(captions)
    chosen = [images[i] for i in sorted(rng.choice(len(images), n, replace=False))]
    prompts = []
    for image_id in chosen:
        caps = sorted(captions[image_id])  # by annotation id: independent of the file's order
        prompts.append(caps[rng.integers(len(caps))][1])
    check_prompts(prompts, str(path))
    return PromptSet(prompts, f"{path} ({n} images, seed {seed})", [files.get(i, str(i)) for i in chosen])


def file_prompts(path: str | Path, fmt: str = "auto", n: int | None = None) -> PromptSet:
    """A prompt file's prompts in file order, the first n of them when n is given."""
    prompts = read_prompts(path, fmt)
    if n is not None:
        if n > len(prompts):
            raise ValueError(f"{path} holds {len(prompts)} prompts, fewer than the {n} asked for")
        prompts = prompts[:n]
    return PromptSet(prompts, str(path))
