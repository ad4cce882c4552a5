"""Route attention through ``scaled_dot_product_attention`` (flash / memory-efficient kernels).

Modules that expose ``attn_implementation`` (APT's attention) are switched from "eager" to
"sdpa"; Hugging Face models are switched through ``set_attn_implementation``.
"""

from __future__ import annotations

import contextlib

from torch import nn


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "_attn_implementation")


def _hf_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def use_fused_attention(model: nn.Module) -> int:
    """Switch every eager attention to SDPA; returns how many attention modules now use it."""
    switched = 0
    if _is_hf_model(model):
        if model.config._attn_implementation != "sdpa":
            with contextlib.suppress(ValueError, ImportError, AttributeError):
                model.set_attn_implementation("sdpa")
        if model.config._attn_implementation == "sdpa":
            switched += len(_hf_attention_modules(model))
    for module in model.modules():
        if getattr(module, "attn_implementation", None) in ("eager", "sdpa") and not _is_hf_model(module):
            module.attn_implementation = "sdpa"
            switched += 1
    return switched
