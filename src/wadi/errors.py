"""How problems read: one line for a user."""

from __future__ import annotations


def describe(e: BaseException) -> str:
    """The first line of an error's message; for an operating-system error, what failed where."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class CorruptFile(ValueError):
    """A file that exists but cannot be read back (truncated, garbled, another format)."""
