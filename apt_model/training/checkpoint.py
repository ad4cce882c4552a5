"""Atomic, checksummed training checkpoints: a crash, a full disk or a flipped bit never
leaves one that ``--resume`` trusts.

Layout under a run's checkpoint root::

    checkpoints/
        ckpt-00000300/          one complete checkpoint
            model.safetensors   weights (plain tensors, loadable without this package)
            trainer.pt          optimizer, step, RNG states, configs (torch.save)
            meta.json           written last: step, and size and SHA-256 of the two files
        latest                  name of the newest checkpoint, replaced atomically

Saving: the free space is checked first (a checkpoint that cannot fit is refused, saying how
much it needs and how much is free); the checkpoint is written into ``ckpt-XXXXXXXX.tmp``,
every file fsynced and hashed, then the folder is renamed into place and ``latest`` is
replaced. Only folders named exactly ``ckpt-<digits>`` holding ``meta.json`` are complete and
ever read, so a half-written ``.tmp`` folder is invisible. A failed save leaves the previous
checkpoints and ``latest`` untouched.

Keep rule: after a successful save of step S, the newest ``keep`` complete checkpoints up to
step S stay (the one just written always among them) and older ones are deleted. Checkpoints
newer than S (left by a run resumed from an older checkpoint, e.g. because the newer ones are
corrupt) are neither counted nor deleted; the run replaces them as it reaches their steps.
Nothing is deleted when a save fails. So an intact checkpoint is never pruned to make room
for corrupt newer ones.

Loading a root tries the checkpoint ``latest`` names (the newest complete one when ``latest``
points nowhere, e.g. after a crash between the two renames), then every older complete one,
newest first, and returns the first that verifies; folders newer than the one ``latest``
names (a run resumed from an older checkpoint, or a crash before ``latest`` was replaced)
are not used. Checkpoints written before checksums were recorded load unverified.
"""

from __future__ import annotations

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

from apt_model.errors import VBDataError, first_line
from apt_model.i18n import tr
from apt_model.storage import (
    free_bytes,
    fsync_path,
    human_bytes,
    is_disk_full,
    sha256_file,
    unique_tensors,
)

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_NAME = re.compile(r"ckpt-(\d+)")
# Beyond the tensor bytes: headers of both files, the pickled non-tensor state, meta.json.
_MARGIN_BYTES = 64 << 10
_MARGIN_PER_TENSOR = 512


class _Unusable(Exception):
    """Why one checkpoint folder cannot be used: a short phrase naming the file."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def _write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once; on failure ``path`` is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _bytes_needed(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> int:
    """Disk bytes one checkpoint takes, slightly over: the weights as safetensors stores
    them, every storage torch.save writes for the rest (optimizer state, RNG states), and a
    margin for headers and the pickled non-tensor values."""
    storages: dict[tuple[torch.device, int], int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[(obj.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(rest)
    count = len(tensors) + len(storages)
    return (sum(t.nbytes for t in tensors.values()) + sum(storages.values())
            + _MARGIN_BYTES + _MARGIN_PER_TENSOR * count)


def _write_checkpoint_folder(folder: Path, step: int, tensors: dict[str, torch.Tensor],
                             aliases: dict[str, str], rest: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    save_file(tensors, folder / MODEL_FILE, metadata={"format": "pt", "aliases": json.dumps(aliases)})
    fsync_path(folder / MODEL_FILE)
    with open(folder / TRAINER_FILE, "wb") as fh:
        torch.save(rest, fh)
        fh.flush()
        os.fsync(fh.fileno())
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in (MODEL_FILE, TRAINER_FILE)}
    meta = {"step": step, "files": files}
    _write_bytes_atomically(folder / META_FILE, json.dumps(meta, indent=1).encode())
    fsync_path(folder)


def _write_error(final: Path, exc: BaseException, needed: int) -> VBDataError:
    """The one-line error for a failed save; a full disk says so whatever layer noticed it
    (torch.save's zip writer only reports "unexpected pos ...")."""
    free = free_bytes(final.parent)
    if is_disk_full(exc) or (not isinstance(exc, OSError) and free < needed):
        return VBDataError(tr(
            f"无法写入检查点 {final}: 磁盘空间不足 (需要 {human_bytes(needed)}, 可用 {human_bytes(free)})",
            f"cannot write checkpoint {final}: no space left on device "
            f"(needs {human_bytes(needed)}, {human_bytes(free)} free)"))
    reason = getattr(exc, "strerror", None) or first_line(exc)
    return VBDataError(tr(f"无法写入检查点 {final}: {reason}", f"cannot write checkpoint {final}: {reason}"))


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


def _candidates(root: Path) -> list[Path]:
    """The complete checkpoints a resume may use, in the order to try them: the one
    ``latest`` names (else the newest), then every older one, newest first."""
    complete = _complete_checkpoints(root)
    try:
        named = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    newest = next((step for step, folder in complete if folder.name == named),
                  complete[-1][0] if complete else -1)
    return [folder for step, folder in reversed(complete) if step <= newest]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None (unverified)."""
    candidates = _candidates(Path(root))
    return candidates[0] if candidates else None


def _remove_leftovers(root: Path) -> None:
    """Delete folders a crashed save left behind (never read, only wasting disk)."""
    for child in root.iterdir():
        if child.is_dir() and _NAME.match(child.name) and not _NAME.fullmatch(child.name):
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(root: str | os.PathLike, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (``"model"``: a state_dict, ``"step"``: int, anything else torch.save
    can store) as one atomic, checksummed checkpoint under ``root`` and return its folder.

    After the save succeeds, the newest ``keep`` complete checkpoints up to this step (this
    one included) are kept and older ones deleted; newer ones are left alone (see the module
    docstring); ``keep`` < 1 keeps all.

    Raises ``VBDataError`` naming the path when the checkpoint does not fit in the free
    space (saying how much it needs and how much is free), when the disk fills up while
    writing ("no space left on device"), or when the folder is not writable; the previous
    checkpoints and ``latest`` are then untouched.
    """
    root = Path(root)
    step = int(state["step"])
    final = root / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    tensors, aliases = unique_tensors(state["model"])
    rest = {k: v for k, v in state.items() if k != "model"}
    needed = _bytes_needed(tensors, rest)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)  # before measuring: a killed save's folder holds space
    except OSError as exc:
        raise _write_error(final, exc, needed) from None
    free = free_bytes(root)
    if free < needed:
        raise VBDataError(tr(
            f"无法写入检查点 {final}: 磁盘空间不足 (需要 {human_bytes(needed)}, 可用 {human_bytes(free)})",
            f"cannot write checkpoint {final}: not enough disk space "
            f"(needs {human_bytes(needed)}, {human_bytes(free)} free)"))
    try:
        _write_checkpoint_folder(tmp, step, tensors, aliases, rest)
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
        raise _write_error(final, exc, needed) from None
    up_to_now = [folder for other, folder in _complete_checkpoints(root) if other <= step]
    for folder in up_to_now[:-keep] if keep > 0 else []:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def _verify(folder: Path) -> None:
    """Check every file against the size and SHA-256 in ``meta.json``; raise ``_Unusable``.
    A ``meta.json`` without checksums (written by an older version) passes unchecked."""
    try:
        files = json.loads((folder / META_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise _Unusable(tr(f"{META_FILE} 已损坏 ({type(exc).__name__})",
                           f"{META_FILE} is corrupt ({type(exc).__name__})")) from None
    if not isinstance(files, dict):
        return
    for name, expected in files.items():
        try:
            size = (folder / name).stat().st_size
            if size < expected["bytes"]:
                raise _Unusable(tr(f"{name} 被截断 ({size} / {expected['bytes']} 字节)",
                                   f"{name} is truncated ({size} of {expected['bytes']} bytes)"))
            if size != expected["bytes"] or sha256_file(folder / name) != expected["sha256"]:
                raise _Unusable(tr(f"{name} 已损坏 (SHA-256 校验和不符)",
                                   f"{name} is corrupt (SHA-256 checksum mismatch)"))
        except FileNotFoundError:
            raise _Unusable(tr(f"{name} 缺失", f"{name} is missing")) from None
        except OSError as exc:
            raise _Unusable(tr(f"{name} 无法读取: {exc.strerror}",
                               f"{name} is unreadable: {exc.strerror}")) from None
        except (KeyError, TypeError):
            raise _Unusable(tr(f"{META_FILE} 已损坏", f"{META_FILE} is corrupt")) from None


def _read(folder: Path, map_location: str | torch.device) -> dict[str, Any]:
    """Verify and load one checkpoint folder; raise ``_Unusable``."""
    _verify(folder)
    try:
        model = load_file(folder / MODEL_FILE, device=str(map_location))
        with safe_open(folder / MODEL_FILE, framework="pt") as fh:
            aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
        state = torch.load(folder / TRAINER_FILE, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError,
            json.JSONDecodeError) as exc:
        first = first_line(exc)
        raise _Unusable(tr(f"无法读取: {first}", f"unreadable: {first}")) from None
    for alias, name in aliases.items():
        model[alias] = model[name]
    state["model"] = model
    state["path"] = str(folder)
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint back into the dict ``save_checkpoint`` was given (tied weights
    restored as the same tensor), plus ``"path"`` (the folder read, as str) and
    ``"skipped"``: ``[(folder, reason), ...]`` (both str) for every checkpoint passed over
    because it failed verification or could not be read, newest first (empty when none).

    ``path`` is a checkpoint folder (verified, no fallback) or a checkpoint root (the newest
    intact checkpoint, see the module docstring). Raises ``VBDataError`` when the folder is
    corrupt, truncated or unreadable, when a root holds no checkpoint, or when none of its
    checkpoints is intact. Prints nothing.
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        try:
            state = _read(path, map_location)
        except _Unusable as exc:
            raise VBDataError(tr(f"检查点 {path}: {exc}", f"checkpoint {path}: {exc}")) from None
        state["skipped"] = []
        return state
    candidates = _candidates(path)
    if not candidates:
        raise VBDataError(tr(f"{path} 中没有可恢复的检查点", f"no checkpoint to resume in {path}"))
    skipped: list[tuple[str, str]] = []
    for folder in candidates:
        try:
            state = _read(folder, map_location)
        except _Unusable as exc:
            skipped.append((str(folder), str(exc)))
            continue
        state["skipped"] = skipped
        return state
    first, reason = skipped[0]
    raise VBDataError(tr(f"{path} 中的 {len(skipped)} 个检查点都无法使用; 最新的 {first}: {reason}",
                         f"none of the {len(skipped)} checkpoints in {path} is intact; "
                         f"the newest, {first}: {reason}"))
