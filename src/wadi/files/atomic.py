"""File-system habits every tool shares: refuse to write into another run's output unless
told to, and make files appear whole (write to a temporary name, then rename)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wadi.errors import CorruptFile, OutputExists


def check_out(out: str | Path, force: bool, option: str = "--out") -> Path:
    """A folder to write into: new, empty, or non-empty only with `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{option} {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExists(f"{option} {out} exists and is not empty; pass {{option}} to write into it", "force")
    return out


def check_new_file(path: str | Path, force: bool, option: str = "--out") -> Path:
    """A file to write: new, or replaced only with `force`."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{option} {path} is a folder, not a file")
    if path.exists() and not force:
        raise OutputExists(f"{option} {path} exists; pass {{option}} to replace it", "force")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write a file or folder to; when the block ends
    without an error it replaces `path` (a folder whole), otherwise it is removed."""
    path = Path(os.path.abspath(path))  # `.` and `..` named, links not followed
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)  # a killed writer's: whoever writes `path` now owns it (wadi.files.locks)
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a completed folder into place, replacing an older one of the same name."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


class DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict:
    """An object's pairs as a dict; a key given twice is refused (json keeps the last silently)."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise DuplicateKey(f"duplicate key {key!r}")
        data[key] = value
    return data


def loads_json(text: str):
    """json.loads that refuses an object with a key given twice (DuplicateKey, a ValueError)."""
    return json.loads(text, object_pairs_hook=_unique)


def read_json_object(path: str | Path, what: str = "") -> dict:
    """A JSON file that must hold an object: its dict, or one ValueError naming the file."""
    path = Path(path)
    try:
        data = loads_json(path.read_text(encoding="utf-8"))
    except DuplicateKey as e:
        raise CorruptFile(f"{path} is not readable JSON ({e}){what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptFile(f"{path} is not readable JSON ({e.__class__.__name__}){what}") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{path} must hold a JSON object, not {type(data).__name__}{what}")
    return data
