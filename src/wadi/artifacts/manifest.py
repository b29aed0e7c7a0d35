"""`wadi.json`, the manifest every exported folder carries: the base model's BackboneSpec
(with the student's steps, resolution and text length), the noise process it was distilled
under, where the student came from, how to run it, and for a stock pipeline its class and
the exact call that reproduces `wadi sample`. Reading it tells an export from any other folder."""

from __future__ import annotations

import json
from pathlib import Path

from wadi.errors import brief, describe
from wadi.files.atomic import read_json_object
from wadi.models.backbones import BackboneSpec

MANIFEST = "wadi.json"
FORMAT = "wadi-export/2"


def is_export(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def write_manifest(folder: Path, base: BackboneSpec, source: str, usage: str, process: dict | None = None,
                   pipeline: str | None = None, call: dict | None = None) -> Path:
    """`process`: the noise process the student was distilled under (wadi.engine.provenance);
    `pipeline` and `call`: the stock pipeline class and the arguments of its call (besides
    the prompt and a generator) that sample the student as `wadi sample` does."""
    path = folder / MANIFEST
    info = {"format": FORMAT, "base": base.to_dict(), "source": source, "usage": usage, "process": process}
    if pipeline:
        info.update(pipeline=pipeline, call=call)
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


def read_manifest(folder: Path) -> dict:
    """The manifest of an exported folder; `base` as a BackboneSpec, checked as settings are."""
    from wadi.engine.config import recorded_spec

    info = read_json_object(folder / MANIFEST, "; export the student again")
    if info.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: unknown export format {brief(info.get('format'))}; "
                         "export the student again")
    try:
        return {**info, "base": recorded_spec(info.get("base"), "base")}
    except ValueError as e:
        raise ValueError(f"{folder / MANIFEST}: {describe(e)}; export the student again") from None
