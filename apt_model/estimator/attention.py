"""The attention kernel a CUDA card would run, in a step traced on fake CPU tensors.

On fake CPU tensors ``scaled_dot_product_attention`` takes the CPU's kernel: the math
decomposition (which keeps the s × s attention weights for the backward pass) whenever
dropout is on, the CPU flash kernel otherwise. A CUDA card chooses by other rules, and its
flash and memory-efficient kernels keep only the output and a logsumexp per row.
``cuda_attention`` makes each call take the kernel CUDA's dispatcher would pick
(``cuda_kernel``) and calls that kernel's own operator: its fake implementation returns the
tensors the real kernel returns, and its autograd formula calls the kernel's backward,
whose fake implementation returns the gradients the real one allocates. Memory a kernel
allocates and frees inside itself (workspaces) stays invisible, as for every operator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn import functional as F

FLASH, EFFICIENT, MATH = "flash", "efficient", "math"
_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
_FLASH_HEAD_DIM_ALIGNMENT = 8  # flash pads a head dimension up to a multiple of this
_EFFICIENT_BIAS_ALIGNMENT = 16  # the memory-efficient kernel's mask is padded to a multiple of this


def _heads_match(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gqa: bool) -> bool:
    """Equal batch sizes, and equal head counts (or, with ``gqa``, query heads a multiple of
    the key and value heads)."""
    if not query.size(0) == key.size(0) == value.size(0) or key.size(1) != value.size(1):
        return False
    return query.size(1) == key.size(1) or (gqa and query.size(1) % key.size(1) == 0)


def cuda_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, enable_gqa: bool) -> str:
    """The kernel (``FLASH``, ``EFFICIENT`` or ``MATH``) CUDA's dispatcher picks for these
    inputs on an sm80 or newer card, in torch's default order (``sdp_utils.cpp``). Flash:
    fp16/bf16, no mask, equal head dimensions of at most 256, a causal mask only when query
    and key have the same length, grouped heads with ``enable_gqa``. Memory-efficient:
    fp16/bf16/fp32, head dimensions divisible by 8 (half) or 4 (fp32), equal head counts
    (it has no grouped-query support in torch 2.11). Else math. Where cuDNN runs in flash's
    place, its outputs have flash's sizes.
    """
    tensors = (query, key, value)
    if not all(t.dim() == 4 and t.stride(-1) == 1 and t.size(2) > 0 for t in tensors):
        return MATH
    head_dim, value_dim = query.size(-1), value.size(-1)
    half = query.dtype in _HALF
    if (half and attn_mask is None and head_dim == key.size(-1) == value_dim <= _FLASH_MAX_HEAD_DIM
            and not (is_causal and query.size(2) != key.size(2)) and _heads_match(*tensors, enable_gqa)):
        return FLASH
    alignment = 8 if half else 4
    if ((half or query.dtype == torch.float32) and head_dim == key.size(-1) and head_dim % alignment == 0
            and value_dim % alignment == 0 and _heads_match(*tensors, gqa=False)):
        return EFFICIENT
    return MATH


def _efficient_bias(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The mask as the memory-efficient kernel takes it (``preprocess_mask``): expanded to
    (batch, heads, query length, key length), its last dimension padded to a multiple of 16
    (a copy, sliced back) or made contiguous where its strides are not multiples of 16."""
    bias = mask.expand(query.size(0), query.size(1), query.size(2), key.size(2))
    length = bias.size(-1)
    if length % _EFFICIENT_BIAS_ALIGNMENT:
        return F.pad(bias, (0, _EFFICIENT_BIAS_ALIGNMENT - length % _EFFICIENT_BIAS_ALIGNMENT))[..., :length]
    if any(stride % _EFFICIENT_BIAS_ALIGNMENT for stride in bias.stride()[:3]):
        return bias.contiguous()
    return bias


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, is_causal: bool,
           scale: float | None) -> torch.Tensor:
    """Flash attention as ``scaled_dot_product_attention`` calls it: a head dimension that is
    not a multiple of 8 padded (copies) and the output sliced back, the scale of the
    unpadded dimension."""
    head_dim = query.size(-1)
    pad = -head_dim % _FLASH_HEAD_DIM_ALIGNMENT
    if pad:
        query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
    return out[..., :head_dim] if pad else out


def cuda_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` as CUDA runs it: under autocast (the traced device's,
    standing for CUDA's) the inputs in the autocast dtype and the kernel outside autocast;
    a boolean mask turned into an additive one of the query's dtype; then the kernel
    ``cuda_kernel`` picks."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    kernel = cuda_kernel(query, key, value, attn_mask, is_causal, enable_gqa)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask.logical_not(),
                                                                                 float("-inf"))
    with torch.autocast(device_type, enabled=False):
        if kernel == FLASH:
            return _flash(query, key, value, dropout_p, is_causal, scale)
        if kernel == EFFICIENT:
            bias = None if attn_mask is None else _efficient_bias(attn_mask, query, key)
            logsumexp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, bias, logsumexp, dropout_p, is_causal, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]


@contextlib.contextmanager
def cuda_attention() -> Iterator[None]:
    """While active, ``F.scaled_dot_product_attention`` is ``cuda_sdpa``, restored on exit.

    The function is swapped on its module: models look it up there at each call (Hugging
    Face's and APT's attention do), the recomputation of checkpointed blocks inside
    ``backward`` included. A ``TorchFunctionMode`` would miss that recomputation: ``backward``
    is itself a torch function, and a mode is off while it handles one. Not thread-safe:
    one trace at a time.
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = cuda_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
