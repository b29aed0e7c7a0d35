"""How problems read: one line for a user."""

from __future__ import annotations

import os
import re
import reprlib

# safetensors reports a failed write as its own error: "Error while serializing: I/O error:
# No space left on device (os error 28)", without the file.
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def describe(e: BaseException) -> str:
    """The first line of an error's message; for an operating-system error, what failed where;
    for a failed hub download, why it failed."""
    if hub := hub_problem(e):
        return hub
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip()
    if type(e).__name__ == "SafetensorError" and (m := _OS_ERROR.search(text)):
        return f"cannot write a safetensors file: {os.strerror(int(m.group(1)))}"
    return text.splitlines()[0] if text else type(e).__name__


def hub_problem(e: BaseException) -> str | None:
    """Why a hub download failed, when one did: diffusers and transformers re-raise
    huggingface_hub's errors as an OSError that names the file they looked for (an offline
    machine reads "no file named scheduler_config.json"), so the cause is looked for in the
    chain of errors."""
    if not isinstance(e, OSError):
        return None
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, hub.LocalEntryNotFoundError):
            why = ("hub downloads are switched off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
                   else "the hub cannot be reached (offline, or a proxy or firewall in the way)")
            return (f"{why} and the model is not in the local cache ({constants.HF_HUB_CACHE}): download it "
                    "while online (hf download REPO_ID) or give a local folder")
        if isinstance(e, hub.GatedRepoError):
            return "the repository is gated on the hub: accept its terms on its page and log in (hf auth login)"
        if isinstance(e, hub.RevisionNotFoundError):
            return "the repository on the hub has no such revision (model.revision)"
        if isinstance(e, hub.RepositoryNotFoundError):
            return "no such repository on the hub (a private one needs a login: hf auth login)"
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # `from None`: already told
    return None


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
