"""``x @ W^T`` with W stored packed in NVFP4 / MXFP4, as one traceable PyTorch op.

Why an op: ``torch.compile(fullgraph=True)`` must see one opaque call (no graph break, no
Triton launch traced into the graph), and each device must get its best implementation.
``apt_model::fp4_linear`` takes plain tensors; on CUDA with Triton it runs the fused
kernels of :mod:`apt_model.ops.triton_fp4` (the weight is never dequantized in full;
the first call per large-M shape also times two strategies, see ``_large_kernel``),
everywhere else (CPU, NPU, ...) the PyTorch reference: dequantize, then ``F.linear``.

The backward (w.r.t. ``x`` and ``bias`` only; the packed weight is frozen) dequantizes
the weight and uses plain matmuls, so a frozen FP4 base can sit under trainable layers.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from apt_model.formats.fp4 import FP4_FORMATS, FP4Weight
from apt_model.ops import triton_fp4

__all__ = ["fp4_linear", "fp4_linear_reference", "triton_available"]

_FMT_CODES = {fmt: i for i, fmt in enumerate(FP4_FORMATS)}  # nvfp4: 0, mxfp4: 1
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Set APT_FP4_TRITON=0 to force the reference path on CUDA (debugging, A/B checks).
_DISABLE_ENV = "APT_FP4_TRITON"


def triton_available(device: torch.device | str) -> bool:
    """Whether the fused Triton kernels can run on ``device``.

    Needs a CUDA device of compute capability 8.0+ (the kernels use bf16x2 FMAs), an
    importable Triton, and ``APT_FP4_TRITON`` not set to 0.
    """
    device = torch.device(device)
    if device.type != "cuda" or not triton_fp4.HAS_TRITON:
        return False
    if os.environ.get(_DISABLE_ENV, "1") == "0" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_ok(index)


@functools.lru_cache(maxsize=16)
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _weight(packed: Tensor, scales: Tensor, tensor_scale: Tensor, fmt_code: int,
            k: int) -> FP4Weight:
    fmt = FP4_FORMATS[fmt_code]
    ts = tensor_scale.reshape(()) if fmt == "nvfp4" else None
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
    out = triton_fp4.fp4_matmul(x.reshape(-1, k), packed, scales, ts, k, bias)
    return out.reshape(*lead, packed.shape[0])


@_fp4_linear_op.register_fake
def _fp4_linear_fake(x: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor,
                     fmt_code: int, k: int, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("apt_model::fp4_dequantize", mutates_args=())
def _fp4_dequantize_op(packed: Tensor, scales: Tensor, tensor_scale: Tensor, fmt_code: int,
                       k: int, dtype: torch.dtype) -> Tensor:
    """The full weight in ``dtype`` (backward only; an op so compiled graphs can trace it)."""
    return _weight(packed, scales, tensor_scale, fmt_code, k).dequantize(dtype)


@_fp4_dequantize_op.register_fake
def _fp4_dequantize_fake(packed: Tensor, scales: Tensor, tensor_scale: Tensor, fmt_code: int,
                         k: int, dtype: torch.dtype) -> Tensor:
    return packed.new_empty((packed.shape[0], k), dtype=dtype)


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
        w = _fp4_dequantize_op(packed, scales, tensor_scale, ctx.fmt_code, ctx.k, grad.dtype)
        grad_x = (grad @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, grad_bias


_fp4_linear_op.register_autograd(_backward, setup_context=_setup_context)


def fp4_linear(x: Tensor, w: FP4Weight, bias: Tensor | None = None) -> Tensor:
    """``x @ dequant(w).T + bias`` for ``x`` [..., K]; output in x's dtype.

    ``w`` is 2-D (N, K) or its leading dims are flattened into N. Traces through
    ``torch.compile(fullgraph=True)`` as one op.
    """
    k = w.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"fp4_linear: x has {x.shape[-1]} features, the weight expects {k}")
    ts = w.tensor_scale
    if ts is None:  # MXFP4 has no tensor scale; the op's schema takes a tensor anyway
        ts = w.scales.new_empty(0, dtype=torch.float32)
    return _fp4_linear_op(x, w.packed, w.scales, ts, _FMT_CODES[w.fmt], k, bias)
