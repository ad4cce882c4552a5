"""Tests of the fused, chunked linear + cross-entropy against F.linear + F.cross_entropy."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from apt_model.ops import default_chunk_tokens, linear_cross_entropy

# The package re-exports the function under the module's own name, so fetch the module itself.
lce_module = importlib.import_module("apt_model.ops.linear_cross_entropy")


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in norm; exact zero on both sides counts as 0."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale > 0 else diff


def make(lead: tuple[int, ...], d: int, vocab: int, dtype: torch.dtype = torch.float32,
         bias: bool = True, ignore: float = 0.0, ignore_index: int = -100, seed: int = 0):
    """Random hidden (lead..., d), weight, bias and targets with a fraction ``ignore`` ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g, dtype=dtype) / math.sqrt(d)).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, vocab, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore] = ignore_index
    return h, w, b, t


def reference(h, w, b, t, ignore_index: int = -100) -> torch.Tensor:
    logits = F.linear(h, w, b)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1),
                           ignore_index=ignore_index)


def grads(loss: torch.Tensor, inputs) -> list[torch.Tensor]:
    inputs = [x for x in inputs if x is not None]
    return list(torch.autograd.grad(loss, inputs))


# ---- exactness -------------------------------------------------------------------------------


CASES = [  # (leading shape, d, vocab, chunk_tokens, fraction ignored)
    ((10,), 8, 13, None, 0.0),
    ((10,), 8, 13, 3, 0.3),  # 10 is not a multiple of 3
    ((10,), 8, 13, 1, 0.3),
    ((12,), 16, 40, 4, 0.0),  # exact multiple
    ((2, 5), 8, 17, 3, 0.2),  # 3-D hidden
    ((3, 4), 6, 5, 100, 0.5),  # chunk larger than N
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead,d,vocab,chunk,ignore", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_matches_reference(lead, d, vocab, chunk, ignore, bias, dtype, tol) -> None:
    h, w, b, t = make(lead, d, vocab, dtype=dtype, bias=bias, ignore=ignore)
    expected = reference(h, w, b, t)
    loss = linear_cross_entropy(h, w, t, bias=b, chunk_tokens=chunk)
    assert loss.dtype == expected.dtype and loss.shape == ()
    assert abs(loss.item() - expected.item()) <= tol * abs(expected.item())
    for got, want in zip(grads(loss, (h, w, b)), grads(expected, (h, w, b)), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel(got, want) <= tol


def test_custom_ignore_index() -> None:
    h, w, b, t = make((20,), 8, 11, ignore=0.4, ignore_index=3)
    expected = reference(h, w, b, t, ignore_index=3)
    loss = linear_cross_entropy(h, w, t, bias=b, ignore_index=3, chunk_tokens=7)
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    for got, want in zip(grads(loss, (h, w, b)), grads(expected, (h, w, b)), strict=True):
        assert rel(got, want) <= 1e-6
    # -100 is an ordinary (out of range) class here, not ignored.
    t[0] = -100
    with pytest.raises((RuntimeError, IndexError)):
        linear_cross_entropy(h, w, t, bias=b, ignore_index=3)


@pytest.mark.parametrize("lead", [(6,), (0,)])
def test_all_ignored_gives_zero_loss_and_zero_grads(lead) -> None:
    h, w, b, t = make(lead, 4, 9, ignore=1.0)
    assert bool((t == -100).all())
    assert torch.isnan(reference(h, w, b, t))  # what F.cross_entropy does; we chose 0
    loss = linear_cross_entropy(h, w, t, bias=b, chunk_tokens=4)
    assert loss.item() == 0.0
    loss.backward()
    for x in (h, w, b):
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_grad_output_scales_gradients() -> None:
    h, w, b, t = make((9,), 8, 12, ignore=0.2)
    (linear_cross_entropy(h, w, t, bias=b, chunk_tokens=4) * 3.0).backward()
    fused = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    reference(h, w, b, t).backward()
    for got, x in zip(fused, (h, w, b), strict=True):
        assert rel(got, 3.0 * x.grad) <= 1e-6


def test_double_backward_through_retained_graph_is_not_corrupted() -> None:
    h, w, _, t = make((8,), 4, 6, bias=False)
    loss = linear_cross_entropy(h, w, t, chunk_tokens=3)
    first = torch.autograd.grad(2.0 * loss, h, retain_graph=True)[0]
    second = torch.autograd.grad(loss, h)[0]
    assert rel(first, 2.0 * second) <= 1e-7


def test_only_needed_gradients() -> None:
    h, w, b, t = make((8,), 4, 6)
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = linear_cross_entropy(h, w, t, bias=b, chunk_tokens=3)
    loss.backward()
    assert w.grad is None and b.grad is None
    h_ref = h.detach().clone().requires_grad_()
    reference(h_ref, w, b, t).backward()
    assert rel(h.grad, h_ref.grad) <= 1e-6

    h2, w2, _, t2 = make((8,), 4, 6, bias=False)
    h2.requires_grad_(False)
    linear_cross_entropy(h2, w2, t2, chunk_tokens=3).backward()
    w_ref = w2.detach().clone().requires_grad_()
    reference(h2, w_ref, None, t2).backward()
    assert h2.grad is None and rel(w2.grad, w_ref.grad) <= 1e-6


def test_no_grad_returns_the_same_loss_without_gradient_work(monkeypatch: pytest.MonkeyPatch) -> None:
    h, w, b, t = make((2, 7), 8, 13, ignore=0.2)
    with_grad = linear_cross_entropy(h, w, t, bias=b, chunk_tokens=5)

    def forbidden(*args, **kwargs):
        raise AssertionError("the autograd Function must not run without grad")

    monkeypatch.setattr(lce_module._LinearCrossEntropy, "apply", forbidden)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss = linear_cross_entropy(h, w, t, bias=b, chunk_tokens=5)
        assert not loss.requires_grad
        assert loss.item() == with_grad.item()
    # Nothing requires grad: same shortcut with grad mode on.
    loss = linear_cross_entropy(h.detach(), w.detach(), t, bias=b.detach(), chunk_tokens=5)
    assert loss.item() == with_grad.item()


def test_tied_weight_gradients_accumulate() -> None:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(11, 8)
    ids = torch.randint(0, 11, (3, 5))

    def loss_fn(fused: bool) -> torch.Tensor:
        h = torch.tanh(embed(ids))
        if fused:
            return linear_cross_entropy(h[:, :-1], embed.weight, ids[:, 1:], chunk_tokens=4)
        return reference(h[:, :-1], embed.weight, None, ids[:, 1:])

    loss_fn(False).backward()
    expected = embed.weight.grad.clone()
    embed.weight.grad = None
    loss_fn(True).backward()
    assert rel(embed.weight.grad, expected) <= 1e-6


# ---- chunking --------------------------------------------------------------------------------


def test_default_chunk_rule() -> None:
    assert default_chunk_tokens(50304) == 1328  # 2**26 // 50304 = 1334, down to a multiple of 8
    assert default_chunk_tokens(256) == 2**18
    assert default_chunk_tokens(2**24) == 4  # below 8: not rounded
    assert default_chunk_tokens(2**30) == 1
    for vocab in (256, 1000, 50304, 128256):
        assert default_chunk_tokens(vocab) * vocab * 4 <= 256 * 2**20


@pytest.mark.parametrize("n,chunk", [(10, 3), (10, 1), (12, 4), (5, 100)])
def test_logits_are_only_ever_one_chunk(monkeypatch: pytest.MonkeyPatch, n: int, chunk: int) -> None:
    shapes: list[tuple[int, ...]] = []
    real_linear = F.linear

    def spy(x, weight, bias=None):
        out = real_linear(x, weight, bias)
        shapes.append(tuple(out.shape))
        return out

    h, w, b, t = make((n,), 4, 7)
    monkeypatch.setattr(lce_module.F, "linear", spy)
    linear_cross_entropy(h, w, t, bias=b, chunk_tokens=chunk).backward()
    assert len(shapes) == math.ceil(n / chunk)
    assert all(rows <= chunk and vocab == 7 for rows, vocab in shapes)
    assert sum(rows for rows, _ in shapes) == n


def test_bad_arguments_raise() -> None:
    h, w, b, t = make((4,), 4, 6)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, t, chunk_tokens=0)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, t, bias=b[:5])


# ---- autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 16])
def test_bf16_autocast_matches_bf16_matmul_with_fp32_loss(hidden_dtype, chunk) -> None:
    h, w, b, t = make((4, 16), 64, 300, ignore=0.1)
    h = h.detach().to(hidden_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(h, w, b, t)
        loss = linear_cross_entropy(h, w, t, bias=b, chunk_tokens=chunk)
    assert loss.dtype == torch.float32 and expected.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 1e-3 * expected.item()
    got = grads(loss, (h, w, b))
    want = grads(expected, (h, w, b))
    for g, x in zip(got, (h, w, b), strict=True):
        assert g.dtype == x.dtype  # hidden's dtype; fp32 master weight and bias
    for g, ref in zip(got, want, strict=True):
        assert rel(g, ref) <= 4e-3


def test_autocast_runs_the_matmul_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real_linear = F.linear

    def spy(x, weight, bias=None):
        seen.append((x.dtype, weight.dtype))
        return real_linear(x, weight, bias)

    monkeypatch.setattr(lce_module.F, "linear", spy)
    h, w, _, t = make((8,), 8, 10, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h, w, t, chunk_tokens=3).backward()
    linear_cross_entropy(h, w, t, chunk_tokens=3)
    assert seen[:3] == [(torch.bfloat16, torch.bfloat16)] * 3
    assert seen[3:] == [(torch.float32, torch.float32)] * 3


# ---- property ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2).map(tuple),
    d=st.integers(1, 6),
    vocab=st.integers(1, 9),
    chunk=st.one_of(st.none(), st.integers(1, 12)),
    ignore=st.sampled_from([0.0, 0.3, 1.0]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference_float64(lead, d, vocab, chunk, ignore, bias, seed) -> None:
    h, w, b, t = make(lead, d, vocab, dtype=torch.float64, bias=bias, ignore=ignore, seed=seed)
    loss = linear_cross_entropy(h, w, t, bias=b, chunk_tokens=chunk)
    got = grads(loss, (h, w, b))
    if bool((t != -100).any()):
        expected = reference(h, w, b, t)
        want = grads(expected, (h, w, b))
        assert abs(loss.item() - expected.item()) <= 1e-12 * max(1.0, abs(expected.item()))
    else:  # documented choice: 0, not NaN
        assert loss.item() == 0.0
        want = [torch.zeros_like(x) for x in (h, w, b) if x is not None]
    for g, ref in zip(got, want, strict=True):
        assert (g - ref).abs().max().item() <= 1e-12 if g.numel() else True
