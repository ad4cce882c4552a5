"""The two-reduction argmax (apt_model.ops.argmax) is ``argmax(dim=-1)``: ties, NaNs, batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apt_model.ops.argmax import argmax_last, split_columns

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_split_columns():
    assert split_columns(128256) == 384  # Llama 3's vocabulary: 334 x 384
    assert split_columns(32000) == 200
    assert split_columns(1000) is None  # short: one reduction
    assert split_columns(50257) is None  # 29 x 1733: no divisor near the root


def _logits(seed: int, rows: int, n: int, levels: int, nans: int, dtype, device) -> torch.Tensor:
    """Few distinct values (many ties), some NaNs in the first row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (rows, n), generator=g).to(dtype)
    if nans:
        x[0, torch.randint(0, n, (nans,), generator=g)] = float("nan")
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 4),
       n=st.sampled_from([4096, 32000, 128256, 50257]), levels=st.integers(0, 3),
       nans=st.integers(0, 3))
def test_argmax_last_is_argmax(device, dtype, seed, rows, n, levels, nans):
    x = _logits(seed, rows, n, levels, nans, dtype, device)
    assert torch.equal(argmax_last(x), x.argmax(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_last_keeps_leading_dims(device):
    x = torch.randn(2, 3, 32000, device=device)
    assert torch.equal(argmax_last(x), x.argmax(dim=-1))
    assert torch.equal(argmax_last(x[:, -1]), x[:, -1].argmax(dim=-1))
