"""How problems read: one line for a user."""

from __future__ import annotations

import os
import re
import reprlib

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


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxset = 2, 4, 4, 4, 4
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def brief(value) -> str:
    """A value as a message shows it: a few elements, a few levels (YAML anchors can make a
    small file a list of billions, which a full repr would spell out)."""
    return _BRIEF.repr(value)


class CorruptFile(ValueError):
    """A file that exists but cannot be read back (truncated, garbled, another format)."""


class NeedsOption(ValueError):
    """A refusal that an option lifts. `message` says `{option}` where the option goes: the
    Python API names the argument (`allow_other_base=True`), the command line its flag
    (`--allow-other-base`)."""

    def __init__(self, message: str, argument: str):
        self.message, self.argument = message, argument
        super().__init__(message.format(option=f"{argument}=True"))

    @property
    def for_command_line(self) -> str:
        return self.message.format(option=f"--{self.argument.replace('_', '-')}")


class OutputExists(NeedsOption, FileExistsError):
    """An output that exists, refused without `force`."""


def install_hint(extra: str) -> str:
    """How to install one of wadi's extras, released or from a clone."""
    return f'pip install "wadi-distill[{extra}]" (from a clone of wadi: pip install -e ".[{extra}]")'
