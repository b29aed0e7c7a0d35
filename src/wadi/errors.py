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
