"""How problems read: one line for a user."""

from __future__ import annotations

import os
import re

# safetensors reports a failed write as its own error: "Error while serializing: I/O error:
# No space left on device (os error 28)", without the file.
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def describe(e: BaseException) -> str:
    """The first line of an error's message; for an operating-system error, what failed where."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip()
    if type(e).__name__ == "SafetensorError" and (m := _OS_ERROR.search(text)):
        return f"cannot write a safetensors file: {os.strerror(int(m.group(1)))}"
    return text.splitlines()[0] if text else type(e).__name__


class CorruptFile(ValueError):
    """A file that exists but cannot be read back (truncated, garbled, another format)."""
