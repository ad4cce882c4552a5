"""Durable file writing shared by the training checkpoints and the packed FP4 checkpoints."""

from __future__ import annotations

import contextlib
import os
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
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
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
