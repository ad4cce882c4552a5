"""Durable file writing shared by the training checkpoints and the packed FP4 checkpoints:
fsync, checksums, free space and telling a full disk apart from other write errors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (a folder: so a rename in it survives a power cut)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # platforms that cannot open folders (Windows) have nothing to sync
            return
        raise
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on folders
            os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (the file is never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes this user may still write on the file system that holds ``path``, or that
    will hold it once created (measured at its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human_bytes(n: int, digits: int = 1) -> str:
    """``n`` bytes in binary units, ``digits`` decimals above bytes: "512 B", "2.1 MiB"."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.{digits}f} {unit}"


# Errors meaning "the disk (or this user's quota) is full"; Windows has no EDQUOT.
_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int | None:
    """Bytes written as a number and an optional unit ("24GiB", "8000 MB", "1.5TiB", "4096";
    decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB, any case); None when it is not a size."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    if unit not in SIZE_UNITS:
        return None
    try:
        value = float(number)
    except ValueError:
        return None
    return int(value * SIZE_UNITS[unit])


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError saying the disk or the quota is full."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def storage_key(tensor: torch.Tensor) -> tuple[torch.device, int]:
    """What identifies the memory behind ``tensor``: its device and storage object (the one
    all its views share; unlike the data address, it tells fake tensors' storages apart)."""
    return tensor.device, tensor.untyped_storage()._cdata


def tensors_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of memory behind ``tensors``, each storage counted once."""
    return sum({storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of memory behind ``module``'s parameters and buffers: each storage counted once
    (tied weights, and views such as fused FP4 groups' members, share one)."""
    return tensors_nbytes((*module.parameters(), *module.buffers()))


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors safetensors accepts, and ``{alias: stored_name}``.

    safetensors refuses tensors sharing memory: a tied weight (embedding = LM head) is the
    same view under two names, so the second becomes an alias; other overlapping views
    are cloned.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple[torch.device, int]] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        storage = storage_key(tensor)
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
                tensor.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        shared = storage in storages and tensor.numel() > 0
        storages.add(storage)
        tensor = tensor.to("cpu")
        kept[name] = tensor.clone() if shared else tensor.contiguous()
    return kept, aliases
