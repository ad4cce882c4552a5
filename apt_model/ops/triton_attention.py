"""Triton kernels for attention of one query token per sequence over a key/value cache
(:mod:`apt_model.ops.decode_attention` says when they run).

One program per (sequence, query head, slice of the cache): it reads its key/value head's
rows of the slice (grouped-query attention reads the shared head in place, never a repeated
copy), keeps a running maximum, sum and weighted sum of values in fp32 (exp2 of scores
pre-multiplied by log2(e)), and writes either the output or, when the cache is cut into
several slices, its partial maximum, sum and weighted sum for a second kernel that merges
the slices. Positions whose boolean mask is False (or whose additive mask is -inf) get no
weight; a sequence with no position left gets zeros. It imports Triton when there is one;
without Triton it imports, and launching a kernel fails.
"""

from __future__ import annotations

import torch
from torch import Tensor

from apt_model.ops.triton_launch import cdiv, direct_launch, next_pow2, sm_count

try:  # Triton is optional: every module of the package imports without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

__all__ = ["decode_attention_into"]

_jit = triton.jit if triton is not None else (lambda fn: fn)

LOG2E = 1.4426950408889634
BLOCK_S = 64  # cache positions per loop step


@_jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_ptr,
                   H, G, S, D, qk_scale, log2e,
                   sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_h, sm_s,
                   MASK: tl.constexpr, STEPS: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query head ``h`` of sequence ``b`` over cache positions [split * STEPS * BLOCK_S, ...).
    ``MASK``: 0 none, 1 boolean (nonzero: attend), 2 additive. Output [B, H, D] contiguous;
    with ``SPLIT`` > 1, partials [B * H, SPLIT, D + 2] (weighted sum, maximum, sum) in fp32."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // G).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    q = q * qk_scale
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    start = split * (STEPS * BLOCK_S)
    for step in range(STEPS):
        offs_s = start + step * BLOCK_S + tl.arange(0, BLOCK_S)
        s_mask = offs_s < S
        rows = offs_s.to(tl.int64)
        tile = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] * sk_s + offs_d[None, :], mask=tile, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        valid = s_mask
        if MASK == 1:
            keep = tl.load(m_ptr + b * sm_b + h * sm_h + rows * sm_s, mask=s_mask, other=0)
            valid = valid & (keep != 0)
        if MASK == 2:
            add = tl.load(m_ptr + b * sm_b + h * sm_h + rows * sm_s, mask=s_mask, other=0.0)
            scores = scores + add.to(tl.float32) * log2e
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing to attend to yet
        p = tl.exp2(scores - m_safe)
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(v_base + rows[:, None] * sv_s + offs_d[None, :], mask=tile, other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    if SPLIT == 1:
        out = tl.where(l_i > 0, acc / l_i, 0.0)
        tl.store(o_ptr + bh.to(tl.int64) * D + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)
    else:
        row = part_ptr + (bh.to(tl.int64) * SPLIT + split) * (D + 2)
        tl.store(row + offs_d, acc, mask=d_mask)
        tl.store(row + D, m_i)
        tl.store(row + D + 1, l_i)


@_jit
def _merge_kernel(part_ptr, o_ptr, D, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Output row ``bh`` from its ``SPLIT`` partials: each slice's sums rescaled to the
    largest maximum, added, divided."""
    bh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    base = part_ptr + bh * SPLIT * (D + 2)
    offs_p = tl.arange(0, SPLIT)
    m = tl.load(base + offs_p * (D + 2) + D)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)
    l_sum = tl.sum(w * tl.load(base + offs_p * (D + 2) + D + 1), axis=0)
    acc = tl.load(base + offs_p[:, None] * (D + 2) + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0)
    out = tl.where(l_sum > 0, out / l_sum, 0.0)
    tl.store(o_ptr + bh * D + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)


def _split(rows: int, steps: int, index: int | None) -> int:
    """Cache slices per (sequence, head): enough programs for two per multiprocessor,
    at least one loop step each, a power of two (the merge loads them as one vector)."""
    programs = 2 * (sm_count(index) if index is not None else 8)
    want = max(1, min(steps, cdiv(programs, rows)))
    return 1 << (want.bit_length() - 1)


def _mask_strides(mask: Tensor | None, batch: int, heads: int) -> tuple[int, int, int]:
    """(batch, head, position) strides of a mask [B or 1, H or 1, 1, S] (0 where broadcast)."""
    if mask is None:
        return 0, 0, 0
    return (mask.stride(0) if mask.shape[0] == batch and batch > 1 else 0,
            mask.stride(1) if mask.shape[1] == heads and heads > 1 else 0,
            mask.stride(3))


def decode_attention_into(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                          out: Tensor) -> None:
    """``out`` [B, H, D] (contiguous) = softmax(q k^T * scale + mask) v for ``q`` [B, H, 1, D],
    ``k``, ``v`` [B, KVH, S, D] (unit stride along D; H a multiple of KVH) and ``mask``
    None, boolean or additive [B or 1, H or 1, 1, S]."""
    batch, heads, _, d = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    steps = cdiv(seq, BLOCK_S)
    index = q.device.index if q.is_cuda else None
    split = _split(batch * heads, steps, index)
    per_split = cdiv(steps, split)  # a last slice may be empty: it adds no weight
    kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    if kind == 1:
        mask = mask.view(torch.uint8)
    sm = _mask_strides(mask, batch, heads)
    block_d = next_pow2(d)
    part = (torch.empty((batch * heads, split, d + 2), dtype=torch.float32, device=q.device)
            if split > 1 else out)
    consts = dict(H=heads, G=heads // kv_heads, S=seq, D=d, qk_scale=scale * LOG2E, log2e=LOG2E,
                  sq_b=q.stride(0), sq_h=q.stride(1), sk_b=k.stride(0), sk_h=k.stride(1),
                  sk_s=k.stride(2), sv_b=v.stride(0), sv_h=v.stride(1), sv_s=v.stride(2),
                  sm_b=sm[0], sm_h=sm[1], sm_s=sm[2], MASK=kind, STEPS=per_split, SPLIT=split,
                  BLOCK_S=BLOCK_S, BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8)
    grid = (batch * heads, split)
    masks = mask if mask is not None else q
    key = ("attend", index, q.dtype, k.dtype, masks.dtype, part.dtype, grid,
           tuple(consts.items()))
    direct_launch(key, _attend_kernel, grid, (q, k, v, masks, out, part), consts)
    if split > 1:
        merge = dict(D=d, SPLIT=split, BLOCK_D=block_d, num_warps=4)
        direct_launch(("merge", index, out.dtype, batch * heads, tuple(merge.items())),
                      _merge_kernel, (batch * heads,), (part, out), merge)
