"""Fused kernels: attention through ``scaled_dot_product_attention`` (flash /
memory-efficient kernels), and the fused linear + cross-entropy loss.

Modules that expose ``attn_implementation`` (APT's attention) are switched from "eager" to
"sdpa". Hugging Face models are switched to "vb_sdpa": their SDPA path, except that under
autocast query/key/value are brought to the autocast dtype first (Hugging Face applies
rotary embeddings in the hidden states' dtype, fp32 under autocast, which would keep SDPA
off its flash kernel), and that where ``use_decode_attention`` marked the attention modules
one new token per sequence on CUDA attends through
:func:`~apt_model.ops.decode_attention.decode_attention` (decoding, eager and compiled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from apt_model.ops.decode_attention import decode_attention

HF_IMPLEMENTATION = "vb_sdpa"


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "_attn_implementation")


# Arguments of Hugging Face's attention functions that the one-token kernel does not compute.
_NOT_DECODE_KERNEL = ("softcap", "position_bias", "s_aux", "sinks")


# Set on an attention module whose decoding takes the one-token kernel (``use_decode_attention``).
DECODE_ATTR = "_vb_decode_attention"


def _vb_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if getattr(module, DECODE_ATTR, False) and not kwargs.get("dropout") \
            and not kwargs.get("output_attentions") \
            and all(kwargs.get(name) is None for name in _NOT_DECODE_KERNEL):
        out = decode_attention(query, key, value, attention_mask, kwargs.get("scaling"))
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_hf_implementation() -> bool:
    """Make "vb_sdpa" known to transformers (its attention and mask registries)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(HF_IMPLEMENTATION, _vb_sdpa)
    AttentionMaskInterface.register(HF_IMPLEMENTATION, sdpa_mask)
    return True


def _try_implementation(model: nn.Module, name: str) -> None:
    """Switch a Hugging Face model to attention ``name`` where it accepts it (else unchanged)."""
    with contextlib.suppress(ValueError, ImportError, AttributeError, KeyError):
        model.set_attn_implementation(name)


def _switch_hf_model(model: nn.Module) -> int:
    target = HF_IMPLEMENTATION if _register_hf_implementation() else "sdpa"
    for name in (target, "sdpa"):
        if model.config._attn_implementation in (target, name):
            break
        _try_implementation(model, name)
    if model.config._attn_implementation not in (HF_IMPLEMENTATION, "sdpa"):
        return 0
    return len(_attention_modules(model))


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def use_decode_attention(model: nn.Module) -> Callable[[], None]:
    """Let a Hugging Face model's SDPA attention decode one token through the one-token
    kernel: a model on "sdpa" moves to "vb_sdpa" (the same SDPA for everything else) and its
    attention modules are marked. (APT's SDPA path takes the kernel by itself.) Returns the
    undo of the marks; the implementation goes back with ``remember_implementations``."""
    if not _is_hf_model(model):
        return lambda: None
    if model.config._attn_implementation == "sdpa" and _register_hf_implementation():
        _try_implementation(model, HF_IMPLEMENTATION)
    if model.config._attn_implementation != HF_IMPLEMENTATION:
        return lambda: None
    marked = _attention_modules(model)
    for module in marked:
        setattr(module, DECODE_ATTR, True)

    def unmark() -> None:
        for module in marked:
            module.__dict__.pop(DECODE_ATTR, None)

    return unmark


def _switch(model: nn.Module, attribute: str, known: tuple[str, ...], target: str) -> int:
    """Set ``attribute`` to ``target`` on every module that exposes it; returns how many."""
    switched = 0
    for module in model.modules():
        if getattr(module, attribute, None) in known:
            setattr(module, attribute, target)
            switched += 1
    return switched


def use_fused_attention(model: nn.Module) -> int:
    """Switch every eager attention to SDPA; returns how many attention modules now use it."""
    if _is_hf_model(model):
        return _switch_hf_model(model)
    return _switch(model, "attn_implementation", ("eager", "sdpa"), "sdpa")


def use_fused_loss(model: nn.Module) -> int:
    """Switch models that expose ``loss_implementation`` (APT) to the fused chunked
    linear + cross-entropy, which never materializes the full logits."""
    return _switch(model, "loss_implementation", ("logits", "fused"), "fused")


def remember_implementations(model: nn.Module) -> Callable[[], None]:
    """A function that puts back the attention and loss implementations ``model`` has now
    (what ``use_fused_attention`` / ``use_fused_loss`` change), for ``vb.restore``."""
    hf_attention = model.config._attn_implementation if _is_hf_model(model) else None
    attributes = [(module, name, getattr(module, name)) for module in model.modules()
                  for name in ("attn_implementation", "loss_implementation")
                  if isinstance(getattr(module, name, None), str)]

    def put_back() -> None:
        if hf_attention is not None and model.config._attn_implementation != hf_attention:
            model.set_attn_implementation(hf_attention)
        for module, name, value in attributes:
            setattr(module, name, value)

    return put_back
