"""Triton NVFP4 / MXFP4 quantization: packed codes and scales, or the fake-quantized weight.

Why: FP4 training re-quantizes every FP4 weight on every step. The PyTorch reference
(:mod:`apt_model.fp4.format`) takes a dozen elementwise passes with fp32 temporaries;
these kernels read the weight once (plus one ``amax`` pass for the NVFP4 tensor scale)
and write either the packed form (0.56 bytes per weight) or the fake-quantized weight
in the dtype the matmul wants. The numerics are the reference's operation by operation
(correctly rounded divisions, E4M3 round-to-nearest-even, E2M1 ties to even, NaN
blocks), so the outputs are bit for bit those of ``quantize_fp4`` /
``fake_quantize_fp4`` (checked by the GPU tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import apt_model.fp4.triton_matmul as triton_matmul
from apt_model.fp4.format import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_NORMAL,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    NVFP4_MIN_TENSOR_SCALE,
    FP4Weight,
)
from apt_model.ops.triton_launch import cdiv

__all__ = ["fake_quantize_fp4_triton", "quantize_fp4_triton"]

if triton_matmul.HAS_TRITON:
    import triton
    import triton.language as tl

    _e2m1_to_f32 = triton_matmul._e2m1_to_f32
    # Globals a kernel reads must be constexprs.
    _NVFP4_AMAX_DIV = tl.constexpr(E4M3_MAX * E2M1_MAX)
    _NVFP4_TS_MIN = tl.constexpr(NVFP4_MIN_TENSOR_SCALE)
    _E2M1_MAX = tl.constexpr(E2M1_MAX)
    _E4M3_MIN = tl.constexpr(E4M3_MIN_NORMAL)
    _E4M3_MAX = tl.constexpr(E4M3_MAX)

    @triton.jit
    def _e2m1_magnitude_code(a):
        """Nearest E2M1 magnitude code (0..7) of ``a`` >= 0, ties to the even code.

        A tie at 0.75, 1.75 or 3.5 goes up (>=), one at 0.25, 1.25, 2.5 or 5 down (>);
        inf saturates to 7 (6.0); NaN gives 0 here and is handled by the caller.
        """
        return ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32)
                + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))

    @triton.jit
    def _round_to_e4m3(s):
        """fp32 ``s`` in [2^-6, 448] or NaN, rounded to E4M3 (nearest, ties to even).

        Returns the rounded value in fp32 and its E4M3 byte. Integer arithmetic on the
        fp32 bits, so every backend (the interpreter too) rounds the same way: adding
        0x7FFFF plus the kept mantissa's last bit carries into the exponent when due.
        """
        bits = s.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF
        byte = ((((r >> 23) & 0xFF) - 120) << 3) | ((r >> 20) & 7)
        nan = s != s
        value = tl.where(nan, s, r.to(tl.float32, bitcast=True))
        return value, tl.where(nan, 0x7F, byte).to(tl.uint8)

    @triton.jit
    def _fp4_quantize_kernel(
        w_ptr, amax_ptr, p_ptr, s_ptr, ts_ptr, o_ptr,
        N, K, KP, stride_wn, stride_pn, stride_sn, stride_on,
        IS_NV: tl.constexpr, FAKE: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One [BLOCK_R, BLOCK_K] tile of ``w``: block scales, E2M1 codes, then either the
        packed bytes and scales (``FAKE`` False) or the dequantized values (``FAKE``)."""
        BS: tl.constexpr = 16 if IS_NV else 32
        NB: tl.constexpr = BLOCK_K // BS
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        r_mask = rows < N
        rows64 = rows.to(tl.int64)
        x = tl.load(w_ptr + rows64[:, None] * stride_wn + cols[None, :],
                    mask=r_mask[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        xb = tl.reshape(x, (BLOCK_R, NB, BS))
        block_nan = tl.max((xb != xb).to(tl.int32), axis=2) > 0
        block_amax = tl.where(block_nan, float("nan"), tl.max(tl.abs(xb), axis=2))
        if IS_NV:
            # torchao's order: tensor scale = amax / (448 * 6) floored at 2^-120; block scale
            # = block_amax / 6 / tensor scale in the normal E4M3 range, rounded to E4M3;
            # elements times (1 / tensor scale) / block scale.
            ts = tl.maximum(tl.math.div_rn(tl.load(amax_ptr), _NVFP4_AMAX_DIV), _NVFP4_TS_MIN,
                            propagate_nan=tl.PropagateNan.ALL)
            s = tl.math.div_rn(tl.math.div_rn(block_amax, _E2M1_MAX), ts)
            s = tl.minimum(tl.maximum(s, _E4M3_MIN, propagate_nan=tl.PropagateNan.ALL),
                           _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
            s32, s8 = _round_to_e4m3(s)
            recip = tl.math.div_rn(tl.math.div_rn(1.0, ts), s32)
            t = xb * recip[:, :, None]
            mult = ts * s32
            s_store = s8
            if not FAKE and tl.program_id(0) == 0 and tl.program_id(1) == 0:
                tl.store(ts_ptr, ts)
        else:
            # MX FLOOR: 2^(floor(log2 block_amax) - 2) as a biased E8M0 byte, 255 for NaN;
            # the divisor is clamped to the smallest normal fp32, the decoded scale is not.
            e = ((block_amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            biased = tl.minimum(tl.maximum(e - 2, -127), 128) + 127
            biased = tl.where(block_nan, 255, biased)
            divisor = tl.maximum((biased << 23).to(tl.float32, bitcast=True), 2.0 ** -126)
            t = tl.math.div_rn(xb, divisor[:, :, None])
            mult = tl.where(biased == 0, 2.0 ** -127, (biased << 23).to(tl.float32, bitcast=True))
            mult = tl.where(biased == 255, float("nan"), mult)
            s_store = biased.to(tl.uint8)
        bits = t.to(tl.int32, bitcast=True)
        sign = (bits >> 31) & 1
        a = tl.abs(t)
        mag = _e2m1_magnitude_code(a)
        if FAKE:
            # The sign goes in as a bit: -0.0 stays -0.0, as copysign keeps it.
            v = (_e2m1_to_f32(mag).to(tl.int32, bitcast=True) | (sign << 31)).to(
                tl.float32, bitcast=True) * mult[:, :, None]
            v = tl.reshape(v, (BLOCK_R, BLOCK_K))
            tl.store(o_ptr + rows64[:, None] * stride_on + cols[None, :],
                     v.to(o_ptr.dtype.element_ty), mask=r_mask[:, None] & (cols < K)[None, :])
        else:
            # A NaN element keeps the code the reference's bit-level cast gives it (its
            # block decodes to NaN whatever the code; this keeps the bytes identical).
            m = bits & 0x7FFFFFFF
            nan_code = ((m + ((-126 << 23) + (1 << 21) - 1) + ((m >> 22) & 1)) >> 22) & 0xFF
            code = (tl.where(a != a, nan_code, mag) | (sign << 3)) & 0xF
            lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_K // 2, 2)))
            pcols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            tl.store(p_ptr + rows64[:, None] * stride_pn + pcols[None, :],
                     (lo | (hi << 4)).to(tl.uint8),
                     mask=r_mask[:, None] & (pcols < KP // 2)[None, :])
            scols = tl.program_id(1) * NB + tl.arange(0, NB)
            tl.store(s_ptr + rows64[:, None] * stride_sn + scols[None, :], s_store,
                     mask=r_mask[:, None] & (scols < KP // BS)[None, :])


_BLOCK_R, _BLOCK_K = 16, 128


def _prepare(w: Tensor, fmt: str) -> tuple[Tensor, int, int, Tensor | None]:
    """``w`` as a row-contiguous 2-D tensor, its block size, padded K, and (NVFP4) its fp32
    amax, the one extra pass the tensor scale needs."""
    if not triton_matmul.HAS_TRITON:
        raise RuntimeError("the Triton FP4 quantization needs Triton")
    if w.dim() == 0:
        raise ValueError("an FP4 weight needs at least one dimension")
    k = w.shape[-1]
    w2 = w.detach().reshape(math.prod(w.shape[:-1]), k)
    if w2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w2 = w2.float()
    if w2.stride(-1) != 1:
        w2 = w2.contiguous()
    block = NVFP4_BLOCK if fmt == "nvfp4" else MXFP4_BLOCK
    amax = None
    if fmt == "nvfp4" and w2.numel():
        amax = torch.linalg.vector_norm(w2, ord=math.inf, dtype=torch.float32).reshape(1)
    return w2, block, -(-k // block) * block, amax


def _launch(w2: Tensor, amax: Tensor | None, fmt: str, kp: int, *, fake: bool,
            packed: Tensor | None = None, scales: Tensor | None = None,
            ts: Tensor | None = None, out: Tensor | None = None) -> None:
    """One kernel over ``w2``; outputs the chosen variant does not write get ``w2`` as a
    placeholder pointer (never dereferenced)."""
    if w2.numel() == 0:
        return
    packed, scales, out = (t if t is not None else w2 for t in (packed, scales, out))
    amax = amax if amax is not None else w2
    ts = ts if ts is not None else w2
    n, k = w2.shape
    grid = (cdiv(n, _BLOCK_R), cdiv(kp, _BLOCK_K))
    _fp4_quantize_kernel[grid](
        w2, amax, packed, scales, ts, out, n, k, kp, w2.stride(0), packed.stride(0),
        scales.stride(0), out.stride(0), IS_NV=fmt == "nvfp4", FAKE=fake,
        BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, num_warps=4)


def quantize_fp4_triton(w: Tensor, fmt: str) -> FP4Weight:
    """``quantize_fp4(w, fmt)`` on a CUDA tensor with two passes over ``w``."""
    w2, block, kp, amax = _prepare(w, fmt)
    n = w2.shape[0]
    packed = torch.empty((n, kp // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((n, kp // block), dtype=torch.uint8, device=w.device)
    if fmt != "nvfp4":
        _launch(w2, None, fmt, kp, fake=False, packed=packed, scales=scales)
        return FP4Weight(fmt, packed, scales, None, tuple(w.shape))
    # An empty weight launches no kernel and keeps the floor, the reference's scale for it.
    ts = torch.full((1,), NVFP4_MIN_TENSOR_SCALE, dtype=torch.float32, device=w.device)
    _launch(w2, amax, fmt, kp, fake=False, packed=packed, scales=scales, ts=ts)
    return FP4Weight(fmt, packed, scales.view(torch.float8_e4m3fn), ts.reshape(()),
                     tuple(w.shape))


def fake_quantize_fp4_triton(w: Tensor, fmt: str, dtype: torch.dtype | None = None) -> Tensor:
    """``fake_quantize_fp4(w.float(), fmt).to(dtype)`` on a CUDA tensor, in one pass.

    ``dtype`` defaults to ``w.dtype``; the fp32 result is rounded once into it.
    """
    w2, _, kp, amax = _prepare(w, fmt)
    out = torch.empty(w2.shape, dtype=dtype or w.dtype, device=w.device)
    _launch(w2, amax, fmt, kp, fake=True, out=out)
    return out.reshape(w.shape)
