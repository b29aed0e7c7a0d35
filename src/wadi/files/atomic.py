"""File-system habits every tool shares: refuse to write into another run's output unless
told to, and make files appear whole (write to a temporary name, then rename).

`--force` means one thing in every command (FORCE_HELP): write into an existing output,
what the command writes replacing the files and folders of the same names and nothing
else there removed; and never into a run folder, a runs root, a folder inside a run, or
over what the command reads."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wadi.errors import CorruptFile, OutputExists
from wadi.files.run_folder import RunFolder

FORCE_HELP = ("write into an existing non-empty --out: what this command writes replaces the files and folders "
              "of the same names, nothing else there is removed (refused for a run folder, a runs root or the "
              "command's own input)")


def check_out(out: str | Path, force: bool, option: str = "--out", inputs=()) -> Path:
    """A folder to write into: new, empty, or non-empty only with `force`, and then never
    a run, a runs root or one of `inputs` (what the command reads: paths or hub ids)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{option} {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputExists(f"{option} {out} exists and is not empty; pass {{option}} to write into it", "force")
        check_forced(out, option, inputs)
    return out


def check_new_file(path: str | Path, force: bool, option: str = "--out", inputs=()) -> Path:
    """A file to write: new, or replaced only with `force` (and then not a run's file nor an input)."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{option} {path} is a folder, not a file")
    if path.exists():
        if not force:
            raise OutputExists(f"{option} {path} exists; pass {{option}} to replace it", "force")
        check_forced(path, option, inputs)
    return path


def check_forced(out: str | Path, option: str = "--out", inputs=()) -> None:
    """Refuse what `--force` never writes into or over: a run folder, a folder or file
    inside one, a folder holding runs (a runs root), and the command's own inputs (`out`
    being one, inside one, or holding one)."""
    real = Path(out).resolve()
    runs = [p for p in (real, *real.parents) if RunFolder.is_run(p)]
    if not runs and real.is_dir():
        runs = [p for p in real.iterdir() if RunFolder.is_run(p)]
    if runs:
        where = "is" if runs[0] == real else "is inside" if runs[0] in real.parents else "holds"
        raise FileExistsError(f"{option} {out} {where} the run folder {runs[0]}; --force never writes into a run "
                              f"or a runs root: give another {option}")
    for source in inputs:
        if not source or not Path(source).expanduser().exists():
            continue  # a hub id, or nothing given
        src = Path(source).expanduser().resolve()
        if src == real or src in real.parents or real in src.parents:
            raise FileExistsError(f"{option} {out} overlaps the input {source}; --force never writes over what the "
                                  f"command reads: give another {option}")


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


@contextmanager
def write_into(folder: str | Path, last: str | None = None) -> Iterator[Path]:
    """A temporary folder beside `folder` to write to; when the block ends without an
    error, a new or empty `folder` is replaced by it whole, an existing one receives its
    entries, each replacing the file or folder of its name, and nothing else there is
    touched. `last` (a manifest) goes in last and leaves first, so that a kill between
    the moves leaves no folder that claims to be complete."""
    path = Path(os.path.abspath(folder))  # `.` and `..` named, links not followed
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)  # a killed writer's (wadi.files.locks)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if not (path.is_dir() and any(path.iterdir())):
            replace_dir(tmp, path)
            return
        if last is not None:
            _remove(path / last)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == last):
            _remove(path / entry.name)
            os.replace(entry, path / entry.name)
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
