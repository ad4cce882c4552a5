"""FP4 training on CUDA: the Triton quantization kernels are bit for bit the reference, the
input-gradient kernel matches fp64, and FP4 layers train through both paths.

Skipped without a CUDA device (the CPU tests of the same ops run the reference)."""

from __future__ import annotations

import os

import pytest
import torch

import apt_model.fp4.layer as fl
from apt_model.fp4.format import fake_quantize_fp4, quantize_fp4
from apt_model.fp4.layer import FP4Linear
from apt_model.fp4.ops import fp4_fake_quantize, fp4_grad_input, fp4_quantize, triton_available

FORMATS = ("nvfp4", "mxfp4")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available("cuda")),
                                reason="needs CUDA (sm80+) and Triton")


def _seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def _weights(shape, dtype):
    """Values over 12 decades, exact zeros of both signs, and ties of the E2M1 grid."""
    w = torch.randn(*shape, device="cuda") * torch.logspace(-6, 6, shape[-1], device="cuda")
    flat = w.view(-1)
    flat[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    flat[16:32] = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25,
                                -1.75, -2.5, -3.5, -5, 1], dtype=torch.float32) / 6 * 448 * 6
    return w.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 256), (33, 200), (3, 7, 1056)])
def test_quantize_kernel_is_the_reference_bit_for_bit(fmt, dtype, shape):
    seed = _seed()
    w = _weights(shape, dtype)
    q, r = fp4_quantize(w, fmt), quantize_fp4(w, fmt)
    assert torch.equal(q.packed, r.packed), seed
    assert torch.equal(_bits(q.scales), _bits(r.scales)), seed
    if fmt == "nvfp4":
        assert torch.equal(q.tensor_scale, r.tensor_scale), seed
    for out_dtype in (dtype, torch.float32, torch.bfloat16):
        got = fp4_fake_quantize(w, fmt, out_dtype)
        want = fake_quantize_fp4(w.float(), fmt).to(out_dtype)
        assert got.shape == w.shape and got.dtype == out_dtype
        assert torch.equal(_bits(got), _bits(want)), (seed, out_dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_kernel_special_values(fmt):
    w = torch.randn(6, 64, device="cuda")
    w[0, 3] = float("nan")
    w[1, 0] = float("inf")
    w[2] = 0.0
    w[3, 5] = 1e-40
    w[4, :16] = -0.0
    q, r = fp4_quantize(w, fmt), quantize_fp4(w, fmt)
    assert torch.equal(q.packed, r.packed)
    assert torch.equal(_bits(q.scales), _bits(r.scales))
    got, want = fp4_fake_quantize(w, fmt), fake_quantize_fp4(w, fmt)  # fp32: the same
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(_bits(torch.nan_to_num(got)), _bits(torch.nan_to_num(want)))
    zero = torch.zeros(8, 32, device="cuda")
    assert torch.equal(fp4_quantize(zero, fmt).packed, quantize_fp4(zero, fmt).packed)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grad_input_matches_fp64(fmt, m, dtype):
    seed = _seed()
    w = quantize_fp4(torch.randn(328, 1040, device="cuda"), fmt)
    grad = torch.randn(m, 328, device="cuda").to(dtype)
    out = fp4_grad_input(grad, w)
    assert out.shape == (m, 1040) and out.dtype == dtype
    ref = grad.double() @ w.dequantize(torch.float64)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2, seed


@pytest.mark.parametrize("split", [1, 3, 8])
def test_grad_input_kernel_split_variants(split):
    seed = _seed()
    w = quantize_fp4(torch.randn(1000, 512, device="cuda"), "nvfp4")
    grad = torch.randn(5, 1000, device="cuda", dtype=torch.bfloat16)
    from apt_model.fp4.triton_matmul import fp4_grad_input as grad_input_kernel

    out = grad_input_kernel(grad, w.packed, w.scales, w.tensor_scale, 512, split_n=split)
    ref = grad.double() @ w.dequantize(torch.float64)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2, seed


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_view_quantizes_as_its_contiguous_copy(fmt, dtype):
    """A GPT-2 Conv1D's [in, out] weight is quantized through its [out, in] view ``w.t()``."""
    seed = _seed()
    w = _weights((96, 1056), dtype).t()
    c = w.contiguous()
    q, r = fp4_quantize(w, fmt), fp4_quantize(c, fmt)
    assert torch.equal(q.packed, r.packed) and torch.equal(_bits(q.scales), _bits(r.scales)), seed
    assert torch.equal(_bits(fp4_fake_quantize(w, fmt, torch.bfloat16)),
                       _bits(fp4_fake_quantize(c, fmt, torch.bfloat16))), seed


def _layer_grads(layer, x, env=None):
    layer.weight.grad = None
    layer.bias.grad = None
    x = x.detach().requires_grad_(True)
    old = os.environ.get("VB_FP4_TRITON")
    if env is not None:
        os.environ["VB_FP4_TRITON"] = env
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
        out.float().pow(2).mean().backward()
    finally:
        if env is not None:
            if old is None:
                os.environ.pop("VB_FP4_TRITON")
            else:
                os.environ["VB_FP4_TRITON"] = old
    return out, x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fused", [True, False])
def test_fp4_layer_training_paths_on_cuda(fmt, fused, monkeypatch):
    """The fused path (few rows) and the Triton fake quantization + cuBLAS against the
    reference path (PyTorch fake quantization + cuBLAS, VB_FP4_TRITON=0)."""
    seed = _seed()
    if fused:  # the layer is small: lower the size from which training takes the fused path
        monkeypatch.setattr(fl, "FUSED_TRAIN_MIN_WEIGHTS", 0)
    calls = []
    real = fl.fused_training_linear
    monkeypatch.setattr(fl, "fused_training_linear", lambda *a: calls.append(1) or real(*a))
    layer = FP4Linear(torch.nn.Linear(512, 768, device="cuda"), fmt).train()
    x = torch.randn(16 if fused else 4096, 512, device="cuda")
    got = _layer_grads(layer, x)
    assert bool(calls) == fused
    want = _layer_grads(layer, x, env="0")
    if not fused:  # the same fake-quantized bf16 weight, the same cuBLAS calls
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), seed
    else:
        for a, b in zip(got, want, strict=True):
            err = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert err <= 1e-2, (seed, err)


@pytest.mark.parametrize("fused", [True, False])
def test_conv1d_layer_trains_as_the_linear_of_its_transposed_weight_on_cuda(fused, monkeypatch):
    """Both CUDA training paths give a GPT-2 Conv1D's FP4 layer exactly what an nn.Linear's
    holding the transposed weight gets, its weight gradient transposed back to [in, out]."""
    transformers = pytest.importorskip("transformers")
    seed = _seed()
    if fused:
        monkeypatch.setattr(fl, "FUSED_TRAIN_MIN_WEIGHTS", 0)
    conv = transformers.pytorch_utils.Conv1D(768, 512).cuda()
    linear = torch.nn.Linear(512, 768, device="cuda")
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    x = torch.randn(16 if fused else 4096, 512, device="cuda")
    got = _layer_grads(FP4Linear(conv).train(), x)
    want = _layer_grads(FP4Linear(linear).train(), x)
    assert got[2].shape == (512, 768)
    for a, b in zip(got, (want[0], want[1], want[2].t(), want[3]), strict=True):
        assert torch.equal(a, b), seed


def test_fused_path_trains_a_model_on_cuda(monkeypatch):
    """Speed mode with batches of 16 rows through the fused path: the loss falls."""
    import apt_model.optimization.vb_global as vb
    from apt_model.modeling.apt_model import APTConfig, APTModel

    monkeypatch.setattr(fl, "FUSED_TRAIN_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    vb.enable(mode="speed", verbose=False)
    try:
        model = APTModel(APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64)).cuda()
    finally:
        vb.disable()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, model.config.vocab_size, (2, 8), device="cuda")
    losses = []
    for _ in range(40):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
