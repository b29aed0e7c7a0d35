"""The Hugging Face hub: released students as `hub:OWNER/REPO/PATH` references (downloaded
to huggingface_hub's cache, offline mode honoured), and exports pushed with their card."""

from __future__ import annotations

from pathlib import Path

PREFIX = "hub:"


def is_hub_reference(source: str | Path) -> bool:
    return str(source).startswith(PREFIX)


def resolve(source: str | Path) -> str:
    """A local path for `source`: `hub:OWNER/REPO/PATH[@REVISION]` is fetched (or found in the
    cache); anything else is returned as it is."""
    if not is_hub_reference(source):
        return str(source)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    ref, _, revision = str(source)[len(PREFIX):].partition("@")
    parts = ref.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{source}: a hub reference reads hub:OWNER/REPO/PATH[@REVISION]")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return hf_hub_download(repo, filename, revision=revision or None)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise FileNotFoundError(f"{source}: not in the local hub cache and the hub cannot be reached ({e})") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{source}: the hub refused it ({str(e).splitlines()[0]})") from None


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder (card included) to a model repository, creating it if needed;
    returns the repository's address."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload a one-step WaDi student (wadi export)")
    return str(url)
