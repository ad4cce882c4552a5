"""A CUDA target's trace runs the ops CUDA autocast runs in fp32 in fp32 (``cuda_autocast``),
checked against CUDA autocast's own kernels on fake CUDA tensors (no GPU needed)."""

from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from apt_model.estimator import MemoryTracker, estimate
from apt_model.estimator.cuda_autocast import cuda_autocast, cuda_autocast_on, cuda_only_ops


def gpt2_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """GPT-2's MLP as transformers writes it (LayerNorm, Conv1D's addmm, the tanh GELU of
    ``NewGELUActivation``), then a log-softmax and a sum."""
    h = F.layer_norm(x, (x.size(-1),))
    h = torch.addmm(b1, h.view(-1, x.size(-1)), w1)
    h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
    return torch.log_softmax(h @ w2, -1).sum()


def traced(device: str, autocast: contextlib.AbstractContextManager) -> tuple[int, torch.dtype]:
    """Peak bytes and result dtype of ``gpt2_mlp`` on fake tensors of ``device`` (no grad: the
    CPU-only build cannot record autograd on CUDA tensors, fake or not)."""
    with FakeTensorMode():
        x, w1, b1, w2 = (torch.empty(*shape, device=device) for shape in ((64, 32), (32, 128), (128,), (128, 32)))
        with MemoryTracker() as tracker:
            tracker.add([x, w1, b1, w2])
            with autocast:
                out = gpt2_mlp(x, w1, b1, w2)
    return tracker.peak, out.dtype


@contextlib.contextmanager
def cpu_autocast(as_on_cuda: bool):
    with cuda_autocast() if as_on_cuda else contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def test_cpu_trace_allocates_what_cuda_autocast_allocates():
    reference = traced("cuda", cuda_autocast_on(torch.bfloat16))  # CUDA autocast's own kernels
    assert traced("cpu", cpu_autocast(as_on_cuda=True)) == reference
    cpu_lists = traced("cpu", cpu_autocast(as_on_cuda=False))
    assert cpu_lists[0] < reference[0] and cpu_lists[1] == torch.bfloat16  # CPU autocast keeps bf16 there


def test_the_ops_come_from_the_dispatcher_and_every_function_is_restored():
    ops = cuda_only_ops()
    assert {"pow", "softmax", "layer_norm", "exp", "sum"} <= ops and "mm" not in ops and "linear" not in ops
    before = (torch.pow, torch.Tensor.__pow__, F.layer_norm, "pow" in torch.Tensor.__dict__)
    with cuda_autocast():
        assert torch.pow is not before[0]
    assert (torch.pow, torch.Tensor.__pow__, F.layer_norm, "pow" in torch.Tensor.__dict__) == before


def test_a_cuda_target_gpt2_keeps_its_gelu_in_fp32(monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=128)

    def activations() -> int:
        return estimate(cfg, mode="balanced", batch=2, seq=128, optimizer="sgd", device="cuda").activations

    as_on_cuda = activations()
    monkeypatch.setattr(sys.modules["apt_model.estimator.estimate"], "cuda_autocast", contextlib.nullcontext)
    # the tanh GELU's intermediates: fp32 on a card; each layer keeps a few of them (b × s × 4h)
    assert as_on_cuda - activations() >= 2 * 2 * 2 * 128 * 4 * 128 * 2
