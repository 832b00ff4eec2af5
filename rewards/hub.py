"""Where reward checkpoints come from: a local path, or a Hugging Face Hub id (downloaded or cached).

Every model-based reward loads through :func:`resolve_file` (single-file checkpoints such as
``HPS_v2.1_compressed.pt``) or inside :func:`hub_errors` (``from_pretrained`` of transformers /
open_clip). A hub id that cannot be fetched (no network, ``HF_HUB_OFFLINE=1``, not in the cache)
becomes one :class:`CheckpointNotFoundError` that says how to pass a local path instead.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class CheckpointNotFoundError(FileNotFoundError):
    """A reward checkpoint is neither a local path nor reachable on the Hugging Face Hub."""


def is_local(source: str | os.PathLike) -> bool:
    """True when ``source`` names an existing file or folder."""
    return Path(source).expanduser().exists()


def _offline_message(source: str, what: str, how: str, err: BaseException) -> str:
    cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return (
        f"{what}: '{source}' is not a local path and could not be fetched from the Hugging Face Hub "
        f"(no network, HF_HUB_OFFLINE=1, or not in the local cache; {cause}). "
        f"Download it once where there is network, e.g. `hf download {source} --local-dir DIR`, "
        f"then pass the local path: {how}."
    )


@contextlib.contextmanager
def hub_errors(source: str, what: str, how: str, remote: bool | None = None) -> Iterator[None]:
    """Turn a failed hub download of ``source`` into a :class:`CheckpointNotFoundError`.

    ``remote`` says whether ``source`` is fetched from the hub; by default, when it is not a local
    path and looks like a repo id. Errors about local files are left alone.
    """
    if remote is None:
        remote = not is_local(source) and _looks_like_repo_id(source)
    try:
        yield
    except CheckpointNotFoundError:
        raise
    except Exception as err:  # transformers / open_clip / huggingface_hub each raise their own types
        if not remote:
            raise
        raise CheckpointNotFoundError(_offline_message(source, what, how, err)) from err


def _looks_like_repo_id(source: str) -> bool:
    source = str(source)
    for prefix in ("hf-hub:",):
        source = source.removeprefix(prefix)
    return bool(_REPO_ID.match(source))


def resolve_file(source: str | os.PathLike, filename: str, what: str, how: str) -> str:
    """Local path of ``filename`` from ``source``: a file, a folder holding ``filename``, or a hub repo id.

    Example::

        path = resolve_file("xswu/HPSv2", "HPS_v2.1_compressed.pt", "HPSv2", "HPSv2.from_pretrained(checkpoint=PATH)")
    """
    path = Path(source).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        candidate = path / filename
        if not candidate.is_file():
            present = sorted(p.name for p in path.iterdir())[:20]
            raise FileNotFoundError(f"{what}: folder {path} has no {filename}; it holds {present}.")
        return str(candidate)
    if not _looks_like_repo_id(str(source)):
        raise FileNotFoundError(f"{what}: no file or folder at {path}, and {str(source)!r} is not a hub repo id.")
    from huggingface_hub import hf_hub_download  # only for hub downloads: `import flowalign.rewards` stays light

    try:
        return hf_hub_download(str(source), filename)
    except Exception as err:  # offline, not cached, no such repo or file
        raise CheckpointNotFoundError(_offline_message(str(source), what, how, err)) from err
