"""Attention of one new token per sequence over a key/value cache: decoding's attention as
one kernel (two over a long cache), eagerly and inside compiled graphs.

Why: Hugging Face's SDPA path over a static cache hands cuDNN the whole cache with a mask,
and with grouped-query attention repeats each key/value head for its query heads first (two
copies of the cache per layer and step, inside ``torch.compile``). At batch-1 decoding of an
8B Llama that was about 13 µs a layer on an H200 (BENCHMARKS.md), for about 1 MB of cache.
:func:`decode_attention` reads each key/value head in place for all its query heads.

What it computes: ``softmax(q k^T * scale + mask) v`` with SDPA's semantics for one query
position (``is_causal`` means nothing there): a boolean mask's False positions get no
weight, an additive mask is added to the scaled scores. The sums run in fp32 in another
order than SDPA's, so outputs match to the inputs' rounding, not bit for bit; a sequence
with every position masked gets zeros (SDPA gives NaN).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from apt_model.ops.triton_launch import HALF_DTYPES, triton_runs_on

__all__ = ["decode_attention", "decode_attention_reference"]

MAX_HEAD_DIM = 256


def _kernels() -> ModuleType:
    import apt_model.ops.triton_attention as triton_attention

    return triton_attention


def decode_attention_reference(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                               scale: float) -> Tensor:
    """The formula in PyTorch, in fp32: ``query`` [B, H, 1, D], ``key``, ``value`` [B, KVH, S, D],
    ``mask`` None, boolean or additive [B or 1, H or 1, 1, S]; returns [B, 1, H, D] in
    ``query``'s dtype."""
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask.float()
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # every position masked: zeros
    return (weights @ v).transpose(1, 2).to(query.dtype)


@torch.library.custom_op("apt_model::decode_attention", mutates_args=())
def _decode_attention_op(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                         scale: float) -> Tensor:
    return decode_attention_reference(query, key, value, mask, scale)


@_decode_attention_op.register_kernel("cuda")
def _decode_attention_cuda(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                           scale: float) -> Tensor:
    if not triton_runs_on(query.device.index):  # reached from a compiled graph
        return decode_attention_reference(query, key, value, mask, scale)
    batch, heads, _, d = query.shape
    out = torch.empty((batch, 1, heads, d), dtype=query.dtype, device=query.device)
    _kernels().decode_attention_into(query, key, value, mask, scale, out.view(batch, heads, d))
    return out


@_decode_attention_op.register_fake
def _decode_attention_fake(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                           scale: float) -> Tensor:
    """The op's output for tracing (torch.compile's fake tensors): [B, 1, H, D] in
    ``query``'s dtype and device, no values."""
    batch, heads, _, d = query.shape
    return query.new_empty((batch, 1, heads, d))


def _takes(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> bool:
    """Whether the kernel takes these inputs: one query position on a CUDA device (where
    Triton runs, eagerly), 16-bit tensors of one dtype with unit stride along D (at most
    ``MAX_HEAD_DIM``), query heads a multiple of key/value heads, a mask of one query row
    broadcast over batch and heads or not, and nothing to differentiate."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.shape[2] != 1:
        return False
    if not query.is_cuda or query.dtype not in HALF_DTYPES:
        return False
    batch, heads, _, d = query.shape
    if key.shape != value.shape or key.shape[0] != batch or key.shape[3] != d or d > MAX_HEAD_DIM \
            or key.shape[1] == 0 or heads % key.shape[1] or key.shape[2] == 0:
        return False
    if key.dtype != query.dtype or value.dtype != query.dtype \
            or any(t.stride(-1) != 1 for t in (query, key, value)):
        return False
    if key.device != query.device or value.device != query.device:
        return False
    if mask is not None and (mask.dim() != 4 or mask.shape[2] != 1 or mask.shape[3] != key.shape[2]
                             or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads)
                             or not (mask.dtype == torch.bool or mask.is_floating_point())
                             or mask.device != query.device):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (query, key, value, mask)):
        return False
    # Compiled graphs take the op whatever the device: its CUDA kernel falls back to the
    # formula where Triton does not run.
    return torch.compiler.is_compiling() or triton_runs_on(query.device.index)


def decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                     scale: float | None = None) -> Tensor | None:
    """Attention of ``query`` [B, H, 1, D] over ``key``, ``value`` [B, KVH, S, D] with ``mask``
    (None, boolean or additive, [B or 1, H or 1, 1, S]) and ``scale`` (default 1/sqrt(D)), as
    [B, 1, H, D] (Hugging Face's layout of attention outputs); None where the kernel does not
    take the inputs (see :func:`_takes`), for the caller's own path."""
    if not _takes(query, key, value, mask):
        return None
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return _decode_attention_op(query, key, value, mask, float(scale))
