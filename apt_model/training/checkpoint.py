"""Atomic training checkpoints: a crash or a full disk never leaves one that ``--resume`` trusts.

Layout under a run's checkpoint folder::

    checkpoints/
        ckpt-00000300/          one complete checkpoint
            model.safetensors   weights (plain tensors, loadable without this package)
            trainer.pt          optimizer, step, RNG states, configs (torch.save)
            meta.json           written last
        latest                  name of the newest checkpoint, replaced atomically

A checkpoint is written into ``ckpt-XXXXXXXX.tmp``, every file fsynced, then the folder is
renamed into place and ``latest`` is replaced. Only folders named exactly ``ckpt-<digits>``
are ever read, so a half-written ``.tmp`` folder is invisible; if ``latest`` points nowhere
(a crash between the two renames) the newest complete folder is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from apt_model.errors import VBDataError
from apt_model.i18n import tr
from apt_model.storage import fsync_path, unique_tensors

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_NAME = re.compile(r"ckpt-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def _write_bytes_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _write_checkpoint_folder(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    tensors, aliases = unique_tensors(state["model"])
    save_file(tensors, folder / MODEL_FILE, metadata={"format": "pt", "aliases": json.dumps(aliases)})
    fsync_path(folder / MODEL_FILE)
    with open(folder / TRAINER_FILE, "wb") as fh:
        torch.save({k: v for k, v in state.items() if k != "model"}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    meta = {"step": int(state["step"]), "files": [MODEL_FILE, TRAINER_FILE]}
    _write_bytes_atomically(folder / META_FILE, json.dumps(meta).encode())
    fsync_path(folder)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.fullmatch(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    root = Path(root)
    with contextlib.suppress(OSError):
        named = root / (root / LATEST_FILE).read_text(encoding="utf-8").strip()
        if _NAME.fullmatch(named.name) and (named / META_FILE).is_file():
            return named
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def _remove_leftovers(root: Path) -> None:
    """Delete folders a crashed save left behind (never read, only wasting disk)."""
    for child in root.iterdir():
        if child.is_dir() and _NAME.match(child.name) and not _NAME.fullmatch(child.name):
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(root: str | os.PathLike, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (``"model"``: a state_dict, ``"step"``: int, anything else torch.save
    can store) as one atomic checkpoint under ``root``; keep the newest ``keep``.

    Raises ``VBDataError`` naming the path when the disk is full or not writable; the
    previous checkpoint and ``latest`` are then untouched.
    """
    root = Path(root)
    final = root / checkpoint_name(int(state["step"]))
    tmp = final.with_name(final.name + ".tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        _write_checkpoint_folder(tmp, state)
        if final.exists():  # the same step saved again (e.g. interval save, then final save)
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(root)
        _write_bytes_atomically(root / LATEST_FILE, (final.name + "\n").encode())
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise VBDataError(tr(f"无法写入检查点 {final}: {reason}",
                             f"cannot write checkpoint {final}: {reason}")) from None
    for _, folder in _complete_checkpoints(root)[:-keep]:
        if folder != final:
            shutil.rmtree(folder, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder, or the latest one under a checkpoint root, back into the
    dict ``save_checkpoint`` was given (tied weights restored as the same tensor)."""
    path = Path(path)
    folder = path if (path / META_FILE).is_file() else latest_checkpoint(path)
    if folder is None:
        raise VBDataError(tr(f"{path} 中没有可恢复的检查点", f"no checkpoint to resume in {path}"))
    try:
        model = load_file(folder / MODEL_FILE, device=str(map_location))
        with safe_open(folder / MODEL_FILE, framework="pt") as fh:
            aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
        state = torch.load(folder / TRAINER_FILE, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError,
            json.JSONDecodeError) as exc:
        raise VBDataError(tr(f"检查点 {folder} 无法读取: {str(exc).splitlines()[0]}",
                             f"checkpoint {folder} is unreadable: {str(exc).splitlines()[0]}")) from None
    for alias, name in aliases.items():
        model[alias] = model[name]
    state["model"] = model
    state["path"] = str(folder)
    return state
