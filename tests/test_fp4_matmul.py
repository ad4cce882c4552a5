"""fp4_linear: the reference path, the custom op's tracing, the kernel plan, and (on CUDA) the
Triton kernels, each pinned through a ``KernelPlan``.

Every comparison is against fp64 ``x @ dequant(W)^T (+ bias)`` on fresh random inputs, by
relative error ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from apt_model.fp4.format import FP4_FORMATS, quantize_fp4
from apt_model.fp4.kernel_plan import (
    DECODE_PINNED_M,
    KernelPlan,
    candidate_configs,
    chosen_large_kernels,
    fixed_config,
    plan,
)
from apt_model.fp4.layer import FP4Linear
from apt_model.fp4.ops import (
    fp4_linear,
    fp4_linear_reference,
    fp4_rms_norm_linear,
    triton_available,
)
from apt_model.ops.decoder import rms_norm
from apt_model.ops.triton_launch import interpreting

FORMATS = ("nvfp4", "mxfp4")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not (CUDA and triton_available("cuda")),
                                  reason="needs CUDA (sm80+) and Triton")


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch: pytest.MonkeyPatch):
    """One config per kernel: the GPU tests compile a few kernels, not every tuning candidate."""
    monkeypatch.setenv("VB_FP4_AUTOTUNE", "0")


def _seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def _problem(m, n, k, fmt, dtype, device, bias=True, lead=()):
    w = quantize_fp4(torch.randn(n, k, device=device), fmt)
    x = torch.randn(*lead, m, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _ref64(x, w, b):
    ref = x.double() @ w.dequantize(torch.float64).T
    return ref if b is None else ref + b.double()


def _rel(out, ref) -> float:
    assert not torch.isnan(out).any(), "NaN in output (an element left unwritten?)"
    return ((out.double() - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- reference (CPU)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [64, 200])  # a whole number of blocks, and padded
def test_reference_matches_fp64(fmt, dtype, k):
    seed = _seed()
    x, w, b = _problem(5, 24, k, fmt, dtype, "cpu", lead=(2,))
    out = fp4_linear(x, w, b)
    assert out.shape == (2, 5, 24) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out, _ref64(x, w, b)) < tol, seed
    torch.testing.assert_close(out, fp4_linear_reference(x, w, b))


def test_fp4_linear_checks_features():
    w = quantize_fp4(torch.randn(8, 32), "nvfp4")
    with pytest.raises(ValueError, match="features"):
        fp4_linear(torch.randn(2, 31), w)


def test_triton_not_used_off_cuda():
    assert not triton_available("cpu")


def test_importing_the_package_and_running_the_ops_off_cuda_imports_no_kernels():
    script = textwrap.dedent("""
        import sys, torch
        import apt_model, apt_model.fp4, apt_model.fp4.format
        from apt_model.fp4 import FP4Linear, fp4_linear, plan, quantize_fp4
        w = quantize_fp4(torch.randn(8, 32), "nvfp4")
        fp4_linear(torch.randn(2, 32), w)
        FP4Linear(torch.nn.Linear(32, 8))(torch.randn(2, 32)).sum().backward()
        plan(4096, 8, 32)
        # the kernel modules are the package's only way to Triton (torch may import it itself)
        print(sorted(m for m in sys.modules if m.startswith("apt_model.fp4.triton_")))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_plan_names_the_default_kernel_and_fixed_config(monkeypatch):
    monkeypatch.setenv("VB_FP4_AUTOTUNE", "1")
    small = candidate_configs("small")[0]
    assert plan(1, 4096, 4096) == KernelPlan("gemv")
    assert plan(2, 4096, 4096) == KernelPlan("small", config=small)
    assert plan(DECODE_PINNED_M, 4096, 4096).config == small
    assert plan(DECODE_PINNED_M + 1, 4096, 4096) == KernelPlan("small")
    assert plan(64, 4096, 4096).kernel == "small" and plan(65, 4096, 4096).kernel != "small"
    big = plan(4096, 28672, 8192, device="cpu")
    # measured at the first call on a GPU; Triton's interpreter always takes the chunked path
    assert big == KernelPlan("chunked" if interpreting() else "large")
    assert plan(4096, 28672, 8192, device="cpu", dtype=torch.float32) == KernelPlan(
        "gemm", config=None)
    monkeypatch.setenv("VB_FP4_LARGE_KERNEL", "chunked")
    assert plan(4096, 28672, 8192, device="cpu").kernel == "chunked"
    monkeypatch.delenv("VB_FP4_LARGE_KERNEL")
    monkeypatch.setenv("VB_FP4_AUTOTUNE", "0")  # every kernel runs its first config
    assert plan(1, 4096, 4096).config == candidate_configs("gemv")[0]
    assert plan(40, 4096, 4096).config == small
    assert plan(4096, 28672, 8192, device="cpu") == KernelPlan("chunked")
    assert fixed_config("gemm", 4096) == candidate_configs("gemm")[0]
    assert isinstance(chosen_large_kernels(), dict)


def test_kernel_plan_checks_its_fields():
    with pytest.raises(ValueError, match="unknown FP4 kernel"):
        KernelPlan("fast")
    with pytest.raises(ValueError, match="split_k"):
        KernelPlan("gemv", split_k=0)
    configs = candidate_configs("gemm")
    configs[0]["BLOCK_M"] = 1  # a copy
    assert candidate_configs("gemm")[0]["BLOCK_M"] != 1
    assert candidate_configs("chunked") == []


# --------------------------------------------------------------------------- the custom op


def _args(x, w, b):
    """The ``apt_model::fp4_linear`` arguments of ``fp4_linear(x, w, b)``: the format as its
    index in FP4_FORMATS, MXFP4's missing tensor scale as an empty fp32 tensor."""
    ts = w.tensor_scale if w.tensor_scale is not None else torch.empty(0, device=x.device)
    return (x, w.packed, w.scales, ts, FP4_FORMATS.index(w.fmt), w.shape[-1], b)


def _op_args(fmt, device="cpu", bias=True):
    x, w, b = _problem(3, 16, 64, fmt, torch.float32, device, bias=bias)
    return _args(x, w, b), w


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    args, _ = _op_args(fmt)
    args[0].requires_grad_(True)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic"]
    if fmt == "nvfp4":  # SchemaCheckMode compares inputs with allclose: no float8 kernel on CPU
        utils.remove("test_schema")
    torch.library.opcheck(torch.ops.apt_model.fp4_linear.default, args, test_utils=utils)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_shapes(fmt):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, _ = _op_args(fmt)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake[0] = torch.empty(4, 7, 64)
        out = torch.ops.apt_model.fp4_linear(*fake)
    assert out.shape == (4, 7, 16) and out.dtype == torch.float32


@pytest.mark.parametrize("fmt", FORMATS)
def test_compile_fullgraph_no_break(fmt):
    _, w = _op_args(fmt)
    bias = torch.randn(16)

    def f(x):
        return torch.relu(fp4_linear(x, w, bias)) * 2

    x = torch.randn(2, 5, 64)
    explanation = torch._dynamo.explain(f)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def _norm_inputs(fmt, n, k, dtype, device, bias=True):
    """A weight, a norm's input row (of several magnitudes) and weight, a bias."""
    x, w, b = _problem(1, n, k, fmt, dtype, device, bias=bias)
    scale = torch.logspace(-2, 2, k, device=device)[torch.randperm(k, device=device)]
    norm_weight = (1 + torch.rand(k, device=device)).to(dtype)
    return w, b, (x * scale).to(dtype), norm_weight


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_linear_is_the_norm_then_the_product(fmt, dtype):
    """Off CUDA (and for several rows anywhere) the op runs the norm, then the product: bit
    for bit the two in turn."""
    w, b, x, norm_weight = _norm_inputs(fmt, 24, 64, dtype, "cpu")
    for rows in (x, x.expand(3, -1).contiguous()):
        assert torch.equal(fp4_rms_norm_linear(rows, norm_weight, 1e-5, w, b),
                           fp4_linear(rms_norm(rows, norm_weight, 1e-5), w, b))
    with pytest.raises(ValueError, match="features"):
        fp4_rms_norm_linear(x[:, :32], norm_weight[:32], 1e-5, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rms_norm_linear_opcheck(fmt):
    w, b, x, norm_weight = _norm_inputs(fmt, 16, 64, torch.float32, "cpu")
    ts = w.tensor_scale if w.tensor_scale is not None else torch.empty(0)
    args = (x, norm_weight, 1e-5, w.packed, w.scales, ts, FP4_FORMATS.index(fmt), 64, b)
    utils = ["test_schema", "test_faketensor", "test_aot_dispatch_dynamic"]
    if fmt == "nvfp4":  # SchemaCheckMode compares inputs with allclose: no float8 kernel on CPU
        utils.remove("test_schema")
    torch.library.opcheck(torch.ops.apt_model.fp4_rms_norm_linear.default, args, test_utils=utils)


def test_backward_matches_reference():
    x, w, b = _problem(4, 16, 96, "nvfp4", torch.float32, "cpu")
    x.requires_grad_(True)
    b.requires_grad_(True)
    fp4_linear(x, w, b).pow(2).sum().backward()
    gx, gb = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    wd = w.dequantize(torch.float32)
    torch.nn.functional.linear(x, wd, b).pow(2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gb, b.grad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_ops_opcheck(fmt):
    """The quantize, fake-quantize and input-gradient ops: schema, fake kernels, tracing."""
    w = torch.randn(16, 40)
    code = FP4_FORMATS.index(fmt)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic"]
    if fmt == "nvfp4":
        utils.remove("test_schema")
    torch.library.opcheck(torch.ops.apt_model.fp4_quantize.default, (w, code), test_utils=utils)
    torch.library.opcheck(torch.ops.apt_model.fp4_fake_quantize.default,
                          (w, code, torch.bfloat16), test_utils=utils)
    (_, packed, scales, ts, *_), q = _op_args(fmt)
    grad = torch.randn(2, 3, 16)
    torch.library.opcheck(torch.ops.apt_model.fp4_grad_input.default,
                          (grad, packed, scales, ts, code, 64), test_utils=utils)


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_ops_match_the_reference(fmt):
    from apt_model.fp4.format import fake_quantize_fp4
    from apt_model.fp4.ops import fp4_fake_quantize, fp4_grad_input, fp4_quantize

    w = torch.randn(24, 200)
    q, r = fp4_quantize(w, fmt), quantize_fp4(w, fmt)
    assert torch.equal(q.packed, r.packed)
    assert torch.equal(q.scales.view(torch.uint8), r.scales.view(torch.uint8))
    assert q.shape == r.shape and (q.tensor_scale is None) == (fmt == "mxfp4")
    assert torch.equal(fp4_fake_quantize(w, fmt, torch.bfloat16),
                       fake_quantize_fp4(w, fmt).bfloat16())
    grad = torch.randn(3, 24)
    torch.testing.assert_close(fp4_grad_input(grad, q), grad @ r.dequantize())


# --------------------------------------------------------------------------- Triton, CPU interpreter


def interpreter_usable() -> bool:
    """Triton installs on this CPU machine and its interpreter runs here (numpy < 2.4)."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("numpy") is None:
        return False
    import numpy

    return tuple(int(part) for part in numpy.__version__.split(".")[:2]) < (2, 4)


needs_interpreter = pytest.mark.skipif(
    not interpreter_usable(), reason="needs triton and numpy < 2.4 (the test extras bring both on Linux x86-64)")


def split_gemv_and_its_parts(x, w, b, split: int, config: dict):
    """(the split-K GEMV of the one row ``x``, the sum in split order of each split's own
    product), both fp32: a split's product is the unsplit GEMV of ``x`` zeroed outside that
    split's K range, with the bias in split 0's. Equal bit for bit when the GEMV adds its
    partial sums in split order (zeros add nothing to a program's accumulator)."""
    import torch

    from apt_model.fp4.kernel_plan import KernelPlan
    from apt_model.fp4.triton_matmul import _as_words, _k_splits, fp4_matmul

    n, k = w.shape
    splits, k_split = _k_splits(n, _as_words(w.packed).shape[1], x.device, "gemv", config, split)
    assert splits == split

    def gemv(row, bias, split_k):
        return fp4_matmul(row, w.packed, w.scales, w.tensor_scale, k, bias,
                          plan=KernelPlan("gemv", config=config, split_k=split_k))

    row, bias = x.float(), b.float()
    total = torch.zeros(1, n, device=x.device)
    for i in range(splits):
        part = torch.zeros_like(row)
        lo, hi = 8 * k_split * i, min(8 * k_split * (i + 1), k)
        part[:, lo:hi] = row[:, lo:hi]
        total += gemv(part, bias if i == 0 else None, 1)
    return gemv(row, bias, split), total


def run_in_interpreter(script: str, timeout: int = 900) -> None:
    """Run ``script`` in a new Python with ``TRITON_INTERPRET=1``; it must print OK."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@needs_interpreter
def test_triton_kernels_in_interpreter():
    """Every Triton kernel once, on CPU through Triton's interpreter: the matmul kernels'
    tiling, masks and split-K (the pure-Triton decode; no PTX), the input-gradient kernel, and
    the quantize kernels bit for bit against the PyTorch reference."""
    script = textwrap.dedent(inspect.getsource(split_gemv_and_its_parts)) + textwrap.dedent("""
        import torch
        from apt_model.fp4.format import fake_quantize_fp4, quantize_fp4
        from apt_model.fp4.kernel_plan import KernelPlan
        from apt_model.fp4 import triton_matmul
        from apt_model.fp4.triton_matmul import MatProduct, fp4_dequantize, fp4_grad_input, fp4_matmul
        from apt_model.fp4.triton_quantize import fake_quantize_fp4_triton, quantize_fp4_triton
        cases = [("gemv", dict(BLOCK_N=16, BLOCK_K=64), 1, None),
                 ("gemv", dict(BLOCK_N=16, BLOCK_K=64), 1, 3),
                 ("small", dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SWAP=True), 3, None),
                 ("small", dict(BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SWAP=False), 17, 2),
                 ("gemm", dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SWAP=False), 70, None),
                 ("chunked", None, 70, None)]
        for fmt in ("nvfp4", "mxfp4"):
            for kernel, cfg, m, split in cases:
                for k in (200, 1056):
                    w = quantize_fp4(torch.randn(40, k), fmt)
                    x = torch.randn(m, k).bfloat16()
                    b = torch.randn(40).bfloat16()
                    plan = KernelPlan(kernel, config=cfg, split_k=split, chunk_rows=16)
                    out = fp4_matmul(x, w.packed, w.scales, w.tensor_scale, k, b, plan=plan)
                    ref = x.double() @ w.dequantize(torch.float64).T + b.double()
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    assert err < 1e-2, (fmt, kernel, m, k, split, err)
            for n, k, split in ((40, 1056, 3), (72, 520, 2)):  # split-K: its partials in order
                w = quantize_fp4(torch.randn(n, k), fmt)
                got, want = split_gemv_and_its_parts(torch.randn(1, k), w, torch.randn(n), split,
                                                     dict(BLOCK_N=16, BLOCK_K=64))
                assert torch.equal(got, want), (fmt, "split-K order", n, k, split)
            for k in (200, 33):  # into a strided fp32 buffer, an odd width too: bit for bit
                w = quantize_fp4(torch.randn(40, k) * 3, fmt)
                big = torch.full((40, k + 8), float("nan"))
                fp4_dequantize(w.packed, w.scales, w.tensor_scale, k, out=big[:, 3:3 + k])
                assert torch.equal(big[:, 3:3 + k], w.dequantize(torch.float32)), (fmt, k)
                assert big[:, :3].isnan().all() and big[:, 3 + k:].isnan().all(), (fmt, k)
            # Rows of two layers with their own NVFP4 tensor scales, multiplied at once (the
            # fused q/k/v product): each output column equals its own layer's product.
            parts = [quantize_fp4(torch.randn(n, 200) * s, fmt) for n, s in ((24, 1.0), (40, 9.0))]
            x = torch.randn(1, 200).bfloat16()
            ts = (torch.cat([p.tensor_scale.reshape(1).expand(p.shape[0]) for p in parts])
                  .reshape(-1, 1) if fmt == "nvfp4" else None)
            for kernel, m in (("gemv", 1), ("small", 5), ("chunked", 70)):
                xm = x.expand(m, -1).contiguous()
                plan = KernelPlan(kernel, chunk_rows=16)
                fused = fp4_matmul(xm, torch.cat([p.packed for p in parts]),
                                   torch.cat([p.scales for p in parts]), ts, 200, plan=plan)
                alone = torch.cat([fp4_matmul(xm, p.packed, p.scales, p.tensor_scale, 200,
                                              plan=plan) for p in parts], dim=-1)
                assert torch.allclose(fused.float(), alone.float(), rtol=1e-2, atol=1e-2), (fmt, kernel)
            for m, split in ((1, None), (17, 3)):
                w = quantize_fp4(torch.randn(300, 200), fmt)
                g = torch.randn(m, 300).bfloat16()
                out = fp4_grad_input(g, w.packed, w.scales, w.tensor_scale, 200, split_n=split)
                ref = g.double() @ w.dequantize(torch.float64)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (fmt, "grad_input", m, split, err)
            for m in (5, 70):  # prepared products of several rows: the first call's result again
                w = quantize_fp4(torch.randn(40, 200), fmt)
                x, b = torch.randn(m, 200).bfloat16(), torch.randn(40).bfloat16()
                product = MatProduct(w.packed, w.scales, w.tensor_scale, 200, m, torch.bfloat16, True)
                first = product(x, b)
                assert torch.equal(product(x, b), first), (fmt, "prepared", m)
            # ... and over three slices of 256, 256 and 88 weight rows: the chunked path's bits
            triton_matmul.CHUNK_BYTES = 256 * 200 * 2
            w = quantize_fp4(torch.randn(600, 200), fmt)
            x, b = torch.randn(70, 200).bfloat16(), torch.randn(600).bfloat16()
            want = fp4_matmul(x, w.packed, w.scales, w.tensor_scale, 200, b,
                              plan=KernelPlan("chunked", chunk_rows=256))
            product = MatProduct(w.packed, w.scales, w.tensor_scale, 200, 70, torch.bfloat16, True)
            for _ in range(2):
                assert torch.equal(product(x, b), want), (fmt, "prepared slices")
            triton_matmul.CHUNK_BYTES = 128 * 2**20
            w = torch.randn(48, 200) * 3
            ref = quantize_fp4(w, fmt)
            got = quantize_fp4_triton(w, fmt)
            assert torch.equal(got.packed, ref.packed), (fmt, "quantize codes")
            assert torch.equal(got.scales.view(torch.uint8), ref.scales.view(torch.uint8)), (fmt, "scales")
            # in fp32: the interpreter's own bf16 cast is not the hardware's (the GPU tests check bf16)
            fake = fake_quantize_fp4_triton(w, fmt, torch.float32)
            assert torch.equal(fake, fake_quantize_fp4(w, fmt)), (fmt, "fake quantize")
            # The GEMV normalizing its row (RMSNorm) itself; a split asked for is not taken
            w = quantize_fp4(torch.randn(40, 1056), fmt)
            x = torch.randn(1, 1056) * torch.logspace(-2, 2, 1056)
            nw = 1 + torch.rand(1056)
            ref = (x * torch.rsqrt(x.pow(2).mean() + 1e-5) * nw).double() @ w.dequantize(torch.float64).T
            for split in (None, 3):
                product = triton_matmul.RowProduct(
                    w.packed, w.scales, w.tensor_scale, 1056, torch.float32, False,
                    config=dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1),
                    split_k=split, norm=True, eps=1e-5)
                assert product.split == 1
                err = ((product(x, None, u=nw).double() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (fmt, "norm", split, err)
        print("OK")
    """)
    run_in_interpreter(script)


# --------------------------------------------------------------------------- Triton on CUDA


def _captured(run):
    """``run`` warmed up on a side stream, then captured: (graph, the graph's output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def _matmul(x, w, b=None, **plan):
    """The Triton launcher on ``w``'s tensors; ``plan`` fields pin a kernel and variant."""
    from apt_model.fp4.triton_matmul import fp4_matmul

    out = plan.pop("out", None)
    return fp4_matmul(x, w.packed, w.scales, w.tensor_scale, w.shape[-1], b, out=out,
                      plan=KernelPlan(**plan) if plan else None)


def _run_poisoned(x, w, b, **plan):
    """The Triton path writing into a NaN-filled output, so unwritten elements show up."""
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    _matmul(x, w, b, out=out, **plan)
    return out


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("k", [512, 1040])  # whole blocks, and padded (1040 = 32 * 32.5)
def test_triton_matches_fp64(fmt, m, k):
    seed = _seed()
    x, w, b = _problem(m, 328, k, fmt, torch.bfloat16, "cuda")
    err = _rel(_run_poisoned(x, w, b), _ref64(x, w, b))
    assert err <= 1e-2, (seed, err)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemv_activation_magnitudes(fmt, dtype):
    """The GEMV sums products in fp16 after scaling x per 16 values: huge, tiny and mixed
    magnitudes (an outlier group next to small ones) stay within the bf16 tolerance."""
    seed = _seed()
    half = dtype == torch.float16  # the output must fit fp16 too
    x, w, b = _problem(1, 300, 1040, fmt, torch.float32, "cuda", bias=False)
    n_groups = x.shape[1] // 16 + 1
    groups = torch.logspace(-4 if half else -6, 2 if half else 5, n_groups, device="cuda")
    groups = groups[torch.randperm(n_groups, device="cuda")].repeat_interleave(16)
    cases = {"huge": x * (30 if half else 1e30), "tiny": x * (1e-3 if half else 1e-30),
             "mixed": x * groups[: x.shape[1]]}
    for name, xc in cases.items():
        xc = xc.to(dtype)
        err = _rel(_run_poisoned(xc, w, None, kernel="gemv"), _ref64(xc, w, None))
        assert err <= 1e-2, (seed, name, err)


@needs_triton
def test_gemv_inf_and_nan_propagate():
    x, w, _ = _problem(1, 64, 512, "nvfp4", torch.bfloat16, "cuda", bias=False)
    x[0, 37] = float("inf")
    out = _matmul(x, w, kernel="gemv")
    ref = x.double() @ w.dequantize(torch.float64).T
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(out.isnan(), ref.isnan())
    x[0, 37] = float("nan")
    assert _matmul(x, w, kernel="gemv").isnan().all()


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "k"), [(328, 1040), (256, 8192)])  # the second splits K
def test_prepared_row_product_is_the_gemv(fmt, n, k):
    """Eager one-row ``fp4_linear`` keeps its product on the weight and, after the first
    call, launches the compiled kernels directly: bit for bit the plain GEMV, for new
    values, a row at an address not 16-byte aligned, another stream, and no bias."""
    seed = _seed()
    x, w, b = _problem(1, n, k, fmt, torch.bfloat16, "cuda")
    with torch.inference_mode():
        want = _matmul(x, w, b, kernel="gemv")
        for _ in range(3):
            torch.testing.assert_close(fp4_linear(x, w, b), want, rtol=0, atol=0)
        (product,) = w.kernels.values()
        assert product.launch is not None, seed
        x2 = torch.randn_like(x)
        torch.testing.assert_close(fp4_linear(x2, w, b), _matmul(x2, w, b, kernel="gemv"),
                                   rtol=0, atol=0)
        shifted = torch.empty(k + 1, dtype=x.dtype, device="cuda")[1:].view(1, k)
        shifted.copy_(x)
        torch.testing.assert_close(fp4_linear(shifted, w, b), want, rtol=0, atol=0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fp4_linear(x, w, b)
        torch.cuda.current_stream().wait_stream(stream)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        for _ in range(2):
            torch.testing.assert_close(fp4_linear(x, w), _matmul(x, w, kernel="gemv"),
                                       rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(328, 1040), (256, 8192)])  # the plain GEMV splits the second
def test_gemv_normalizing_its_row(fmt, dtype, n, k):
    """The GEMV making the RMSNorm of its row: within the norm formula's roundings of the
    GEMV of the norm kernel's row (and as close to the fp64 truth), through the public
    function (the kept product after the first call), the custom op (compiled graphs) and a
    CUDA graph; never split over K."""
    seed = _seed()
    w, b, x, norm_weight = _norm_inputs(fmt, n, k, dtype, "cuda")
    truth = (x.double() * torch.rsqrt(x.double().pow(2).mean() + 1e-5) * norm_weight.double()) \
        @ w.dequantize(torch.float64).T
    with torch.inference_mode():
        for bias in (None, b):
            want = fp4_linear(rms_norm(x, norm_weight, 1e-5), w, bias)
            for _ in range(2):
                got = fp4_rms_norm_linear(x, norm_weight, 1e-5, w, bias)
                torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
            exact = truth if bias is None else truth + bias.double()
            assert _rel(got, exact) <= 1.5 * _rel(want, exact) + 1e-3, seed
        ts = w.tensor_scale if w.tensor_scale is not None else torch.empty(0, device="cuda")
        op = torch.ops.apt_model.fp4_rms_norm_linear(x, norm_weight, 1e-5, w.packed, w.scales, ts,
                                                     FP4_FORMATS.index(fmt), k, b)
        assert torch.equal(op, got), seed
        graph, out = _captured(lambda: fp4_rms_norm_linear(x, norm_weight, 1e-5, w, b))
        x.copy_(x.flip(-1))
        graph.replay()
        assert torch.equal(out, fp4_rms_norm_linear(x, norm_weight, 1e-5, w, b)), seed
        assert all(p.split == 1 for key, p in w.kernels.items() if "rms_norm" in key)


def test_prepared_products_of_several_rows_are_kept_per_row_count_and_bounded(monkeypatch):
    """One prepared product per (row count, dtype, bias) on the weight; past
    ``_MAT_PRODUCTS_KEPT`` row counts (a server's prompt lengths) the kept ones are dropped."""
    import apt_model.fp4.ops as ops

    made = []

    class Kernels:
        class MatProduct:
            def __init__(self, *args):
                made.append(args[4])  # the row count

    monkeypatch.setattr(ops, "triton_available", lambda device: True)
    monkeypatch.setattr(ops, "_matmul_kernels", lambda: Kernels)
    w = quantize_fp4(torch.randn(8, 32), "nvfp4")
    x = torch.randn(1, 32).bfloat16()
    assert ops._mat_product(x, w, None, 3) is ops._mat_product(x, w, None, 3)
    assert ops._mat_product(x, w, None, 3) is not ops._mat_product(x, w, x[0, :8], 3)  # with bias
    for rows in range(4, 4 + ops._MAT_PRODUCTS_KEPT):
        ops._mat_product(x, w, None, rows)
    assert len([key for key in w.kernels if key[0] == "mat"]) <= ops._MAT_PRODUCTS_KEPT
    assert made[:2] == [3, 3] and len(made) == 2 + ops._MAT_PRODUCTS_KEPT


def test_bare_runner_binds_the_launchers_fixed_arguments(monkeypatch):
    """On a Triton version whose C launcher was checked, a compiled kernel is relaunched by
    one call of that launcher: grid, stream, function, the launcher's flags, no scratch, the
    packed metadata, no hooks, then the kernel's arguments. Triton 3.6 keeps the launch hooks
    in chains, empty by default: while a hook is in one (or set as a plain callable), the
    launch goes through Triton's own runner, which calls it. Kernels with scratch and other
    versions get Triton's runner only."""
    triton = pytest.importorskip("triton")
    from triton import knobs

    import apt_model.ops.triton_launch as tl_

    calls, hooked = [], []

    class Launcher:
        launch_cooperative_grid, launch_pdl = False, True
        global_scratch_size = profile_scratch_size = 0

        def launch(self, *args):
            calls.append(args)

    class Compiled:
        function, packed_metadata = "fn", "meta"
        run = Launcher()

        def __getitem__(self, grid):
            return lambda *args, stream=None: hooked.append((grid, args, stream))

    class Chain:  # Triton 3.6's HookChain: hooks in .calls
        def __init__(self) -> None:
            self.calls: list = []

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    enter, leave = Chain(), Chain()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", enter)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", leave)
    run = tl_._bare_runner(Compiled(), (4, 2, 1), 0)
    run("a", "b", stream=7)
    assert calls == [(4, 2, 1, 7, "fn", False, True, None, None, "meta", None, None, None, "a", "b")]
    leave.calls.append(print)  # a hook added after the runner was made
    run("a", "b", stream=7)
    assert len(calls) == 1 and hooked == [((4, 2, 1), ("a", "b"), 7)]
    leave.calls.clear()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    run("c", stream=8)
    assert len(calls) == 1 and hooked[-1] == ((4, 2, 1), ("c",), 8)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)  # no chain at all
    run("d", stream=9)
    assert len(calls) == 2 and calls[-1][-1] == "d"
    Compiled.run.global_scratch_size = 128
    assert tl_._bare_runner(Compiled(), (4, 2, 1), 0) is None
    Compiled.run.global_scratch_size = 0
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert tl_._bare_runner(Compiled(), (4, 2, 1), 0) is None


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [5, 300])  # the small kernel; large M (gemm or chunked, timed)
def test_prepared_products_of_several_rows_are_the_default_plan(fmt, m):
    """Eager ``fp4_linear`` of several rows keeps a product per row count on the weight:
    after the first call (the default plan, timing large M) the same kernel with its
    constants kept, bit for bit, for new values, with and without bias, 3-D input."""
    x, w, b = _problem(m, 2048, 1024, fmt, torch.bfloat16, "cuda")
    with torch.inference_mode():
        want = fp4_linear(x, w, b)
        assert [key[:2] for key in w.kernels] == [("mat", m)]
        for _ in range(2):
            torch.testing.assert_close(fp4_linear(x, w, b), want, rtol=0, atol=0)
        x2 = torch.randn_like(x)
        torch.testing.assert_close(fp4_linear(x2, w, b), _matmul(x2, w, b), rtol=0, atol=0)
        torch.testing.assert_close(fp4_linear(x2.view(1, m, -1), w), _matmul(x2, w).view(1, m, -1),
                                   rtol=0, atol=0)


@needs_triton
def test_gemv_replays_in_a_cuda_graph():
    """The GEMV (programmatic dependent launch on sm90+) inside one captured graph gives
    the eager result for new inputs."""
    x, w, b = _problem(1, 2048, 1024, "nvfp4", torch.bfloat16, "cuda")
    run = lambda: _matmul(x, w, b)  # noqa: E731
    run()
    graph, out = _captured(run)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, run(), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 7, 130])
def test_triton_other_dtypes(fmt, dtype, m):
    seed = _seed()
    x, w, b = _problem(m, 200, 336, fmt, dtype, "cuda")
    out = _run_poisoned(x, w, b)
    assert out.dtype == dtype
    assert _rel(out, _ref64(x, w, b)) <= 1e-2, seed


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kernel", ["gemv", "small", "gemm"])
def test_every_autotune_config(fmt, kernel):
    """Any config the autotuner may pick is correct (tails in N and K included)."""
    seed = _seed()
    m = {"gemv": 1, "small": 9, "gemm": 200}[kernel]
    x, w, b = _problem(m, 300, 1552, fmt, torch.bfloat16, "cuda")
    ref = _ref64(x, w, b)
    for meta in candidate_configs(kernel):
        err = _rel(_run_poisoned(x, w, b, kernel=kernel, config=meta), ref)
        assert err <= 1e-2, (seed, meta, err)


@needs_triton
def test_the_default_plan_is_what_runs(monkeypatch):
    """``plan()`` handed back to the launcher gives the default's bits; a large shape gets
    its kernel measured at the first call, and ``plan()`` names it from then on."""
    for m in (1, 9, 40, 200):
        x, w, b = _problem(m, 300, 1552, "nvfp4", torch.bfloat16, "cuda")
        p = plan(m, 300, 1552, device=x.device, dtype=x.dtype, fmt="nvfp4", bias=True)
        torch.testing.assert_close(_matmul(x, w, b), _matmul(x, w, b, **vars(p)), rtol=0,
                                   atol=0)
    monkeypatch.setenv("VB_FP4_AUTOTUNE", "1")  # measured only when autotuning
    x, w, b = _problem(200, 328, 1040, "mxfp4", torch.bfloat16, "cuda")
    before = plan(200, 328, 1040, device="cuda", fmt="mxfp4", bias=True).kernel
    _matmul(x, w, b)
    after = plan(200, 328, 1040, device="cuda", fmt="mxfp4", bias=True).kernel
    assert after in ("gemm", "chunked") and before in ("large", after)
    assert after in chosen_large_kernels().values()


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "k", "split"), [(96, 4096, 3), (2048, 8192, 8), (40, 1056, 2)])
def test_split_k_gemv_adds_its_partial_sums_in_order(fmt, n, k, split):
    """The split-K GEMV's last program per tile adds the splits up in split order: bit for
    bit each split's own product summed in order, every call the same."""
    seed = _seed()
    x, w, b = _problem(1, n, k, fmt, torch.bfloat16, "cuda")
    config = dict(BLOCK_N=16, BLOCK_K=512, PREFETCH=1, num_warps=4, num_stages=1)
    got, want = split_gemv_and_its_parts(x, w, b, split, config)
    assert torch.equal(got, want), seed
    for _ in range(3):
        assert torch.equal(split_gemv_and_its_parts(x, w, b, split, config)[0], got), seed


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k_counters_stay_zero_eagerly_and_in_cuda_graphs(fmt):
    """Eager direct launches keep one set of tile counters per stream and leave them at zero;
    a graph captured on that stream uses them, one captured elsewhere zeroes its own; every
    replay gives the eager result."""
    from apt_model.fp4.triton_matmul import _COUNTERS

    seed = _seed()
    x, w, b = _problem(1, 2048, 8192, fmt, torch.bfloat16, "cuda")  # the default plan splits K
    used = torch.cuda.Stream()
    used.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(used):
        for _ in range(3):
            torch.testing.assert_close(fp4_linear(x, w, b), _matmul(x, w, b, kernel="gemv"),
                                       rtol=0, atol=0)
    torch.cuda.current_stream().wait_stream(used)
    assert (torch.cuda.current_device(), used.cuda_stream) in _COUNTERS, seed
    run = lambda: _matmul(x, w, b, kernel="gemv", split_k=4)  # noqa: E731
    for stream in (torch.cuda.Stream(), used):  # counters of the graph's own, then the kept
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = run()
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(out, run(), rtol=0, atol=0)
    torch.cuda.synchronize()
    assert all(not c.any() for c in _COUNTERS.values()), seed


@needs_triton
def test_split_k_gemv_under_cuda_graph_trees():
    """A frozen layer whose GEMV splits K, compiled with ``mode="reduce-overhead"`` (CUDA-graph
    trees, Hugging Face's static-cache recipe): no buffer of the op outlives the trees' warm-up
    in their memory pool, and replays give the eager result."""
    torch.manual_seed(0)
    layer = FP4Linear(torch.nn.Linear(8192, 2048, device="cuda", dtype=torch.bfloat16)).freeze()
    step = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode():
        for _ in range(5):
            x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(step(x).clone(), layer(x), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k_and_pipeline_variants(fmt):
    seed = _seed()
    x, w, b = _problem(4, 96, 4096, fmt, torch.bfloat16, "cuda")
    ref = _ref64(x, w, b)
    for kernel, m in (("gemv", 1), ("small", 4)):
        out = _run_poisoned(x[:m], w, b, kernel=kernel, split_k=3)
        assert _rel(out, ref[:m]) <= 1e-2, (seed, kernel)
    for kernel, m, cfg in (
            ("gemv", 1, dict(BLOCK_N=16, BLOCK_K=512, PREFETCH=2)),
            ("small", 4, dict(BLOCK_N=64, BLOCK_K=256, GROUP_M=1, SWAP=True, PREFETCH=True)),
            ("gemm", 4, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, SWAP=False,
                             PREFETCH=False, num_stages=4))):
        out = _run_poisoned(x[:m], w, b, kernel=kernel, config=cfg)
        assert _rel(out, ref[:m]) <= 1e-2, (seed, kernel, cfg)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_is_the_reference_bit_for_bit(fmt, dtype):
    """The Triton dequantization (large-M products, input gradients) equals
    ``FP4Weight.dequantize`` bit for bit, into a strided slice and at an odd width, and
    writes nothing outside the slice."""
    from apt_model.fp4.triton_matmul import fp4_dequantize

    for n, k in ((300, 1040), (17, 33)):
        w = quantize_fp4((torch.randn(n, k) * 5).cuda(), fmt)
        big = torch.full((n, k + 8), float("nan"), dtype=dtype, device="cuda")
        fp4_dequantize(w.packed, w.scales, w.tensor_scale, k, out=big[:, 3:3 + k])
        assert torch.equal(big[:, 3:3 + k], w.dequantize(dtype)), (n, k)
        assert big[:, :3].isnan().all() and big[:, 3 + k:].isnan().all(), (n, k)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_path(fmt, dtype, bias):
    """Large M via per-slice dequantization + cuBLAS: slices and a ragged last slice, every
    output column written, each within a rounding of cuBLAS over the whole dequantized
    weight (not bit for bit: cuBLAS may sum a 64-row slice in another order than 328 rows)."""
    seed = _seed()
    x, w, b = _problem(70, 328, 1040, fmt, dtype, "cuda", bias=bias)
    whole = F.linear(x, w.dequantize(dtype), b)
    for rows in (64, 512):
        out = _run_poisoned(x, w, b, kernel="chunked", chunk_rows=rows)
        assert _rel(out, _ref64(x, w, b)) <= 1e-2, (seed, rows)
        torch.testing.assert_close(out, whole, rtol=8e-3 if dtype == torch.bfloat16 else 2e-3,
                                   atol=1e-3 * whole.abs().max().item(), msg=f"{seed} {rows}")


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
def test_prepared_chunked_product_is_the_chunked_path(bias, monkeypatch):
    """The prepared product of several rows (a prefill's eager path) over several slices and a
    ragged last one: the same bits as the planned chunked path, call after call."""
    from apt_model.fp4 import triton_matmul

    monkeypatch.setattr(triton_matmul, "CHUNK_BYTES", 256 * 1040 * 2)  # 256-row slices
    monkeypatch.setenv("VB_FP4_LARGE_KERNEL", "chunked")
    x, w, b = _problem(70, 600, 1040, "nvfp4", torch.bfloat16, "cuda", bias=bias)
    want = _matmul(x, w, b, kernel="chunked", chunk_rows=256)
    product = triton_matmul.MatProduct(w.packed, w.scales, w.tensor_scale, 1040, 70, torch.bfloat16,
                                       bias)
    for _ in range(3):  # the first call plans, later ones run the prepared slices
        torch.testing.assert_close(product(x, b), want, rtol=0, atol=0)


@needs_triton
def test_chunks_replay_in_a_cuda_graph():
    x, w, b = _problem(256, 1024, 512, "nvfp4", torch.bfloat16, "cuda")
    run = lambda: _matmul(x, w, b, kernel="chunked", chunk_rows=256)  # noqa: E731
    want = run()
    graph, out = _captured(run)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, run(), rtol=0, atol=0)
    assert not torch.equal(out, want)


@needs_triton
def test_every_code_and_scale_decodes_exactly():
    """All 256 byte values under varied scales: the PTX decode is exact (one fp32 rounding)."""
    for fmt in FORMATS:
        w = quantize_fp4(torch.randn(64, 512, device="cuda") * 3, fmt)
        w.packed.copy_(torch.arange(64 * 256, device="cuda").reshape(64, 256).to(torch.uint8))
        wd = w.dequantize(torch.float64)
        eye = torch.eye(512, device="cuda", dtype=torch.float32)
        for m, kernel in ((1, "gemv"), (16, "small")):
            for row in range(0, 512, m):
                x = eye[row:row + m].contiguous()
                out = _matmul(x, w, kernel=kernel)
                # NVFP4: (e2m1 * scale) * tensor_scale here, e2m1 * (scale * tensor_scale) in
                # the reference: each rounded once in fp32, so equal within 1-2 ulp.
                torch.testing.assert_close(out.double(), wd[:, row:row + m].T, rtol=3e-7,
                                           atol=0)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_public_op_on_cuda_and_compiled(fmt):
    seed = _seed()
    x, w, b = _problem(6, 256, 512, fmt, torch.bfloat16, "cuda", lead=(2,))
    out = fp4_linear(x, w, b)
    assert out.shape == (2, 6, 256)
    assert _rel(out, _ref64(x, w, b)) <= 1e-2, seed
    compiled = torch.compile(lambda t: fp4_linear(t, w, b), fullgraph=True)
    torch.testing.assert_close(compiled(x), out)
    # Eager without gradients skips the op's dispatch; with them it goes through the op.
    torch.testing.assert_close(torch.ops.apt_model.fp4_linear(*_args(x, w, b)), out,
                               rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(fp4_linear(xg, w, b), out, rtol=0, atol=0)


def test_direct_launch_binds_constants_once_and_rechecks_alignment():
    """After the first launch of a key (through the JIT or the autotuner), the compiled
    kernel's runner gets the tensors plus the constants (the autotuner's choice included)."""
    triton = pytest.importorskip("triton")
    import apt_model.ops.triton_launch as tm

    launches = []

    class Compiled:
        def __getitem__(self, grid):
            x, y, z = grid  # Triton's runner reads three grid dimensions
            return lambda *args: launches.append(("direct", (x, y, z), args[2:]))

    class Jit:
        arg_names = ["a", "b", "N", "BLOCK"]

        def __getitem__(self, grid):
            def launch(*tensors, **consts):
                launches.append(("jit", grid({"BLOCK": consts.get("BLOCK", 8)})))
                return Compiled()
            return launch

    class Tuned(triton.runtime.Autotuner):
        def __init__(self):  # the fields direct_launch reads
            self.fn, self.best_config = Jit(), triton.Config({"BLOCK": 8})

        __getitem__ = Jit.__getitem__

    a, b = torch.zeros(8), torch.zeros(8)
    for fn, consts, block in ((Jit(), dict(N=3, BLOCK=4), 4), (Tuned(), dict(N=3), 8)):
        launches.clear()
        tm._DIRECT.clear()
        for _ in range(2):
            tm.direct_launch(("key",), fn, lambda meta: (meta["BLOCK"],), (a, b), consts)
        tm.direct_launch(("key",), fn, lambda meta: (meta["BLOCK"],), (a[1:], b), consts)
        assert launches == [("jit", (block, 1, 1)), ("direct", (block, 1, 1), (3, block)),
                            ("jit", (block, 1, 1))]  # a misaligned tensor: another specialization
    tm._DIRECT.clear()


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_direct_launches_repeat_the_first_launch(fmt):
    """From the second eager call on, the kernels run through the kept launches (on Triton
    3.6 straight through its C launcher, the launch hooks' chains being empty): the results
    equal the first call's, bit for bit, for one row and several, with and without bias."""
    import triton

    import apt_model.ops.triton_launch as tl_

    torch.manual_seed(0)
    w = quantize_fp4(torch.randn(384, 512, device="cuda", dtype=torch.bfloat16), fmt)
    bias = torch.randn(384, device="cuda", dtype=torch.bfloat16)
    for rows in (1, 5, 300):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        for b in (None, bias):
            first = fp4_linear(x, w, b)
            again = [fp4_linear(x, w, b) for _ in range(3)]
            assert all(torch.equal(first, out) for out in again)
            ref = fp4_linear_reference(x.double(), w, None if b is None else b.double())
            assert ((first.double() - ref).norm() / ref.norm()).item() < 1e-2
    runners = [runner for runner, _ in tl_._DIRECT.values()]
    assert runners
    if triton.__version__.startswith(tl_._BARE_VERSIONS):
        assert all(runner.__qualname__.startswith("_bare_runner") for runner in runners)
