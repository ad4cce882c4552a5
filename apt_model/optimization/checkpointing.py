"""Per-block activation checkpointing (non-reentrant), found automatically.

Blocks are the classes a model names in ``_no_split_modules`` (the Hugging Face
convention, which APT follows), or the class filling the model's largest ``nn.ModuleList``,
or the class names given in ``checkpoint_blocks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from apt_model.optimization.wrapping import wrap_forward, wrapped_tags

CHECKPOINT_TAG = "checkpoint"  # the wrapper tag of a checkpointed block


def block_class_names(model: nn.Module, configured: tuple[str, ...] = ()) -> set[str]:
    """The class names whose instances are the model's repeated transformer blocks."""
    if configured:
        return set(configured)
    named = getattr(model, "_no_split_modules", None)
    if named:
        return set(named)
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    return {type(best[0]).__name__} if len(best) > 1 else set()


def find_blocks(model: nn.Module, configured: tuple[str, ...] = ()) -> list[nn.Module]:
    """The model's repeated transformer blocks (instances of ``block_class_names``), in
    registration order."""
    names = block_class_names(model, configured)
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def _checkpointed_forward(forward: Callable[..., Any], module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def apply_checkpointing(model: nn.Module, configured: tuple[str, ...] = ()) -> list[nn.Module]:
    """Wrap every block's forward so its activations are recomputed in backward."""
    blocks = find_blocks(model, configured)
    for block in blocks:
        wrap_forward(block, CHECKPOINT_TAG, _checkpointed_forward)
    return blocks


def is_checkpointed(model: nn.Module, block: nn.Module) -> bool:
    """Whether ``block`` of ``model`` recomputes its activations in backward: VB's checkpointing
    wraps it (``apply_checkpointing``), or the model's own gradient checkpointing is on
    (Hugging Face ``gradient_checkpointing_enable``)."""
    return CHECKPOINT_TAG in wrapped_tags(block) or bool(getattr(model, "is_gradient_checkpointing", False))
