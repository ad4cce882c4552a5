"""``x @ W^T`` with W stored packed in NVFP4 / MXFP4, as one traceable PyTorch op.

Why an op: ``torch.compile(fullgraph=True)`` must see one opaque call (no graph break, no
Triton launch traced into the graph), and each device must get its best implementation.
``apt_model::fp4_linear`` takes plain tensors; on CUDA with Triton it runs the fused
kernels of :mod:`apt_model.fp4.triton_matmul` (the weight is never dequantized in full;
which kernel runs for which shape is :mod:`apt_model.fp4.kernel_plan`'s policy, and the
first call per large-M shape also times two strategies), everywhere else (CPU, NPU, ...)
the PyTorch reference: dequantize, then ``F.linear``.

The backward (w.r.t. ``x`` and ``bias`` only; the packed weight is frozen) is the op
``apt_model::fp4_grad_input``: for few rows a fused Triton kernel, otherwise the weight
dequantized and a plain matmul, so a frozen FP4 base can sit under trainable layers.

Training an FP4 layer re-quantizes its master weight every step, through two more ops
with Triton kernels on CUDA: ``apt_model::fp4_quantize`` (packed codes and scales) and
``apt_model::fp4_fake_quantize`` (the dequantized weight, in the matmul's dtype). Both
are bit for bit the reference of :mod:`apt_model.fp4.format`, which other devices run.

The ops' schemas: ``fmt_code`` is the format's index in ``FP4_FORMATS`` (nvfp4: 0,
mxfp4: 1), ``k`` the weight's unpadded number of columns, and ``tensor_scale`` the NVFP4
tensor scale, or an empty fp32 tensor for MXFP4.

The Triton modules (:mod:`~apt_model.fp4.triton_matmul`,
:mod:`~apt_model.fp4.triton_quantize`), and with them Triton, are imported by the CUDA
implementations on first use only: importing this module, or running the ops on another
device, never imports Triton.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from apt_model import env
from apt_model.fp4.format import (
    FP4_FORMATS,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    FP4Weight,
    fake_quantize_fp4,
    quantize_fp4,
)
from apt_model.fp4.kernel_plan import SMALL_MAX_M
from apt_model.ops.decoder import rms_norm
from apt_model.ops.triton_launch import HALF_DTYPES, triton_runs_on

__all__ = [
    "fp4_fake_quantize",
    "fp4_grad_input",
    "fp4_linear",
    "fp4_linear_reference",
    "fp4_linear_tensors",
    "fp4_quantize",
    "fp4_rms_norm_linear",
    "fp4_rms_norm_linear_tensors",
    "triton_available",
]

_FMT_CODES = {fmt: i for i, fmt in enumerate(FP4_FORMATS)}  # nvfp4: 0, mxfp4: 1
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to this many rows the input gradient of a packed weight runs the fused kernel, the
# forward's small-M bound; above, a Triton dequantize + cuBLAS. Not measured on its own.
_FUSED_GRAD_MAX_ROWS = SMALL_MAX_M


@functools.cache
def _matmul_kernels() -> ModuleType:
    """The Triton matmul kernels, imported on first use (the import imports Triton)."""
    import apt_model.fp4.triton_matmul as triton_matmul

    return triton_matmul


@functools.cache
def _quantize_kernels() -> ModuleType:
    """The Triton quantization kernels, imported on first use."""
    import apt_model.fp4.triton_quantize as triton_quantize

    return triton_quantize


def triton_available(device: torch.device | str) -> bool:
    """Whether the fused Triton kernels can run on ``device``.

    Needs a CUDA device of compute capability 8.0+ (the kernels use bf16x2 FMAs), an
    importable Triton, and ``VB_FP4_TRITON`` not set to 0. Asking about a CUDA device
    imports nothing (the kernels and Triton are imported at their first launch).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _triton_runs(device.index, env.get(env.FP4_TRITON))


@functools.cache
def _triton_runs(index: int | None, switch: str | None) -> bool:
    """``triton_available`` for CUDA device ``index`` under the ``VB_FP4_TRITON`` value
    ``switch`` (asked every eager call: cached)."""
    on = None if switch is None else env.parse_switch(switch)
    if on is False or not torch.cuda.is_available():
        return False
    return triton_runs_on(torch.cuda.current_device() if index is None else index)


def _weight(packed: Tensor, scales: Tensor, tensor_scale: Tensor, fmt_code: int,
            k: int) -> FP4Weight:
    fmt = FP4_FORMATS[fmt_code]
    ts = None
    if fmt == "nvfp4":  # one tensor scale, or one per row (FP4Weight.dequantize broadcasts it)
        ts = tensor_scale.reshape(()) if tensor_scale.numel() == 1 else tensor_scale.reshape(-1, 1)
    return FP4Weight(fmt, packed, scales, ts, (packed.shape[0], k))


def fp4_linear_reference(x: Tensor, w: FP4Weight, bias: Tensor | None = None) -> Tensor:
    """The definition: dequantize ``w`` to x's dtype, then ``F.linear`` (any device)."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, w.dequantize(x.dtype).reshape(-1, w.shape[-1]), bias)


@torch.library.custom_op("apt_model::fp4_linear", mutates_args=())
def _fp4_linear_op(x: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                   fmt_code: int, k: int, bias: Tensor | None) -> Tensor:
    """Default (non-CUDA) implementation: the reference."""
    return fp4_linear_reference(x, _weight(packed, scales, tensor_scale, fmt_code, k), bias)


@_fp4_linear_op.register_kernel("cuda")
def _fp4_linear_cuda(x: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                     fmt_code: int, k: int, bias: Tensor | None) -> Tensor:
    """CUDA: the fused Triton kernels when usable, else the reference."""
    if x.dtype not in _TRITON_DTYPES or not triton_available(x.device):
        return fp4_linear_reference(x, _weight(packed, scales, tensor_scale, fmt_code, k), bias)
    lead = x.shape[:-1]
    ts = tensor_scale if FP4_FORMATS[fmt_code] == "nvfp4" else None
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    out = _matmul_kernels().fp4_matmul(x.reshape(-1, k), packed, scales, ts, k, bias)
    return out.reshape(*lead, packed.shape[0])


@_fp4_linear_op.register_fake
def _fp4_linear_fake(x: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                     fmt_code: int, k: int, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("apt_model::fp4_rms_norm_linear", mutates_args=())
def _fp4_rms_norm_linear_op(x: Tensor, norm_weight: Tensor, eps: float, packed: Tensor,
                            scales: Tensor, tensor_scale: Tensor, fmt_code: int, k: int,
                            bias: Tensor | None) -> Tensor:
    """``fp4_linear(rms_norm(x, norm_weight, eps), W, bias)``; default (non-CUDA): the two in
    turn."""
    return fp4_linear_reference(rms_norm(x, norm_weight, eps),
                                _weight(packed, scales, tensor_scale, fmt_code, k), bias)


@_fp4_rms_norm_linear_op.register_kernel("cuda")
def _fp4_rms_norm_linear_cuda(x: Tensor, norm_weight: Tensor, eps: float, packed: Tensor,
                              scales: Tensor, tensor_scale: Tensor, fmt_code: int, k: int,
                              bias: Tensor | None) -> Tensor:
    """CUDA: one row through the GEMV normalizing it, else the two in turn."""
    w = _weight(packed, scales, tensor_scale, fmt_code, k)
    product = _norm_row_product(x, norm_weight, w, bias, eps)
    if product is not None:
        return product(x.view(1, k), bias, u=norm_weight).view(*x.shape[:-1], packed.shape[0])
    return _fp4_linear_cuda(rms_norm(x, norm_weight, eps), packed, scales, tensor_scale,
                            fmt_code, k, bias)


@_fp4_rms_norm_linear_op.register_fake
def _fp4_rms_norm_linear_fake(x: Tensor, norm_weight: Tensor, eps: float, packed: Tensor,
                              scales: Tensor, tensor_scale: Tensor, fmt_code: int, k: int,
                              bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _grad_input_reference(grad: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                          fmt_code: int, k: int) -> Tensor:
    return grad @ _weight(packed, scales, tensor_scale, fmt_code, k).dequantize(grad.dtype)


@torch.library.custom_op("apt_model::fp4_grad_input", mutates_args=())
def _fp4_grad_input_op(grad: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                       fmt_code: int, k: int) -> Tensor:
    """``grad @ dequant(W)`` for ``grad`` [..., N]: the reference (dequantize, matmul)."""
    return _grad_input_reference(grad, packed, scales, tensor_scale, fmt_code, k)


@_fp4_grad_input_op.register_kernel("cuda")
def _fp4_grad_input_cuda(grad: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                         fmt_code: int, k: int) -> Tensor:
    """CUDA: the fused kernel for up to ``_FUSED_GRAD_MAX_ROWS`` rows, else the Triton
    dequantize and cuBLAS (the full weight exists in the grad's dtype only for that matmul)."""
    if grad.dtype not in _TRITON_DTYPES or not triton_available(grad.device):
        return _grad_input_reference(grad, packed, scales, tensor_scale, fmt_code, k)
    rows = grad.numel() // max(1, grad.shape[-1])
    ts = tensor_scale if FP4_FORMATS[fmt_code] == "nvfp4" else None
    if rows <= _FUSED_GRAD_MAX_ROWS:
        out = _matmul_kernels().fp4_grad_input(grad.reshape(rows, -1), packed, scales, ts, k)
        return out.reshape(*grad.shape[:-1], k)
    w = torch.empty((packed.shape[0], k), dtype=grad.dtype, device=grad.device)
    _matmul_kernels().fp4_dequantize(packed, scales, ts, k, out=w)
    return grad @ w


@_fp4_grad_input_op.register_fake
def _fp4_grad_input_fake(grad: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                         fmt_code: int, k: int) -> Tensor:
    return grad.new_empty((*grad.shape[:-1], k))


def _setup_context(ctx, inputs, output) -> None:
    x, packed, scales, tensor_scale, fmt_code, k, bias = inputs
    ctx.save_for_backward(packed, scales, tensor_scale)
    ctx.fmt_code, ctx.k = fmt_code, k
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad: Tensor):
    packed, scales, tensor_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _fp4_grad_input_op(grad, packed, scales, tensor_scale, ctx.fmt_code,
                                    ctx.k).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, grad_bias


_fp4_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _quantize_reference(w: Tensor, fmt_code: int) -> tuple[Tensor, Tensor, Tensor]:
    q = quantize_fp4(w, FP4_FORMATS[fmt_code])
    return q.packed, q.scales, _tensor_scale_arg(q)


@torch.library.custom_op("apt_model::fp4_quantize", mutates_args=())
def _fp4_quantize_op(w: Tensor, fmt_code: int) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, scales, tensor scale) of ``w``; MXFP4's tensor scale is an empty tensor."""
    return _quantize_reference(w, fmt_code)


@_fp4_quantize_op.register_kernel("cuda")
def _fp4_quantize_cuda(w: Tensor, fmt_code: int) -> tuple[Tensor, Tensor, Tensor]:
    if not triton_available(w.device):
        return _quantize_reference(w, fmt_code)
    q = _quantize_kernels().quantize_fp4_triton(w, FP4_FORMATS[fmt_code])
    return q.packed, q.scales, _tensor_scale_arg(q)


@_fp4_quantize_op.register_fake
def _fp4_quantize_fake(w: Tensor, fmt_code: int) -> tuple[Tensor, Tensor, Tensor]:
    nv = FP4_FORMATS[fmt_code] == "nvfp4"
    block = NVFP4_BLOCK if nv else MXFP4_BLOCK
    n, kp = w.numel() // w.shape[-1], -(-w.shape[-1] // block) * block
    return (w.new_empty((n, kp // 2), dtype=torch.uint8),
            w.new_empty((n, kp // block), dtype=torch.float8_e4m3fn if nv else torch.uint8),
            w.new_empty(() if nv else 0, dtype=torch.float32))


def _fake_quantize_reference(w: Tensor, fmt_code: int, dtype: torch.dtype) -> Tensor:
    # In fp32 first (exact for 16-bit inputs), so the fp32 product is rounded once, into dtype.
    return fake_quantize_fp4(w.float(), FP4_FORMATS[fmt_code]).to(dtype)


@torch.library.custom_op("apt_model::fp4_fake_quantize", mutates_args=())
def _fp4_fake_quantize_op(w: Tensor, fmt_code: int, dtype: torch.dtype) -> Tensor:
    """The fake-quantized ``w``, its fp32 value rounded once into ``dtype``."""
    return _fake_quantize_reference(w, fmt_code, dtype)


@_fp4_fake_quantize_op.register_kernel("cuda")
def _fp4_fake_quantize_cuda(w: Tensor, fmt_code: int, dtype: torch.dtype) -> Tensor:
    if not triton_available(w.device):
        return _fake_quantize_reference(w, fmt_code, dtype)
    return _quantize_kernels().fake_quantize_fp4_triton(w, FP4_FORMATS[fmt_code], dtype)


@_fp4_fake_quantize_op.register_fake
def _fp4_fake_quantize_fake(w: Tensor, fmt_code: int, dtype: torch.dtype) -> Tensor:
    return w.new_empty(w.shape, dtype=dtype)


def _tensor_scale_arg(w: FP4Weight) -> Tensor:
    """The NVFP4 tensor scale, or for MXFP4 (none) an empty tensor: the ops' schemas take one."""
    if w.tensor_scale is not None:
        return w.tensor_scale
    return w.scales.new_empty(0, dtype=torch.float32)


def fp4_quantize(w: Tensor, fmt: str) -> FP4Weight:
    """``quantize_fp4(w, fmt)`` (bit for bit), through the Triton kernel on CUDA."""
    packed, scales, ts = _fp4_quantize_op(w.detach(), _FMT_CODES[fmt])
    return FP4Weight(fmt, packed, scales, ts if fmt == "nvfp4" else None, tuple(w.shape))


def fp4_fake_quantize(w: Tensor, fmt: str, dtype: torch.dtype | None = None) -> Tensor:
    """``fake_quantize_fp4(w.float(), fmt).to(dtype)`` (bit for bit: the fp32 result rounded
    once into ``dtype``, default ``w.dtype``), one Triton pass on CUDA."""
    return _fp4_fake_quantize_op(w.detach(), _FMT_CODES[fmt], dtype or w.dtype)


def fp4_grad_input(grad: Tensor, w: FP4Weight) -> Tensor:
    """``grad @ dequant(w)``: the input gradient of ``fp4_linear`` for ``grad`` [..., N]."""
    return _fp4_grad_input_op(grad, w.packed, w.scales, _tensor_scale_arg(w),
                              _FMT_CODES[w.fmt], w.shape[-1])


def fp4_linear(x: Tensor, w: FP4Weight, bias: Tensor | None = None) -> Tensor:
    """``x @ dequant(w).T + bias`` for ``x`` [..., K]; output in x's dtype.

    ``w`` is 2-D (N, K) or its leading dims are flattened into N. Traces through
    ``torch.compile(fullgraph=True)`` as one op.
    """
    k = _checked_features(x, w.shape[-1])
    eager = type(x) is Tensor and x.is_cuda and not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
    if eager and x.is_contiguous() and x.numel():  # the weight's prepared product
        if bias is not None and bias.dtype != x.dtype:  # e.g. an fp32 bias under bf16 autocast
            bias = bias.to(x.dtype)
        rows = x.numel() // k
        product = _row_product(x, w, bias) if rows == 1 else _mat_product(x, w, bias, rows)
        if product is not None:
            return product(x.view(rows, k), bias).view(*x.shape[:-1], w.packed.shape[0])
    args = (x, w.packed, w.scales, _tensor_scale_arg(w), _FMT_CODES[w.fmt], k, bias)
    # Eager with nothing to differentiate: the CUDA implementation without the custom op's
    # dispatch, which costs tens of microseconds a call on a slow host (decode).
    return _fp4_linear_cuda(*args) if eager else _fp4_linear_op(*args)


def fp4_linear_tensors(x: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor | None,
                       k: int, bias: Tensor | None = None) -> Tensor:
    """``fp4_linear`` over a packed weight's tensors, its format told by the scales' dtype
    (float8 e4m3: NVFP4, uint8 E8M0: MXFP4), as one op: for compiled graphs, where every
    Python attribute an :class:`FP4Weight` carries would be one more guard checked each call."""
    fmt = "nvfp4" if scales.dtype == torch.float8_e4m3fn else "mxfp4"
    if tensor_scale is None:
        tensor_scale = scales.new_empty(0, dtype=torch.float32)
    return _fp4_linear_op(x, packed, scales, tensor_scale, _FMT_CODES[fmt],
                          _checked_features(x, k), bias)


def fp4_rms_norm_linear(x: Tensor, norm_weight: Tensor, eps: float, w: FP4Weight,
                        bias: Tensor | None = None) -> Tensor:
    """``fp4_linear(rms_norm(x, norm_weight, eps), w, bias)``: Hugging Face Llama's RMSNorm
    of ``x`` [..., K] (weight [K]), then the product.

    For one row of bf16 / fp16 on CUDA (``norm_weight`` of x's dtype) the GEMV normalizes the
    row itself, in one launch, without the formula's two roundings to x's dtype between its
    steps (the results agree within those roundings). Elsewhere the two run in turn. For
    inference only: no gradient flows through the op.
    """
    k = _checked_features(x, w.shape[-1])
    if type(x) is Tensor and x.is_cuda and not torch.compiler.is_compiling():
        product = _norm_row_product(x, norm_weight, w, bias, eps)
        if product is not None:  # eager: the prepared product, without the op's dispatch
            return product(x.view(1, k), bias, u=norm_weight).view(*x.shape[:-1], w.packed.shape[0])
    return _fp4_rms_norm_linear_op(x, norm_weight, float(eps), w.packed, w.scales,
                                   _tensor_scale_arg(w), _FMT_CODES[w.fmt], k, bias)


def fp4_rms_norm_linear_tensors(x: Tensor, norm_weight: Tensor, eps: float, packed: Tensor,
                                scales: Tensor, tensor_scale: Tensor | None, k: int,
                                bias: Tensor | None = None) -> Tensor:
    """:func:`fp4_rms_norm_linear` over a packed weight's tensors (as
    :func:`fp4_linear_tensors`), as one op: for compiled graphs."""
    fmt = "nvfp4" if scales.dtype == torch.float8_e4m3fn else "mxfp4"
    if tensor_scale is None:
        tensor_scale = scales.new_empty(0, dtype=torch.float32)
    return _fp4_rms_norm_linear_op(x, norm_weight, float(eps), packed, scales, tensor_scale,
                                   _FMT_CODES[fmt], _checked_features(x, k), bias)


def _checked_features(x: Tensor, k: int) -> int:
    if x.shape[-1] != k:
        raise ValueError(f"fp4_linear: x has {x.shape[-1]} features, the weight expects {k}")
    return k


# Prepared products of several rows kept per weight, one per row count (prompt length),
# at most this many: a server's varied prompt lengths must not grow them without bound.
_MAT_PRODUCTS_KEPT = 16


def _mat_product(x: Tensor, w: FP4Weight, bias: Tensor | None, rows: int):
    """The Triton product of ``rows`` rows prepared for ``w`` (kept in ``w.kernels``, like
    :func:`_row_product`'s), or None where the fused kernels do not run."""
    key = ("mat", rows, x.dtype, bias is not None, env.get(env.FP4_TRITON),
           env.get(env.FP4_LARGE_KERNEL), env.get(env.FP4_AUTOTUNE))
    product = w.kernels.get(key)
    if product is None:
        if x.dtype not in _TRITON_DTYPES or not triton_available(x.device):
            return None
        kept = [name for name in w.kernels if name[0] == "mat"]
        if len(kept) >= _MAT_PRODUCTS_KEPT:
            for name in kept:
                del w.kernels[name]
        product = w.kernels[key] = _matmul_kernels().MatProduct(
            w.packed, w.scales, w.tensor_scale, w.shape[-1], rows, x.dtype, bias is not None)
    return product


def _row_product(x: Tensor, w: FP4Weight, bias: Tensor | None):
    """The Triton one-row product prepared for ``w``, ``x``'s dtype and a ``bias`` of that
    dtype or None (kept in ``w.kernels``), or None where the fused kernels do not run (their
    dtypes, devices, ``VB_FP4_TRITON``)."""
    key = ("row", x.dtype, bias is not None, env.get(env.FP4_TRITON))
    product = w.kernels.get(key)
    if product is None:
        if x.dtype not in _TRITON_DTYPES or not triton_available(x.device):
            return None
        product = w.kernels[key] = _matmul_kernels().RowProduct(
            w.packed, w.scales, w.tensor_scale, w.shape[-1], x.dtype, bias is not None)
    return product


def _norm_row_product(x: Tensor, norm_weight: Tensor, w: FP4Weight, bias: Tensor | None,
                      eps: float):
    """The one-row product normalizing its row (kept in ``w.kernels``), or None where it does
    not take these inputs: one contiguous bf16 / fp16 CUDA row, a contiguous norm weight of
    its dtype and width, a bias of its dtype or none, nothing to differentiate, the fused
    kernels running here."""
    k = w.shape[-1]
    if not (x.dtype in HALF_DTYPES and x.numel() == k and norm_weight.dtype == x.dtype
            and norm_weight.numel() == k and x.is_contiguous() and norm_weight.is_contiguous()
            and norm_weight.device == x.device and (bias is None or bias.dtype == x.dtype)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or norm_weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    key = ("row", x.dtype, bias is not None, env.get(env.FP4_TRITON), "rms_norm", float(eps))
    product = w.kernels.get(key)
    if product is None:
        if not triton_available(x.device):
            return None
        product = w.kernels[key] = _matmul_kernels().RowProduct(
            w.packed, w.scales, w.tensor_scale, k, x.dtype, bias is not None, norm=True, eps=eps)
    return product
