"""Triton kernels for a decoder layer's small elementwise steps: RMSNorm, rotary embedding
of q and k, and SiLU(gate) * up, one launch each.

Each computes what the Hugging Face Llama formula computes, in the same roundings: the
rotary embedding and SiLU-mul bit for bit (every product and sum rounded to the tensors'
dtype where PyTorch rounds it; ``exp`` and the division as CUDA's accurate ``expf`` and
IEEE division), RMSNorm up to the order of its fp32 sum of squares. Callers
(:mod:`apt_model.ops.decoder`) launch them only on CUDA, eagerly, with nothing to
differentiate. It imports Triton when there is one (the package imports it on first use
only); without Triton it imports, and launching a kernel fails.
"""

from __future__ import annotations

from torch import Tensor

from apt_model.ops.triton_launch import cdiv, direct_launch, interpreting, next_pow2

try:  # Triton is optional: every module of the package imports without it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

__all__ = ["rms_norm_rows", "rotary_qk", "silu_mul_rows"]

_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, N, stride_x, stride_o, eps, BLOCK: tl.constexpr,
                     INTERP: tl.constexpr):
    """One row: ``w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, the sum in fp32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / N
    if INTERP:  # the interpreter has no libdevice
        r = tl.math.rsqrt(variance + eps)
    else:
        r = libdevice.rsqrt(variance + eps)
    y = (x * r).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, out.to(o_ptr.dtype.element_ty), mask=mask)


@_jit
def _rotate_row(src, dst, c1, c2, s1, s2, offs, mask, HALF: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` for one head's row, in the row's dtype: each
    product and the sum rounded to it, as PyTorch's three elementwise kernels round.
    The launch turns off the compiler's fusing of a multiply and an add into one FMA,
    which would round once where PyTorch rounds twice."""
    x1 = tl.load(src + offs, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
    tl.store(dst + offs, x1 * c1 + -x2 * s1, mask=mask)
    tl.store(dst + HALF + offs, x2 * c2 + x1 * s2, mask=mask)


@_jit
def _rotary_kernel(q_ptr, k_ptr, c_ptr, s_ptr, qo_ptr, ko_ptr, S, HQ,
                   sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
                   sc_b, sc_s, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b * S + s, head): q's heads first, then k's; cos and sin are [B, S, D]."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    b = (r // S).to(tl.int64)
    s = (r % S).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    cs = b * sc_b + s * sc_s
    c1 = tl.load(c_ptr + cs + offs, mask=mask, other=0.0)
    c2 = tl.load(c_ptr + cs + HALF + offs, mask=mask, other=0.0)
    s1 = tl.load(s_ptr + cs + offs, mask=mask, other=0.0)
    s2 = tl.load(s_ptr + cs + HALF + offs, mask=mask, other=0.0)
    if h < HQ:
        _rotate_row(q_ptr + b * sq_b + h * sq_h + s * sq_s,
                    qo_ptr + b * sqo_b + h * sqo_h + s * sqo_s, c1, c2, s1, s2, offs, mask, HALF)
    else:
        hk = h - HQ
        _rotate_row(k_ptr + b * sk_b + hk * sk_h + s * sk_s,
                    ko_ptr + b * sko_b + hk * sko_h + s * sko_s, c1, c2, s1, s2, offs, mask, HALF)


@_jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, stride_o,
                     BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """Program (row, column block): ``silu(g).to(dtype) * u``, silu as ``g / (1 + exp(-g))``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dt = o_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    if INTERP:  # the interpreter has no libdevice
        act = g / (1.0 + tl.exp(-g))
    else:  # CUDA's accurate expf and an IEEE division, as PyTorch's kernel computes it
        act = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
    act = act.to(dt).to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, (act * u).to(dt), mask=mask)


def _warps(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def rms_norm_rows(x: Tensor, weight: Tensor, eps: float, out: Tensor) -> None:
    """``out`` [R, N] = the RMSNorm of ``x`` [R, N] (rows of stride ``x.stride(0)``, unit
    column stride) with ``weight`` [N] (contiguous)."""
    rows, n = x.shape
    block = next_pow2(n)
    consts = dict(N=n, stride_x=x.stride(0), stride_o=out.stride(0), eps=eps, BLOCK=block,
                  INTERP=interpreting(), num_warps=_warps(block))
    key = ("rms_norm", x.device.index, x.dtype, weight.dtype, out.dtype, rows,
           tuple(consts.items()))
    direct_launch(key, _rms_norm_kernel, (rows,), (x, weight, out), consts)


def rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor,
              k_out: Tensor) -> None:
    """``q_out``, ``k_out`` = the rotary embedding of ``q`` [B, Hq, S, D] and ``k``
    [B, Hk, S, D] by ``cos``, ``sin`` [B or 1, S, D] (every last dim of unit stride)."""
    batch, hq, seq, d = q.shape
    hk = k.shape[1]
    half = d // 2
    block = next_pow2(half)
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    strides = (*(q.stride(i) for i in range(3)), *(k.stride(i) for i in range(3)),
               *(q_out.stride(i) for i in range(3)), *(k_out.stride(i) for i in range(3)),
               sc_b, cos.stride(1))
    names = ("sq_b", "sq_h", "sq_s", "sk_b", "sk_h", "sk_s", "sqo_b", "sqo_h", "sqo_s",
             "sko_b", "sko_h", "sko_s", "sc_b", "sc_s")
    consts = dict(S=seq, HQ=hq, **dict(zip(names, strides, strict=True)), HALF=half,
                  BLOCK=block, num_warps=1 if block <= 64 else 2, enable_fp_fusion=False)
    grid = (batch * seq, hq + hk)
    key = ("rotary", q.device.index, q.dtype, grid, tuple(consts.items()))
    direct_launch(key, _rotary_kernel, grid, (q, k, cos, sin, q_out, k_out), consts)


def silu_mul_rows(gate: Tensor, up: Tensor, out: Tensor) -> None:
    """``out`` [R, N] = ``silu(gate) * up`` for ``gate``, ``up`` [R, N] (rows of their own
    strides, unit column stride), rounded as PyTorch rounds the two steps."""
    rows, n = gate.shape
    block = min(1024, next_pow2(n))
    consts = dict(N=n, stride_g=gate.stride(0), stride_u=up.stride(0), stride_o=out.stride(0),
                  BLOCK=block, INTERP=interpreting(), num_warps=4)
    grid = (rows, cdiv(n, block))
    key = ("silu_mul", gate.device.index, gate.dtype, up.dtype, grid, tuple(consts.items()))
    direct_launch(key, _silu_mul_kernel, grid, (gate, up, out), consts)
