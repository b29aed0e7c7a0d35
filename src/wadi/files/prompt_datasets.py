"""Prompts from a Hugging Face dataset, as the diffusers training examples take captions:
a hub id, a folder written by `datasets`' save_to_disk (or of data files), or one local
parquet / JSON / CSV / Arrow file; one split (`data.split`) and one text column
(`data.column`, or the first of prompt, caption, text). Loading is `datasets`' own."""

from __future__ import annotations

import re
from pathlib import Path

from wadi.errors import describe, install_hint

DATA_FILES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
PROMPT_COLUMNS = ("prompt", "caption", "text")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_PROMPT_FILES = (".txt", ".json", ".jsonl")  # our own prompt files: a missing one is a missing file, not a hub id


def is_dataset(source: str, fmt: str = "auto") -> bool:
    """Whether `data.prompts` names a dataset rather than a prompt file: asked for with
    data.format=dataset, or a folder, a data file of a dataset format, or a hub id."""
    if fmt == "dataset":
        return True
    if fmt != "auto":
        return False
    p = Path(source).expanduser()
    if p.exists():
        return p.is_dir() or p.suffix in (".parquet", ".arrow", ".csv")
    return bool(_HUB_ID.fullmatch(source)) and p.suffix not in _PROMPT_FILES


def _saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def dataset_prompts(source: str, split: str = "train", column: str | None = None) -> list[str]:
    """The strings of one column of one split of the dataset `source`."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data.prompts={source} is a Hugging Face dataset, which needs the datasets package: "
                         f"{install_hint('datasets')}") from None
    p = Path(source).expanduser()
    try:
        if p.is_dir() and _saved_to_disk(p):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"no split {split!r} (data.split); its splits: {', '.join(ds)}")
                ds = ds[split]
        elif p.is_file():
            if p.suffix not in DATA_FILES:
                raise ValueError(f"not a data file datasets reads ({', '.join(DATA_FILES)})")
            if split != "train":
                raise ValueError(f"one data file is one split: data.split={split} is for hub datasets and folders")
            ds = datasets.load_dataset(DATA_FILES[p.suffix], data_files=str(p), split="train")
        else:  # a hub id, or a folder of data files
            ds = datasets.load_dataset(source, split=split)
    except (ValueError, OSError, ConnectionError, datasets.exceptions.DatasetsError) as e:
        raise ValueError(f"cannot read the dataset {source}: {describe(e)}") from None
    names = ds.column_names
    if column is None:
        column = next((c for c in PROMPT_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(f"dataset {source} has no {', '.join(PROMPT_COLUMNS)} column; its columns: "
                             f"{', '.join(names)}: choose one with data.column")
    elif column not in names:
        raise ValueError(f"dataset {source} has no column {column!r} (data.column); its columns: {', '.join(names)}")
    prompts = ds[column]
    odd = next((i for i, v in enumerate(prompts) if not isinstance(v, str)), None)
    if odd is not None:
        raise ValueError(f"dataset {source}: row {odd} of column {column!r} is {type(prompts[odd]).__name__}, not "
                         "text")
    return list(prompts)
