"""Greedy decoding's argmax over a vocabulary, as two short reductions instead of one long one.

Why: ``logits.argmax(-1)`` of one row of a 128k vocabulary is a single reduction that CUDA
runs in one thread block, ~35 µs on an H200 (BENCHMARKS.md), longer than a decoder layer.
Seen as a [rows, cols] matrix, the row maxima are one reduction spread over many blocks and
their argmax a short second one.

:func:`argmax_last` is ``x.argmax(dim=-1)`` exactly: the first index of the largest value,
a NaN counting as the largest (``max`` over a dimension and ``argmax`` both return the first
such index, so the row picked first and the column within it give the first overall).
"""

from __future__ import annotations

import functools
import math

from torch import Tensor

__all__ = ["argmax_last", "split_columns"]

MIN_SPLIT = 4096  # shorter rows stay one reduction


@functools.cache
def split_columns(n: int) -> int | None:
    """The columns of the [n // cols, cols] view of a length-``n`` row: the least divisor of
    ``n`` at or above sqrt(n), if ``n`` has one below 4 sqrt(n) (None: one reduction)."""
    if n < MIN_SPLIT:
        return None
    root = math.isqrt(n - 1) + 1
    return next((c for c in range(root, 4 * root) if n % c == 0), None)


def argmax_last(x: Tensor) -> Tensor:
    """``x.argmax(dim=-1)`` (``x`` of at least one dimension, its last one non-empty)."""
    n = x.shape[-1]
    cols = split_columns(n)
    if cols is None:
        return x.argmax(dim=-1)
    best, where = x.reshape(*x.shape[:-1], n // cols, cols).max(dim=-1)
    row = best.argmax(dim=-1, keepdim=True)
    return (row * cols + where.gather(-1, row)).squeeze(-1)
