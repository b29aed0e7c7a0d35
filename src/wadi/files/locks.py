"""One command at a time per output: a run folder, an export, a sample or eval folder.

A command holds `OUTPUT.lock` (beside the output: an export replaces its folder whole)
for its whole life; a second command on the same output refuses at once, naming the
holder (process, host, command) that the lock file records. The lock is the operating
system's (flock through filelock), so a killed holder's lock is free again: a stale
`.lock` file never blocks.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

RANK0 = os.environ.get("RANK", "0") == "0"  # under accelerate launch one process per command holds the lock


class InUse(OSError):
    """The output is held by another running command."""


def lock_path(output: str | Path) -> Path:
    output = Path(os.path.abspath(output))  # `.` and `..` named, links not followed
    return output.with_name(output.name + ".lock")


def _holder() -> bytes:
    command = " ".join(["wadi", *sys.argv[1:3]]) if sys.argv else "wadi"
    return f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode()


def _record_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder(), 0)


def acquire(output: str | Path, option: str = "--out") -> FileLock:
    """Take the output's lock or raise InUse naming its holder."""
    path = lock_path(output)
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
    lock = FileLock(path, timeout=0, on_acquired=_record_holder)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text(errors="replace").strip() or "a process"
        except OSError:
            holder = "a process"
        raise InUse(f"{option} {output} is in use by another wadi command ({holder}); wait for it to finish "
                    "or choose another output") from None
    return lock


def release(lock: FileLock) -> None:
    """Remove the lock file while still holding it (a waiter that opened it sees it gone
    and starts over on a new one), then let go."""
    try:
        Path(lock.lock_file).unlink(missing_ok=True)
    finally:
        lock.release()


@contextmanager
def hold(output: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold the output's lock for the block (only rank 0 under accelerate launch)."""
    if not RANK0:
        yield
        return
    lock = acquire(output, option)
    try:
        yield
    finally:
        release(lock)
