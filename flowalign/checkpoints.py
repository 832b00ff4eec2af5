"""Checkpoints: one crash-safe way to write them, one safe way to read them, one way to find them.

- ``atomic_write_dir(target, write)``: ``write(tmp)`` fills a temporary sibling folder; every file
  in it and the folder itself are fsynced, then it is renamed to ``target``. An exception (or a
  crash) inside ``write`` leaves the previous ``target`` untouched and the temporary folder removed.
- ``write_pointer(root, name)``: atomically point ``root/latest`` at the complete folder ``root/name``
  (temporary file, fsync, ``os.replace``); call it after the folder is written, never before.
- ``resolve_checkpoint(path)`` / ``latest_checkpoint(output_dir)``: a checkpoint folder from a
  folder, a ``latest`` pointer file or a run's ``output_dir``.
- ``save_state(path, state)`` / ``load_state(path)``: a state dict of tensors and plain Python values
  (numbers, strings, lists, tuples, dicts, None). Loading never unpickles arbitrary objects
  (``torch.load(..., weights_only=True)``): a file that needs it is refused with a ``ValueError``,
  so a checkpoint from anywhere else cannot execute code when a run resumes from it.

The layout a training run writes::

    output_dir/checkpoints/iter-000004/   # one complete folder per checkpoint (with trainer_state.pt)
    output_dir/checkpoints/iter-000008/
    output_dir/checkpoints/latest         # a text file: "iter-000008", written last

Example::

    from pathlib import Path
    from flowalign.checkpoints import atomic_write_dir, latest_checkpoint, load_state, save_state, write_pointer

    root = Path("runs/demo/checkpoints")
    atomic_write_dir(root / "iter-000004", lambda tmp: save_state(tmp / "trainer_state.pt", {"iteration": 4}))
    write_pointer(root, "iter-000004")
    folder = latest_checkpoint("runs/demo")          # Path("runs/demo/checkpoints/iter-000004")
    load_state(folder / "trainer_state.pt")          # {"iteration": 4}
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_dir", "latest_checkpoint", "load_state", "resolve_checkpoint", "save_state", "strict_json",
           "write_json", "write_pointer"]


def _fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (creations, renames). Windows cannot open a folder for fsync; skip there."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, deepest first."""
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def atomic_write_dir(target: Path | str, write: Callable[[Path], None]) -> Path:
    """Write the folder ``target`` through ``write(tmp)``, so that no reader ever sees half of it.

    ``write`` receives an empty temporary folder beside ``target`` (same file system) and fills it.
    Then every file and folder in it is fsynced and it is renamed to ``target``. If ``target``
    already exists it stays intact until that rename: it is first renamed to ``<target>.old``,
    the new folder takes its name, and only then is the old one deleted. (A crash between those
    two renames leaves the old folder at ``<target>.old``; the next call puts it back first.)
    If ``write`` raises, the temporary folder is removed, ``target`` is untouched and the
    exception propagates; a temporary folder left by a killed process is removed by the next call
    for the same ``target``. Returns ``target`` as a ``Path``.

    Example::

        atomic_write_dir("runs/x/checkpoints/iter-000004", lambda tmp: (tmp / "a.txt").write_text("a"))
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"atomic_write_dir writes folders; {target} is a file. Remove it or choose another target.")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(target.name + ".old")
    if old.is_dir() and not target.exists():  # a crash between the two renames of an earlier call
        os.replace(old, target)
    for stale in parent.glob(f".{glob.escape(target.name)}.tmp-*"):  # left by a process killed inside `write`
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(parent)
    return target


def _write_file_atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """``write(f)`` into a temporary sibling of ``path``, fsync it, ``os.replace`` it onto ``path``, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN / inf float replaced by None, recursively: strict JSON, which ``json`` (and other
    languages' parsers) read back. Example: ``strict_json({"se": float("nan"), "x": [1.0]}) == {"se": None, "x": [1.0]}``.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as strict JSON (:func:`strict_json`) to ``path`` atomically: a crash leaves the old file or the
    new one, never half of one. Example: ``write_json("runs/x/result.json", {"gain": 0.1})``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(strict_json(data), indent=1)
    _write_file_atomic(path, lambda f: f.write(text), "w")


def write_pointer(root: Path | str, name: str, pointer: str = "latest") -> None:
    """Atomically write ``root/pointer`` (a text file) containing ``name``, a complete folder in ``root``.

    Call it after ``atomic_write_dir(root / name, ...)`` returned: a reader that follows the
    pointer then always finds a complete checkpoint, and a crash before this call leaves the
    pointer on the previous one.

    Example::

        write_pointer("runs/x/checkpoints", "iter-000004")   # runs/x/checkpoints/latest == "iter-000004"
    """
    root = Path(root)
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"write_pointer: name must be a folder name inside {root} (like 'iter-000004'), got {name!r}.")
    if not (root / name).is_dir():
        raise FileNotFoundError(f"write_pointer: {root / name} is not a folder; write the checkpoint folder "
                                f"(atomic_write_dir) before pointing {pointer!r} at it.")
    _write_file_atomic(root / pointer, lambda f: f.write(name), "w")


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A training checkpoint folder from what a user may pass: the folder itself (``.../iter-000072``), the
    ``.../checkpoints/latest`` pointer file, or a run's ``output_dir`` (its latest checkpoint). Anything else
    (another folder, a file, a hub id) comes back unchanged.

    Example: ``resolve_checkpoint("runs/acflow_shapes")`` -> ``"runs/acflow_shapes/checkpoints/iter-000072"``.
    """
    p = Path(path)
    pointer = p / "checkpoints" / "latest" if p.is_dir() else p
    if pointer.is_file() and pointer.name == "latest":
        folder = pointer.parent / pointer.read_text().strip()
        if not folder.is_dir():
            raise FileNotFoundError(f"{pointer} names {folder.name!r}, which is not a folder beside it; "
                                    f"pass a checkpoint folder (iter-N) instead.")
        return str(folder)
    return str(path)


def latest_checkpoint(output_dir: str | os.PathLike, marker: str = "trainer_state.pt") -> Path | None:
    """The folder ``output_dir/checkpoints/latest`` names if it holds ``marker``, else None.

    None also when there is no pointer or it names a folder that does not exist (a run then starts fresh).

    Example: ``latest_checkpoint("runs/acflow_shapes")`` -> ``Path("runs/acflow_shapes/checkpoints/iter-000072")``.
    """
    try:  # with no pointer, resolve_checkpoint returns output_dir itself, which holds no marker
        folder = Path(resolve_checkpoint(output_dir))
    except FileNotFoundError:
        return None
    return folder if (folder / marker).exists() else None


def save_state(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state, path)``, atomically (temporary sibling, fsync, ``os.replace``).

    ``state`` holds tensors and plain Python values only, so that ``load_state`` can read it back
    without unpickling arbitrary objects.

    Example: ``save_state("runs/x/state.pt", {"step": 3, "weights": model.state_dict()})``.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise TypeError(f"save_state: state must be a dict, got {type(state).__name__} (for {path}).")
    _write_file_atomic(path, lambda f: torch.save(state, f), "wb")


def load_state(path: str | os.PathLike) -> dict:
    """Read a ``save_state`` file on the CPU with ``torch.load(..., weights_only=True)``.

    A file whose unpickling would construct arbitrary Python objects (run code) is refused with
    a ``ValueError`` naming it; nothing in it is executed.

    Example: ``load_state("runs/x/checkpoints/iter-000004/trainer_state.pt")["iteration"]`` -> ``4``.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise ValueError(
            f"{path} is not a flowalign state file (or was written by an untrusted source): loading it would "
            f"unpickle arbitrary Python objects, which can execute code, so flowalign refuses it"
            f"{' (' + detail + ')' if detail else ''}. Use a checkpoint written by flowalign itself."
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; it is not a flowalign state file.")
    return state
