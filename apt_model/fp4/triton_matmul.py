"""Triton kernels multiplying activations by packed NVFP4 / MXFP4 weights.

Why: GPUs before Blackwell have no FP4 matrix units, and dequantizing the whole weight to
bf16 before a cuBLAS call writes and re-reads 4x the packed bytes. These kernels read the
packed bytes and block scales once and dequantize tile by tile in registers, so no
full-size bf16 weight ever exists.

Kernels, picked by the number of activation rows M (the policy, thresholds and candidate
configs live in :mod:`apt_model.fp4.kernel_plan`; :func:`fp4_matmul` takes a
:class:`~apt_model.fp4.kernel_plan.KernelPlan` to pin one):

* ``gemv`` (M = 1), one launch a product: each program turns the row's values of a tile
  into fp16 pairs, scaled by a power of two per 16 values, decodes each code to fp16 with
  integer instructions (``_ASM_GEMV``), sums 16 products with packed fp16 FMAs and
  accumulates the block-scaled partial sums in fp32. Where K is split, the last program of
  each weight-row tile to finish adds the splits' partial sums up in split order
  (``_split_fixup``), so that too is one launch.
* ``small`` (M <= 64): ``tl.dot`` on one 16..64-row tile per weight tile. Decode is
  memory-bound, but already at M = 16 the fp32 FMAs alone would outlast the memory
  traffic, hence the tensor cores; the compiler pipelines the weight loads.
* large M: ``gemm``, a tiled matmul with the weight tile dequantized in registers,
  stored to shared memory by the compiler and fed to ``tl.dot`` in bf16 (fp16 for fp16
  activations with NVFP4), fp32 accumulation; or ``chunked``: a slice of weight rows
  (``CHUNK_BYTES`` of bf16) at a time dequantized by Triton, then multiplied by cuBLAS.
  The first call per shape times both and keeps the
  faster (:func:`_large_kernel`; :func:`~apt_model.fp4.kernel_plan.chosen_large_kernels`).

Dequantization (``_ASM_DECODE``): one PTX block turns a packed int32 word (8 E2M1 codes)
into 8 values in k order. ``prmt`` puts codes k_2j and k_2j+1 into the two 16-bit lanes
of a register; masking the nibbles and one integer multiply by 0x1040 put each code's
magnitude at the bf16 exponent/mantissa boundary (bits 6-8) and its sign at bit 15,
which reads as ``e2m1 * 2**-126`` in bf16 (a subnormal for +-0.5, exact). One packed
``fma.rn.bf16x2`` multiplies by ``block_scale * 2**(126 - J)``, giving
``e2m1 * block_scale * 2**-J`` exactly (at most 6 significant bits). ``J`` keeps that
factor inside bf16/fp16 range (7 for NVFP4, 64 for MXFP4); the fp32 accumulator is
multiplied by ``2**J * tensor_scale`` once at the end. 8 "=h" outputs per word let the
compiler keep the pairs packed, so no unpacking is emitted. A plain-Triton decode
computes the same values; it runs under ``TRITON_INTERPRET=1`` (CPU) and is the fallback.

Importing this module without Triton works; only launching a kernel needs it. The package
imports this module only when a kernel is first needed on a CUDA device.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable

import torch
from torch import Tensor

from apt_model.fp4.kernel_plan import (
    SMALL_MAX_M,
    KernelPlan,
    _large_key,
    _remember_large_kernel,
    _settled_large_kernel,
    candidate_configs,
    fixed_config,
    kernel_for,
)
from apt_model.fp4.kernel_plan import interpreting as _interpreting
from apt_model.ops.triton_launch import cdiv, direct_launch, next_pow2, sm_count

try:  # Triton is optional: the package must import on CPU-only and NPU machines.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
try:  # libdevice's rsqrt (the RMSNorm as PyTorch computes it)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the machine
    libdevice = None
try:  # programmatic dependent launch (Triton 3.3+); without it the GEMV waits in line
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover - depends on the Triton version
    gdc_wait = None

HAS_TRITON = triton is not None

__all__ = [
    "GRAD_INPUT_BLOCK",
    "HAS_TRITON",
    "autotuned_config",
    "config_dict",
    "device_arch",
    "fp4_dequantize",
    "fp4_grad_input",
    "fp4_matmul",
]

if HAS_TRITON:
    # --------------------------------------------------------------------- dequantization

    # One packed int32 word = 8 E2M1 codes k0..k7 (k0 in the low nibble). Outputs $0..$7 are
    # the 8 values in k order, as the 16-bit halves of 4 registers; $8 = the word, $9 = the
    # block scale factor twice (bf16x2 / f16x2). prmt puts (k_2j, k_2j+1) into the two
    # 16-bit lanes of t_j, the multiply by 0x1040 copies each nibble to bits 6-9 and 12-15,
    # and the mask keeps the magnitude at bits 6-8 and the sign at bit 15.
    _ASM_DECODE = """
    .reg .b32 r4, t0, t1, t2, t3, nz;
    mov.b32 nz, 0x80008000;
    shr.u32 r4, $8, 4;
    prmt.b32 t0, $8, r4, 0x0400;
    prmt.b32 t1, $8, r4, 0x0501;
    prmt.b32 t2, $8, r4, 0x0602;
    prmt.b32 t3, $8, r4, 0x0703;
    and.b32 t0, t0, 0x000F000F;
    and.b32 t1, t1, 0x000F000F;
    and.b32 t2, t2, 0x000F000F;
    and.b32 t3, t3, 0x000F000F;
    mul.lo.u32 t0, t0, 0x1040;
    mul.lo.u32 t1, t1, 0x1040;
    mul.lo.u32 t2, t2, 0x1040;
    mul.lo.u32 t3, t3, 0x1040;
    and.b32 t0, t0, 0x81C081C0;
    and.b32 t1, t1, 0x81C081C0;
    and.b32 t2, t2, 0x81C081C0;
    and.b32 t3, t3, 0x81C081C0;
    """
    # t_j now read as e2m1 * 2^-126 in bf16 (a subnormal for +-0.5, exact); one fma applies
    # the scale factor block_scale * 2^(126 - J).
    _ASM_BF16_FMA = """
    fma.rn.bf16x2 t0, t0, $9, nz;
    fma.rn.bf16x2 t1, t1, $9, nz;
    fma.rn.bf16x2 t2, t2, $9, nz;
    fma.rn.bf16x2 t3, t3, $9, nz;
    """
    _ASM_HALVES = """
    mov.b32 {$0, $1}, t0;
    mov.b32 {$2, $3}, t1;
    mov.b32 {$4, $5}, t2;
    mov.b32 {$6, $7}, t3;
    """
    _ASM_BF16 = tl.constexpr("{" + _ASM_DECODE + _ASM_BF16_FMA + _ASM_HALVES + "}")
    # fp16: move the magnitude up 3 bits (to bits 9-11) and keep the sign: e2m1 * 2^-14 in
    # fp16 (a subnormal for +-0.5, exact); the fma applies block_scale * 2^(14 - J).
    _ASM_F16 = tl.constexpr("{" + _ASM_DECODE + """
    .reg .b32 u0, u1, u2, u3;
    shl.b32 u0, t0, 3;
    shl.b32 u1, t1, 3;
    shl.b32 u2, t2, 3;
    shl.b32 u3, t3, 3;
    lop3.b32 t0, u0, t0, 0x8E008E00, 0xA8;
    lop3.b32 t1, u1, t1, 0x8E008E00, 0xA8;
    lop3.b32 t2, u2, t2, 0x8E008E00, 0xA8;
    lop3.b32 t3, u3, t3, 0x8E008E00, 0xA8;
    fma.rn.f16x2 t0, t0, $9, nz;
    fma.rn.f16x2 t1, t1, $9, nz;
    fma.rn.f16x2 t2, t2, $9, nz;
    fma.rn.f16x2 t3, t3, $9, nz;
    """ + _ASM_HALVES + "}")
    # fp32 outputs for the FMA kernel: a bf16 value widened is its bits shifted up 16.
    _ASM_F32 = tl.constexpr("{" + _ASM_DECODE + _ASM_BF16_FMA + """
    shl.b32 $0, t0, 16;
    and.b32 $1, t0, 0xFFFF0000;
    shl.b32 $2, t1, 16;
    and.b32 $3, t1, 0xFFFF0000;
    shl.b32 $4, t2, 16;
    and.b32 $5, t2, 0xFFFF0000;
    shl.b32 $6, t3, 16;
    and.b32 $7, t3, 0xFFFF0000;
    }""")

    @triton.jit
    def _e4m3_to_f32(s, EXTRA: tl.constexpr):
        """E4M3 bytes (int32) to fp32 ``value * 2^EXTRA`` (EXTRA in [-120, 119]).

        Built from bits: a subnormal code (exponent 0) gets exponent 1 so it reads as a normal
        number, and subtracting that number's implicit leading one leaves m * 2^-9 exactly
        (0 for the zero code). NaN (0x7F) stays NaN.
        """
        mag = s & 0x7F
        sub = mag < 8
        v = (((mag + tl.where(sub, 8, 0)) << 20) + ((120 + EXTRA) << 23)).to(tl.float32,
                                                                              bitcast=True)
        v = v - tl.where(sub, 2.0 ** (EXTRA - 6), 0.0)
        v = (v.to(tl.int32, bitcast=True) | ((s & 0x80) << 24)).to(tl.float32, bitcast=True)
        return tl.where(mag == 0x7F, float("nan"), v)

    @triton.jit
    def _pow2_from_e8m0(e, OFFSET: tl.constexpr):
        """fp32 2^(e - 127 + OFFSET) of E8M0 bytes ``e`` (int32); 255 is NaN."""
        t = e + OFFSET
        v = (tl.minimum(tl.maximum(t, 1), 254) << 23).to(tl.float32, bitcast=True)
        v = tl.where(t < 1, 0.0, v)
        v = tl.where(t > 254, float("inf"), v)
        return tl.where(e == 255, float("nan"), v)

    @triton.jit
    def _scale_factor(sc, IS_NV: tl.constexpr, EXTRA: tl.constexpr):
        """Block scales (uint8) as fp32 ``block_scale * 2^(EXTRA - J)``."""
        s = sc.to(tl.int32)
        if IS_NV:
            return _e4m3_to_f32(s, EXTRA - 7)
        else:
            return _pow2_from_e8m0(s, EXTRA - 64)

    @triton.jit
    def _scale_operand(sc, IS_NV: tl.constexpr, F16: tl.constexpr, USE_ASM: tl.constexpr):
        """What ``_dequant_words`` multiplies by: fp32 factor, or its bf16/f16 pair bits."""
        if USE_ASM:
            if F16:
                h = _scale_factor(sc, IS_NV, 14).to(tl.float16).to(tl.int16, bitcast=True)
            else:
                h = _scale_factor(sc, IS_NV, 126).to(tl.bfloat16).to(tl.int16, bitcast=True)
            h = h.to(tl.int32) & 0xFFFF
            return h | (h << 16)
        else:
            return _scale_factor(sc, IS_NV, 0)

    @triton.jit
    def _e2m1_to_f32(c):
        """E2M1 codes (int32, 0..15) to fp32 without a table."""
        mag = c & 7
        v = ((mag << 22) + (126 << 23)).to(tl.float32, bitcast=True)
        v = tl.where(mag < 2, mag.to(tl.float32) * 0.5, v)
        return tl.where(c >= 8, -v, v)

    @triton.jit
    def _code(words, J: tl.constexpr, s):
        return _e2m1_to_f32((words >> (4 * J)) & 15) * s

    @triton.jit
    def _interleave8(v0, v1, v2, v3, v4, v5, v6, v7):
        """[R, C] x 8 -> [R, 8C] with out[:, 8c + j] = v_j[:, c] (register-only joins)."""
        w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)),
                    tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        return tl.reshape(w, (w.shape[0], 8 * w.shape[1]))

    @triton.jit
    def _dequant_words(words, s, F16: tl.constexpr, USE_ASM: tl.constexpr, F32: tl.constexpr):
        """Packed int32 words [R, C] -> values [R, 8C] in k order: e2m1 * block_scale * 2^-J.

        fp32 if ``F32`` (exact), else fp16 if ``F16``, else bf16 (exact either way, at most 6
        significant bits). ``s`` comes from ``_scale_operand`` and is broadcast per word.
        """
        if USE_ASM:
            if F32:
                v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                    _ASM_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words, s],
                    dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            elif F16:
                v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                    _ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, s],
                    dtype=(tl.float16,) * 8, is_pure=True, pack=1)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                    _ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, s],
                    dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
            return _interleave8(v0, v1, v2, v3, v4, v5, v6, v7)
        else:
            w = _interleave8(_code(words, 0, s), _code(words, 1, s), _code(words, 2, s),
                             _code(words, 3, s), _code(words, 4, s), _code(words, 5, s),
                             _code(words, 6, s), _code(words, 7, s))
            if F32:
                return w
            return w.to(tl.float16 if F16 else tl.bfloat16)

    @triton.jit
    def _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw, kw_end, stride_pn, stride_sn,
                          BLOCK_N: tl.constexpr, BKW: tl.constexpr, WPB: tl.constexpr,
                          SCALE_RUN: tl.constexpr = 0):
        """Packed words [BLOCK_N, BKW] from word column ``kw`` and their block scales.

        ``SCALE_RUN`` > 0 caps the scale loads at that many bytes a thread, which puts the
        scales in the same register layout as the GEMV's per-group sums (no shuffling
        through shared memory each tile).
        """
        NBLK: tl.constexpr = BKW // WPB
        offs_w = tl.arange(0, BKW)
        offs_s = tl.arange(0, NBLK)
        if SCALE_RUN > 0:
            offs_s = tl.max_contiguous(offs_s, SCALE_RUN)
        rows = offs_n.to(tl.int64)
        pk = tl.load(p_ptr + rows[:, None] * stride_pn + (kw + offs_w)[None, :],
                     mask=n_mask[:, None] & (offs_w < kw_end - kw)[None, :], other=0)
        sblk = kw // WPB
        sc = tl.load(s_ptr + rows[:, None] * stride_sn + (sblk + offs_s)[None, :],
                     mask=n_mask[:, None] & (offs_s < (kw_end // WPB) - sblk)[None, :], other=0)
        return pk, sc

    @triton.jit
    def _weight_values(pk, sc, IS_NV: tl.constexpr, F16: tl.constexpr, USE_ASM: tl.constexpr,
                       F32: tl.constexpr, BLOCK_N: tl.constexpr, BKW: tl.constexpr,
                       WPB: tl.constexpr):
        """Dequantized tile [BLOCK_N, 8 * BKW] from packed words and block scales."""
        NBLK: tl.constexpr = BKW // WPB
        s = _scale_operand(sc, IS_NV, F16 and not F32, USE_ASM)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NBLK, WPB)), (BLOCK_N, BKW))
        return _dequant_words(pk, s, F16, USE_ASM, F32)

    @triton.jit
    def _epilogue(acc, ts_ptr, b_ptr, o_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, pid_k,
                  IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, SCALED_J: tl.constexpr = True,
                  TS_ROWS: tl.constexpr = False):
        """Undo 2^-J (if ``SCALED_J``), apply the tensor scale (one per output column with
        ``TS_ROWS``: weight rows of several layers, each with its own) and the bias (split 0
        only), store."""
        if IS_NV:
            if TS_ROWS:
                ts = tl.load(ts_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            else:
                ts = tl.load(ts_ptr).to(tl.float32)
            if SCALED_J:
                acc = acc * (ts * 128.0)  # 2^7
            else:
                acc = acc * ts
        elif SCALED_J:
            acc = acc * 18446744073709551616.0  # 2^64
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc = acc + tl.where(pid_k == 0, bias, 0.0)[None, :]
        o_ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    # --------------------------------------------------------------------- kernels

    # GEMV (one row): the row's values become fp16 pairs, scaled per 16 values by a power of
    # two (``_row_pairs``), and one PTX block multiplies two packed words (16 codes) by them
    # with packed fp16 FMAs. The decode is built for the integer pipes, which run at
    # half the rate of the fp16 ones: 13 integer instructions a word (8 codes), against 22
    # when decoding to fp32. Per pair of codes, one ``prmt`` builds two 16-bit lanes from
    # bytes of the word (or of the word shifted left 4): the low byte holds the code in its
    # high nibble, the high byte is the code's sign replicated (prmt's sign mode). Masking
    # 0x0470 keeps the magnitude at bits 4-6 and a sign bit at 10; a multiply by 32 moves
    # them to bits 9-11 and 15, which reads as fp16 e2m1 * 2^-14 (a subnormal for +-0.5,
    # exact). Selector 0x9180 picks bytes 0 and 1, 0xB3A2 bytes 2 and 3: the pairs are
    # (k1, k3), (k0, k2), (k5, k7), (k4, k6), the order of x's pairs.
    def _gemv_word_ptx(word: str, pairs: tuple[str, ...], first: bool) -> str:
        lines = [f"shl.b32 e, {word}, 4;"]
        sources = ((word, "0x9180"), ("e", "0x9180"), (word, "0xB3A2"), ("e", "0xB3A2"))
        for j, ((src, sel), pair) in enumerate(zip(sources, pairs, strict=True)):
            lines += [f"prmt.b32 m, {src}, {src}, {sel};", "and.b32 m, m, 0x04700470;",
                      "mul.lo.u32 m, m, 32;",
                      f"mul.rn.f16x2 acc, m, {pair};" if first and j == 0 else
                      f"fma.rn.f16x2 acc, m, {pair}, acc;"]
        return "\n".join(lines)

    # $0 = the fp32 sum of 16 products (times 2^-14); $1, $2 = two words; $3..$10 = their
    # x pairs.
    _ASM_GEMV = tl.constexpr("\n".join([
        "{", ".reg .b32 e, m, acc;", ".reg .b16 h0, h1;", ".reg .f32 f0, f1;",
        _gemv_word_ptx("$1", ("$3", "$4", "$5", "$6"), True),
        _gemv_word_ptx("$2", ("$7", "$8", "$9", "$10"), False),
        "mov.b32 {h0, h1}, acc;", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;",
        "add.f32 $0, f0, f1;", "}"]))

    @triton.jit
    def _half(pair, HIGH: tl.constexpr):
        """One fp16 lane of an x pair (int32), as fp32."""
        h = (pair >> 16) if HIGH else pair
        return (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _word_dot(w, p0, p1, p2, p3):
        """The plain-Triton twin of one word of ``_ASM_GEMV`` (fp32 sums)."""
        return (_e2m1_to_f32((w >> 4) & 15) * _half(p0, False)
                + _e2m1_to_f32((w >> 12) & 15) * _half(p0, True)
                + _e2m1_to_f32(w & 15) * _half(p1, False)
                + _e2m1_to_f32((w >> 8) & 15) * _half(p1, True)
                + _e2m1_to_f32((w >> 20) & 15) * _half(p2, False)
                + _e2m1_to_f32((w >> 28) & 15) * _half(p2, True)
                + _e2m1_to_f32((w >> 16) & 15) * _half(p3, False)
                + _e2m1_to_f32((w >> 24) & 15) * _half(p3, True))

    @triton.jit
    def _group_dots(pk, pairs, USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
        """Words [BLOCK_N, 2G] times the row's fp16 pairs (8 planes [G], ``_row_pairs``)
        -> [BLOCK_N, G]: per group of 16 k, sum x * e2m1."""
        w0, w1 = tl.split(tl.reshape(pk, (BLOCK_N, G, 2)))
        a0, a1, a2, a3, b0, b1, b2, b3 = pairs
        if USE_ASM:
            shape: tl.constexpr = (BLOCK_N, G)
            return tl.inline_asm_elementwise(
                _ASM_GEMV, "=f,r,r,r,r,r,r,r,r,r,r",
                [w0, w1, tl.broadcast_to(a0[None, :], shape), tl.broadcast_to(a1[None, :], shape),
                 tl.broadcast_to(a2[None, :], shape), tl.broadcast_to(a3[None, :], shape),
                 tl.broadcast_to(b0[None, :], shape), tl.broadcast_to(b1[None, :], shape),
                 tl.broadcast_to(b2[None, :], shape), tl.broadcast_to(b3[None, :], shape)],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            return (_word_dot(w0, a0[None, :], a1[None, :], a2[None, :], a3[None, :])
                    + _word_dot(w1, b0[None, :], b1[None, :], b2[None, :], b3[None, :])) * 2.0**-14

    @triton.jit
    def _row_groups(x_ptr, u_ptr, kw, kw_end, K, G: tl.constexpr, NORM: tl.constexpr):
        """The row's values [G, 16] (fp32) of the 16-groups of word columns ``kw`` on
        (zero past ``kw_end`` and past ``K``), and with ``NORM`` the norm weight's there
        (else the row again)."""
        grp = kw // 2 + tl.arange(0, G)
        k = 16 * grp[:, None] + tl.arange(0, 16)[None, :]
        mask = (grp < kw_end // 2)[:, None] & (k < K)
        x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            return x, tl.load(u_ptr + k, mask=mask, other=0.0).to(tl.float32)
        return x, x

    @triton.jit
    def _row_pairs(xv, G: tl.constexpr):
        """Groups of the row (``_row_groups``) as ``_ASM_GEMV``'s operands: 8 planes [G] of
        fp16 pairs, and each group's scale [G].

        Each group of 16 is multiplied by the power of two that puts its largest |x| in
        [2^14, 2^15): with the decoded weights (e2m1 * 2^-14) the products stay below 12 and
        16 of them below 192, inside fp16's range whatever the activations' magnitude, and
        bf16 / fp16 inputs convert exactly. The scale, 2^(14 - shift), undoes the scaling and
        the decode's 2^-14. Plane i of a group pairs the values at k = 8a + 4b + d and that
        + 2 (lanes low, high) with a = i // 4, b = (i % 4) // 2, d = 1 - i % 2: the order in
        which ``_ASM_GEMV`` decodes a word's codes.
        """
        amax = tl.max(tl.abs(xv), axis=1)
        e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        shift = tl.where((e == 0) | (e == 255), 0, tl.minimum(141 - e, 126))
        up = ((shift + 127) << 23).to(tl.float32, bitcast=True)[:, None]
        h = (xv * up).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        # k = 8a + 4b + 2c + d: the lanes of a pair differ in c
        lo, hi = tl.split(tl.permute(tl.reshape(h, (G, 2, 2, 2, 2)), (0, 1, 2, 4, 3)))
        d0, d1 = tl.split(lo | (hi << 16))  # [G, a, b] each
        d1b0, d1b1 = tl.split(d1)
        d0b0, d0b1 = tl.split(d0)
        p0a0, p0a1 = tl.split(d1b0)
        p1a0, p1a1 = tl.split(d0b0)
        p2a0, p2a1 = tl.split(d1b1)
        p3a0, p3a1 = tl.split(d0b1)
        scale = ((141 - shift) << 23).to(tl.float32, bitcast=True)
        return (p0a0, p1a0, p2a0, p3a0, p0a1, p1a1, p2a1, p3a1), scale

    @triton.jit
    def _split_fixup(part_ptr, count_ptr, o_ptr, offs_n, n_mask, N, SPLIT_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """After a program stored its split's partial sums (row ``pid_k`` of ``part_ptr``
        [SPLIT_K, N], fp32): count it in at ``count_ptr`` (its N tile's counter); the last
        program of the tile to arrive adds the SPLIT_K rows up in split order (the same sum
        whichever program came last), stores it to ``o_ptr`` in o's dtype and sets the
        counter back to zero for the next launch."""
        tl.debug_barrier()  # every thread's partial sums are stored before the count
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for i in tl.static_range(SPLIT_K):  # .cg: from L2, where the others' stores are
                total += tl.load(part_ptr + i * N + offs_n, mask=n_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(o_ptr + offs_n, total.to(o_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(count_ptr, 0, sem="relaxed")

    @triton.jit
    def _fp4_gemv_kernel(
        x_ptr, u_ptr, p_ptr, s_ptr, ts_ptr, b_ptr, o_ptr, part_ptr, count_ptr,
        N, K, KW, stride_pn, stride_sn, K_SPLIT, M_KEY, EPS,
        IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
        USE_ASM: tl.constexpr, HW_E4M3: tl.constexpr, PDL: tl.constexpr, TS_ROWS: tl.constexpr,
        PREFETCH: tl.constexpr, NORM: tl.constexpr, INTERP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[0, n] = sum_k x[0, k] w[n, k] for one activation row ``x``.

        Each program owns BLOCK_N rows and (with split-K) a K range, and turns the row's
        values of each tile into fp16 pairs itself (``_row_pairs``): one launch a product.
        Per 16 k the products are summed in fp16 (exact products, 16 terms below 192:
        relative error ~1e-3 of that partial sum, like bf16 rounding of the output) and the
        partial sum, times the block scale and the row's group scale, joins an fp32
        accumulator. With ``PREFETCH`` 1 or 2 the weight tiles of the next iterations are
        loaded into registers before the current one is decoded, so more loads per warp are
        in flight; 0 leaves the loads in the loop. With ``PDL`` (programmatic dependent
        launch, sm90+) the program starts while the kernel before it still runs: it loads
        its first weight tiles, then waits for that kernel before reading the row.
        With split-K, program k writes its partial sums to row k of ``part_ptr`` and the
        last program of each N tile adds them up into ``o`` (``_split_fixup``; the tile
        counters at ``count_ptr`` are zero before the launch and after it): still one
        launch, and the same sum as a separate kernel adding the rows in order.
        With ``NORM`` (unsplit only) the row is the RMSNorm of ``x`` with weight ``u_ptr``
        and epsilon ``EPS``: the program multiplies the weight by ``u * x``, sums ``x^2``
        over the row as it goes, and scales its sums by ``rsqrt(mean(x^2) + EPS)`` at the
        end, so the norm needs no launch of its own and adds no wait before the first tile.
        """
        BKW: tl.constexpr = BLOCK_K // 8
        G: tl.constexpr = BKW // 2
        WPB: tl.constexpr = 2 if IS_NV else 4
        NBLK: tl.constexpr = BKW // WPB
        SRUN: tl.constexpr = 2 if IS_NV else 1
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kw_start = pid_k * K_SPLIT
        kw_end = tl.minimum(kw_start + K_SPLIT, KW)
        acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        if PREFETCH >= 1:
            pk, sc = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw_start, kw_end,
                                       stride_pn, stride_sn, BLOCK_N, BKW, WPB, SRUN)
        if PREFETCH >= 2:
            pk2, sc2 = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw_start + BKW, kw_end,
                                         stride_pn, stride_sn, BLOCK_N, BKW, WPB, SRUN)
        if PDL:
            gdc_wait()
        if NORM:
            squares = tl.zeros((G, 16), dtype=tl.float32)
        if PREFETCH >= 1:
            xv, uv = _row_groups(x_ptr, u_ptr, kw_start, kw_end, K, G, NORM)
        for kw in range(kw_start, kw_start + K_SPLIT, BKW):
            kw = tl.multiple_of(kw, BKW)  # splits start on whole tiles: vector weight loads
            if PREFETCH == 0:  # left to the compiler's pipeliner (num_stages)
                pk_cur, sc_cur = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw, kw_end,
                                                   stride_pn, stride_sn, BLOCK_N, BKW, WPB, SRUN)
                xv_cur, uv_cur = _row_groups(x_ptr, u_ptr, kw, kw_end, K, G, NORM)
            else:
                pk_cur = pk
                sc_cur = sc
                xv_cur = xv
                uv_cur = uv
                xv, uv = _row_groups(x_ptr, u_ptr, kw + BKW, kw_end, K, G, NORM)
            if PREFETCH >= 2:
                pk = pk2
                sc = sc2
                pk2, sc2 = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw + 2 * BKW,
                                             kw_end, stride_pn, stride_sn, BLOCK_N, BKW, WPB, SRUN)
            elif PREFETCH == 1:
                pk, sc = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw + BKW, kw_end,
                                           stride_pn, stride_sn, BLOCK_N, BKW, WPB, SRUN)
            if NORM:
                squares += xv_cur * xv_cur
                xv_cur = xv_cur * uv_cur
            pairs, xs = _row_pairs(xv_cur, G)
            # The block scales at their true values (no 2^-J): the products below then stay
            # within a factor 192 of the contributions to the output, whatever x's range.
            if IS_NV and HW_E4M3:  # one cvt for two scales
                f = sc_cur.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                f = _scale_factor(sc_cur, IS_NV, 7 if IS_NV else 64)
            if not IS_NV:  # one MXFP4 scale per two groups of 16
                f = tl.reshape(tl.broadcast_to(f[:, :, None], (BLOCK_N, NBLK, 2)), (BLOCK_N, G))
            acc += _group_dots(pk_cur, pairs, USE_ASM, BLOCK_N, G) * (f * xs[None, :])
        sums = tl.sum(acc, axis=1)[None, :]
        if NORM:
            variance = tl.sum(tl.sum(squares, axis=1), axis=0) / K
            if INTERP:  # the interpreter has no libdevice
                sums = sums * tl.math.rsqrt(variance + EPS)
            else:
                sums = sums * libdevice.rsqrt(variance + EPS)
        one = tl.arange(0, 1)
        if SPLIT_K == 1:
            _epilogue(sums, ts_ptr, b_ptr, o_ptr, one, offs_n, one < 1, n_mask, 0, pid_k, IS_NV,
                      HAS_BIAS, False, TS_ROWS)
        else:
            _epilogue(sums, ts_ptr, b_ptr, part_ptr + pid_k.to(tl.int64) * N, one, offs_n,
                      one < 1, n_mask, 0, pid_k, IS_NV, HAS_BIAS, False, TS_ROWS)
            _split_fixup(part_ptr, count_ptr + pid_n, o_ptr, offs_n, n_mask, N, SPLIT_K, BLOCK_N)

    @triton.jit
    def _fp4_dequant_kernel(
        w_ptr, s_ptr, ts_ptr, o_ptr, N, K, KW, stride_wn, stride_sn, stride_on,
        IS_NV: tl.constexpr, TS_ROWS: tl.constexpr, USE_ASM: tl.constexpr,
        BLOCK_N: tl.constexpr, BKW: tl.constexpr,
    ):
        """Rows of the weight dequantized into ``o`` ([rows, K], bf16/fp16/fp32) for cuBLAS.

        A tile is ``BLOCK_N`` rows by ``BKW`` packed int32 words (8 codes each). Bit for bit
        :meth:`FP4Weight.dequantize`: the codes as exact fp32 values (the PTX decode, or
        ``_e2m1_to_f32`` in the interpreter) times the block's fp32 multiplier (NVFP4: tensor
        scale x block scale, rounded once; MXFP4: 2^(e - 127), exact), then one cast. The
        multiplier is worked out once per block, not per code. ``TS_ROWS``: an NVFP4 tensor
        scale per row (the rows of several layers).
        """
        WPB: tl.constexpr = 2 if IS_NV else 4
        NBLK: tl.constexpr = BKW // WPB
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kw = tl.program_id(1) * BKW
        pk, sc = _load_weight_tile(w_ptr, s_ptr, offs_n, n_mask, kw, KW, stride_wn, stride_sn,
                                   BLOCK_N, BKW, WPB)
        sc = sc.to(tl.int32)
        if IS_NV:
            if TS_ROWS:
                ts = tl.load(ts_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            else:
                ts = tl.load(ts_ptr).to(tl.float32)
            mult = ts * _e4m3_to_f32(sc, 0)
        else:  # 2^-127 (byte 0) has no exponent field of its own: its subnormal bits
            mult = tl.where(sc == 0, 1 << 22, sc << 23).to(tl.float32, bitcast=True)
            mult = tl.where(sc == 255, float("nan"), mult)
        mult = tl.reshape(tl.broadcast_to(mult[:, :, None], (BLOCK_N, NBLK, WPB)), (BLOCK_N, BKW))
        if USE_ASM:  # the scale operand 2^126 (bf16 pair) turns e2m1 * 2^-126 into e2m1
            one = tl.full((BLOCK_N, BKW), 0x7E807E80, tl.int32)
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _ASM_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [pk, one],
                dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            v0, v1, v2, v3 = _code(pk, 0, 1.0), _code(pk, 1, 1.0), _code(pk, 2, 1.0), _code(pk, 3, 1.0)
            v4, v5, v6, v7 = _code(pk, 4, 1.0), _code(pk, 5, 1.0), _code(pk, 6, 1.0), _code(pk, 7, 1.0)
        dt = o_ptr.dtype.element_ty
        w = _interleave8((v0 * mult).to(dt), (v1 * mult).to(dt), (v2 * mult).to(dt),
                         (v3 * mult).to(dt), (v4 * mult).to(dt), (v5 * mult).to(dt),
                         (v6 * mult).to(dt), (v7 * mult).to(dt))
        k = 8 * kw + tl.arange(0, 8 * BKW)
        tl.store(o_ptr + offs_n.to(tl.int64)[:, None] * stride_on + k[None, :], w,
                 mask=n_mask[:, None] & (k < K)[None, :])

    @triton.jit
    def _fp4_dot_kernel(
        x_ptr, p_ptr, s_ptr, ts_ptr, b_ptr, o_ptr,
        M, N, K, KW, stride_xm, stride_pn, stride_sn, stride_om, K_SPLIT, M_KEY,
        IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
        USE_ASM: tl.constexpr, F16: tl.constexpr, TS_ROWS: tl.constexpr, PREFETCH: tl.constexpr,
        INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr,
    ):
        """Tiled out = x @ W^T, W dequantized per [BLOCK_N, BLOCK_K] tile in registers.

        The x tile is a plain load the compiler pipelines into shared memory. ``SWAP``
        computes out^T = W @ x^T instead, so for a few rows the weight tile is the wide
        operand (Hopper's wgmma needs 64 rows there). ``INTERP`` (the CPU interpreter,
        whose bf16 dot is wrong) runs the dots in fp32 on the same bf16-rounded values.
        """
        BKW: tl.constexpr = BLOCK_K // 8
        WPB: tl.constexpr = 2 if IS_NV else 4
        CDT: tl.constexpr = tl.float16 if F16 else tl.bfloat16
        DDT: tl.constexpr = tl.float32 if INTERP else CDT
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        kw_start = pid_k * K_SPLIT
        kw_end = tl.minimum(kw_start + K_SPLIT, KW)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PREFETCH:
            pk, sc = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw_start, kw_end,
                                       stride_pn, stride_sn, BLOCK_N, BKW, WPB)
        for kw in range(kw_start, kw_start + K_SPLIT, BKW):
            kw = tl.multiple_of(kw, BKW)
            if PREFETCH:
                pk_cur = pk
                sc_cur = sc
                pk, sc = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw + BKW, kw_end,
                                           stride_pn, stride_sn, BLOCK_N, BKW, WPB)
            else:
                pk_cur, sc_cur = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw, kw_end,
                                                   stride_pn, stride_sn, BLOCK_N, BKW, WPB)
            w = _weight_values(pk_cur, sc_cur, IS_NV, F16, USE_ASM, False, BLOCK_N, BKW,
                               WPB).to(DDT)
            kx = 8 * kw + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + kx[None, :], mask=m_mask[:, None] & (kx < K)[None, :],
                        other=0.0).to(CDT).to(DDT)
            if SWAP:
                acc = tl.dot(w, tl.trans(a), acc)
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        if SWAP:
            acc = tl.trans(acc)
        # With split-K, program k writes its partial sums to slice k of ``o`` [split, M, N].
        _epilogue(acc, ts_ptr, b_ptr, o_ptr + pid_k.to(tl.int64) * M * stride_om, offs_m,
                  offs_n, m_mask, n_mask, stride_om, pid_k, IS_NV, HAS_BIAS, True, TS_ROWS)

    @triton.jit
    def _fp4_grad_input_kernel(
        g_ptr, p_ptr, s_ptr, ts_ptr, o_ptr,
        M, N, K, KW, stride_gm, stride_pn, stride_sn, stride_om, N_SPLIT,
        IS_NV: tl.constexpr, SPLIT_N: tl.constexpr, USE_ASM: tl.constexpr,
        F16: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out = g @ W (the input gradient of ``x @ W^T``), W dequantized tile by tile.

        Each program owns a [BLOCK_M, BLOCK_K] output tile and, with ``SPLIT_N``, an
        ``N_SPLIT`` range of the reduction over weight rows (its fp32 partial sums go to
        slice ``pid_n`` of ``o``): the weight
        tile [BLOCK_N, BLOCK_K] is the same one the forward kernels decode, here used as
        the right-hand operand of ``tl.dot`` as it is laid out.
        """
        BKW: tl.constexpr = BLOCK_K // 8
        WPB: tl.constexpr = 2 if IS_NV else 4
        CDT: tl.constexpr = tl.float16 if F16 else tl.bfloat16
        DDT: tl.constexpr = tl.float32 if INTERP else CDT
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        kw = pid_k * BKW
        offs_k = 8 * kw + tl.arange(0, BLOCK_K)
        n_start = pid_n * N_SPLIT
        n_end = tl.minimum(n_start + N_SPLIT, N)
        g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(n_start, n_start + N_SPLIT, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_end
            pk, sc = _load_weight_tile(p_ptr, s_ptr, offs_n, n_mask, kw, KW, stride_pn,
                                       stride_sn, BLOCK_N, BKW, WPB)
            w = _weight_values(pk, sc, IS_NV, F16, USE_ASM, False, BLOCK_N, BKW, WPB).to(DDT)
            g = tl.load(g_rows + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                        other=0.0).to(CDT).to(DDT)
            acc = tl.dot(g, w, acc)
        _epilogue(acc, ts_ptr, o_ptr, o_ptr + pid_n.to(tl.int64) * M * stride_om, offs_m,
                  offs_k, m_mask, offs_k < K, stride_om, pid_n, IS_NV, False)

    @triton.jit
    def _split_sum_kernel(p_ptr, o_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """o = sum over the split-K slices of p [SPLIT, MN] in a fixed order (deterministic,
        unlike atomic adds), cast to o's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(SPLIT):
            acc += tl.load(p_ptr + i * MN + offs, mask=mask, other=0.0)
        tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)

    # --------------------------------------------------------------------- autotuning

    def _cfg(config: dict) -> triton.Config:
        meta = dict(config)
        return triton.Config(meta, num_warps=meta.pop("num_warps"),
                             num_stages=meta.pop("num_stages"))

    # The candidate lists (and why they are so short): apt_model.fp4.kernel_plan.
    GEMV_CONFIGS = [_cfg(c) for c in candidate_configs("gemv")]
    SMALL_CONFIGS = [_cfg(c) for c in candidate_configs("small")]
    GEMM_CONFIGS = [_cfg(c) for c in candidate_configs("gemm")]

    _KEY = ["M_KEY", "N", "K", "IS_NV", "HAS_BIAS", "SPLIT_K"]
    _gemv_tuned = triton.autotune(GEMV_CONFIGS, key=[*_KEY, "NORM"])(
        _fp4_gemv_kernel)
    _small_tuned = triton.autotune(SMALL_CONFIGS, key=_KEY)(
        _fp4_dot_kernel)
    _gemm_tuned = triton.autotune(GEMM_CONFIGS, key=_KEY)(
        _fp4_dot_kernel)


# ------------------------------------------------------------------------- host side


def config_dict(cfg) -> dict:
    """A ``triton.Config`` as the ``config`` dict a :class:`KernelPlan` takes."""
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def autotuned_config(kernel: str) -> dict | None:
    """The config the autotuner of ``kernel`` ("gemv", "small" or "gemm") ran at its latest
    autotuned launch, as a :class:`KernelPlan` config dict; None before any (or without
    Triton). Launches with a fixed config (:func:`~apt_model.fp4.kernel_plan.fixed_config`)
    do not go through the autotuner."""
    if not HAS_TRITON:
        return None
    tuned = {"gemv": _gemv_tuned, "small": _small_tuned, "gemm": _gemm_tuned}[kernel]
    best = getattr(tuned, "best_config", None)
    return None if best is None else config_dict(best)


def _large_kernel(x: Tensor, packed: Tensor, scales: Tensor, tensor_scale: Tensor | None,
                  k: int, bias: Tensor | None) -> str:
    """Large M: the fused GEMM or the chunked path, whichever is faster here.

    The fused GEMM never holds more than a tile of bf16 weight but pays for dequantizing
    each weight tile once per M tile, serialized with the tensor cores inside a CTA;
    the chunked path runs cuBLAS on weight slices of at most ``CHUNK_BYTES``. Which wins depends on
    the GPU and the shape, so the first call per (shape, M bucket, dtype) times both, like
    the autotuner does for configs (so, like autotuning, not inside CUDA-graph capture).
    ``VB_FP4_LARGE_KERNEL=gemm|chunked`` pins one; fp32 activations always take the
    fused GEMM (the chunked path is for 16-bit cuBLAS).
    """
    key = _large_key(x.device, packed.shape[0], k, x.shape[0], x.dtype, scales.dtype,
                     bias is not None)
    choice = _settled_large_kernel(key)
    if choice is None:
        times = {}
        for kernel in ("gemm", "chunked"):
            def run(kernel=kernel):
                return fp4_matmul(x, packed, scales, tensor_scale, k, bias,
                                  plan=KernelPlan(kernel))

            times[kernel] = _device_ms(run)
        choice = _remember_large_kernel(key, min(times, key=times.get))
    return choice


def _device_ms(run: Callable[[], object], calls: int = 5) -> float:
    """Device time of ``run()`` in ms: the median of replays of a CUDA graph of ``calls``
    calls (no launch gaps, so a slow host does not decide between kernels), or, where the
    graph cannot be captured, Triton's ``do_bench``. The first call (compiling, autotuning)
    runs before."""
    from triton.testing import do_bench

    run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            for _ in range(calls):
                run()
    except RuntimeError:  # e.g. capture not allowed here
        torch.cuda.synchronize()
        return do_bench(run, warmup=5, rep=25, return_mode="median")
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _index(device: torch.device) -> int:
    """A CUDA device's index (the current device for a bare "cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_arch(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, (0, 0) for others (cached: asked once a layer)."""
    return _capability(_index(device)) if device.type == "cuda" else (0, 0)


def _split_k(n: int, kw: int, device: torch.device, kernel: str, tile_words: int) -> int:
    """Split K only when the N tiles alone leave most multiprocessors idle (small layers),
    keeping at least 2 tiles of ``tile_words`` per split."""
    if device.type != "cuda" or kernel == "gemm":
        return 1
    tiles = cdiv(n, 32)
    sms = sm_count(_index(device))
    if tiles >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, tiles), kw // (2 * tile_words), 16))


def _k_splits(n: int, kw: int, device: torch.device, kernel: str, config: dict | None,
              split_k: int | None) -> tuple[int, int]:
    """(number of K splits, words of K per split) of an N x ``kw``-word product: ``split_k``
    if given, else :func:`_split_k`'s choice; a split is a whole number of tiles of any
    BLOCK_K the kernel may run (``config``'s, or every candidate's)."""
    configs = {"gemv": GEMV_CONFIGS, "small": SMALL_CONFIGS, "gemm": GEMM_CONFIGS}[kernel]
    tile_words = (config["BLOCK_K"] if config else max(c.kwargs["BLOCK_K"] for c in configs)) // 8
    split = split_k if split_k is not None else _split_k(n, kw, device, kernel, tile_words)
    k_split = kw if split <= 1 else cdiv(cdiv(kw, split), tile_words) * tile_words
    return cdiv(kw, k_split), k_split


def _config_meta(config: dict | None) -> dict:
    """A fixed config as launch keywords (weight prefetching on unless it says otherwise);
    empty when the autotuner picks."""
    meta = dict(config or {})
    if config is not None:
        meta.setdefault("PREFETCH", True)
    return meta


def _scale_operands(scales: Tensor, tensor_scale: Tensor | None) -> tuple[bool, Tensor, Tensor]:
    """(is NVFP4, the block scales as bytes, the tensor-scale pointer operand): MXFP4 has no
    tensor scale, so the kernels get the scale bytes there and never read them as one. An
    NVFP4 tensor scale is one fp32 value, or one per weight row ([N, 1]: the rows of several
    layers multiplied at once: the forward products and the dequantization, not the input
    gradient)."""
    s_bytes = scales.view(torch.uint8)
    ts = tensor_scale.reshape(-1) if tensor_scale is not None else s_bytes
    return scales.dtype == torch.float8_e4m3fn, s_bytes, ts


def _one_tensor_scale(ts: Tensor, is_nv: bool, what: str) -> None:
    if is_nv and ts.numel() != 1:
        raise ValueError(f"{what} takes one NVFP4 tensor scale, got {ts.numel()} (per-row scales "
                         "are for the forward products)")


def _as_words(packed: Tensor) -> Tensor:
    """The packed bytes as int32 words (4 bytes = 8 codes), copying only if misaligned."""
    if packed.stride(-1) != 1 or packed.stride(0) % 4 or packed.storage_offset() % 4:
        packed = packed.contiguous()
    return packed.view(torch.int32)


# Fewer, larger GEMMs waste less on partial waves, and every slice costs the host a launch
# and a cuBLAS call: at M = 512 one 112 MiB slice of 14336 -> 4096 ran 13% faster than
# two (H200; bench/fp4_variants.py, BENCHMARKS.md).
CHUNK_BYTES = 128 * 2**20


def _chunk_rows(n: int, k: int) -> int:
    """Weight rows per cuBLAS call of the chunked path: ``CHUNK_BYTES`` of bf16 (8192 rows
    for K = 8192), a multiple of 256."""
    rows = max(256, (CHUNK_BYTES // (2 * max(k, 1))) // 256 * 256)
    return min(rows, cdiv(n, 256) * 256)


# Dequantization tiles: 8 rows x 64 words (512 codes) per program, 4 warps (H200 sweep:
# bench/fp4_dequant.py, BENCHMARKS.md).
DEQUANT_BLOCK = dict(BLOCK_N=8, BKW=64, num_warps=4)


def _packed_rows(packed: Tensor) -> Tensor:
    """The packed codes with unit stride along a row (a copy only if they lack it)."""
    return packed if packed.stride(-1) == 1 else packed.contiguous()


class _DequantLaunch:
    """The dequantization of some weight rows (packed bytes, scale bytes) into a buffer of
    ``dtype`` with row stride ``stride_on``, worked out once: call it with the buffer."""

    __slots__ = ("operands", "key", "grid", "consts", "direct")

    def __init__(self, packed: Tensor, s_bytes: Tensor, ts: Tensor, is_nv: bool, k: int,
                 dtype: torch.dtype, stride_on: int) -> None:
        words = _as_words(packed)
        n, kw = words.shape
        cfg = DEQUANT_BLOCK
        self.grid = (cdiv(n, cfg["BLOCK_N"]), cdiv(kw, cfg["BKW"]))
        self.consts = dict(N=n, K=k, KW=kw, stride_wn=words.stride(0), stride_sn=s_bytes.stride(0),
                           stride_on=stride_on, IS_NV=is_nv, TS_ROWS=is_nv and ts.numel() > 1,
                           USE_ASM=not _interpreting(), **cfg)
        self.operands = (words, s_bytes, ts)
        self.key = ("dequant", packed.device.index, dtype, tuple(self.consts.items()))
        self.direct: tuple | None = None  # the compiled kernel's runner, once known

    def __call__(self, out: Tensor) -> None:
        direct = self.direct
        if direct is not None and out.data_ptr() % 16 == 0:  # as at the first launch
            runner, tail = direct
            runner(*self.operands, out, *tail)
            return
        direct = direct_launch(self.key, _fp4_dequant_kernel, self.grid, (*self.operands, out),
                               self.consts)
        if direct is not None and out.data_ptr() % 16 == 0 \
                and all(t.data_ptr() % 16 == 0 for t in self.operands):
            self.direct = direct


def _dequantize_rows(packed: Tensor, s_bytes: Tensor, ts: Tensor, is_nv: bool, k: int,
                     out: Tensor) -> None:
    """Weight rows (packed bytes, scale bytes) dequantized into ``out`` [rows, k]."""
    _DequantLaunch(packed, s_bytes, ts, is_nv, k, out.dtype, out.stride(0))(out)


def fp4_dequantize(packed: Tensor, scales: Tensor, tensor_scale: Tensor | None, k: int,
                   out: Tensor) -> Tensor:
    """The whole weight dequantized into ``out`` ([N, k], bf16 / fp16 / fp32), in one pass."""
    if not HAS_TRITON:
        raise RuntimeError("fp4_dequantize needs Triton")
    is_nv, s_bytes, ts = _scale_operands(scales, tensor_scale)
    if out.numel():
        _dequantize_rows(_packed_rows(packed), s_bytes, ts, is_nv, k, out)
    return out


def _slices(packed: Tensor, s_bytes: Tensor, ts: Tensor, is_nv: bool, k: int, dtype: torch.dtype,
            rows: int | None) -> list[tuple[int, int, _DequantLaunch]]:
    """(first row, end row, its dequantization) for each slice of ``rows`` weight rows
    (default :func:`_chunk_rows`) of the chunked path, into a contiguous buffer."""
    n = packed.shape[0]
    rows = rows or _chunk_rows(n, k)
    per_row_ts = is_nv and ts.numel() > 1
    return [(r0, min(n, r0 + rows),
             _DequantLaunch(packed[r0:r0 + rows], s_bytes[r0:r0 + rows],
                            ts[r0:r0 + rows] if per_row_ts else ts, is_nv, k, dtype, k))
            for r0 in range(0, n, rows)]


def _multiply(x: Tensor, part: Tensor, bias: Tensor | None, out: Tensor, r0: int, r1: int) -> None:
    """Output columns [r0, r1) = x @ part.T (+ bias's), by cuBLAS (the whole ``out`` when the
    slice is all of it)."""
    if r1 - r0 != out.shape[1]:
        out = out[:, r0:r1]
        bias = None if bias is None else bias[r0:r1]
    if bias is None:
        torch.mm(x, part.T, out=out)
    else:
        torch.addmm(bias, x, part.T, out=out)


def _chunked(x: Tensor, slices: list[tuple[int, int, _DequantLaunch]], bias: Tensor | None,
             out: Tensor) -> Tensor:
    """Large M: dequantize the weight a slice at a time (``slices``, :func:`_slices`) into a
    bf16/fp16 buffer (Triton, memory-bound) and let cuBLAS multiply each slice into its
    output columns: cuBLAS speed plus a streaming pass, with one slice of the weight in bf16
    at a time. (Dequantizing the next slice on a side stream while cuBLAS multiplies gained
    nothing at 512 rows and -4% to +5% at 4096 on an H200: BENCHMARKS.md.)
    """
    rows = slices[0][1] - slices[0][0]
    buf = torch.empty((rows, x.shape[1]), dtype=x.dtype, device=x.device)
    for r0, r1, launch in slices:
        part = buf if r1 - r0 == rows else buf[: r1 - r0]
        launch(part)
        _multiply(x, part, bias, out, r0, r1)
    return out


def _split_sum(partials: Tensor, out: Tensor) -> tuple | None:
    """``out`` = the sum of ``partials`` [split, *out.shape] (fp32) over the first dim; returns
    the compiled kernel's launch (:func:`~apt_model.ops.triton_launch.direct_launch`)."""
    block = 1024
    numel = out.numel()
    return direct_launch(("split_sum", out.device.index, out.dtype, numel, partials.shape[0]),
                   _split_sum_kernel, (cdiv(numel, block),), (partials, out),
                   dict(MN=numel, SPLIT=partials.shape[0], BLOCK=block))


# Grad-input tiles: a weight tile of 64 rows x 128 columns per step. Of 12 tilings timed on
# an H100 (BLOCK_N 64/128 x BLOCK_K 64/128/256 x 4/8 warps; M = 16 and 64, 8192 -> 28672
# and 2048 -> 5632) it was the best or within 1% in three cases, 13% behind 128 x 64 in one.
GRAD_INPUT_BLOCK = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)


def fp4_grad_input(
    grad: Tensor,
    packed: Tensor,
    scales: Tensor,
    tensor_scale: Tensor | None,
    k: int,
    *,
    use_asm: bool | None = None,
    split_n: int | None = None,
) -> Tensor:
    """``grad @ dequant(W)`` for 2-D ``grad`` [M, N]: the input gradient of ``x @ W^T``.

    Same operands as :func:`fp4_matmul`; returns [M, k] in grad's dtype. Meant for few
    rows (it is one kernel, not a GEMM family): the reduction over N is split across
    programs so a few K tiles still fill the GPU.
    """
    if not HAS_TRITON:
        raise RuntimeError("fp4_grad_input needs Triton")
    is_nv, s_bytes, ts = _scale_operands(scales, tensor_scale)
    _one_tensor_scale(ts, is_nv, "fp4_grad_input")
    m, n = grad.shape
    words = _as_words(packed)
    kw = words.shape[1]
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    if use_asm is None:
        use_asm = not _interpreting()
    cfg = GRAD_INPUT_BLOCK
    block_m = max(16, min(64, next_pow2(m)))
    tiles = cdiv(k, cfg["BLOCK_K"]) * cdiv(m, block_m)
    if split_n is None:
        split_n = 1
        if grad.device.type == "cuda":
            split_n = max(1, min(cdiv(2 * sm_count(_index(grad.device)), tiles),
                                 n // (4 * cfg["BLOCK_N"])))
    n_split = cdiv(cdiv(n, split_n), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    split_n = cdiv(n, n_split) if n else 1
    result = torch.empty((m, k), dtype=grad.dtype, device=grad.device)
    if m == 0 or k == 0:
        return result
    if n == 0:
        return result.zero_()
    # Split programs write fp32 partial sums [split, M, K], added in a fixed order after.
    out = torch.empty((split_n, m, k), dtype=torch.float32, device=grad.device) \
        if split_n > 1 else result
    grid = (cdiv(k, cfg["BLOCK_K"]), split_n, cdiv(m, block_m))
    _fp4_grad_input_kernel[grid](
        grad, words, s_bytes, ts, out, m, n, k, kw, grad.stride(0), words.stride(0),
        s_bytes.stride(0), k, n_split, IS_NV=is_nv, SPLIT_N=split_n,
        USE_ASM=use_asm, F16=grad.dtype == torch.float16 and is_nv, INTERP=_interpreting(),
        BLOCK_M=block_m, **cfg)
    if split_n > 1:
        _split_sum(out, result)
    return result


# (device index, raw stream) -> fp32 scratch for the split-K partial sums of every one-row
# product on that stream. Kernels on one stream run in order, so each product's GEMV is done
# with it before the next product's GEMV writes it: one buffer serves every layer of a decode
# step, with no allocation per call. Replaced (larger) when a product needs more; the
# caching allocator hands the old one to later work on the same stream only.
_SCRATCH: dict[tuple[int, int], Tensor] = {}

# (device index, raw stream) -> the split-K GEMV's tile counters on that stream (int32,
# ``COUNTER_SLOTS``): zero between launches, as each launch leaves them. Made only by eager
# direct launches (never while a compiled graph runs: CUDA-graph tools route those
# allocations to their own pools, which must be empty again afterwards) and never replaced
# or freed, since a graph captured on that stream keeps their address; such a graph must not
# be replayed on another stream while split-K GEMVs run on the stream it was captured on.
_COUNTERS: dict[tuple[int, int], Tensor] = {}
# Enough for every default split (split-K runs only where a layer has fewer 32-row tiles
# than the GPU has multiprocessors); a product with more tiles (a pinned split_k) gets
# counters of its own per call.
COUNTER_SLOTS = 4096


def _stream_scratch(index: int, stream: int, numel: int) -> Tensor:
    scratch = _SCRATCH.get((index, stream))
    if scratch is None or scratch.numel() < numel:
        scratch = _SCRATCH[(index, stream)] = torch.empty(numel, dtype=torch.float32,
                                                          device=torch.device("cuda", index))
    return scratch


def _split_counters(index: int, stream: int, tiles: int, keep: bool) -> Tensor:
    """Zeroed tile counters for a split-K GEMV of ``tiles`` N tiles on ``stream``: the
    stream's kept ones (``_COUNTERS``; made now if ``keep``), or where there are none or
    they do not fit, zeros of this call's own (in a captured graph: one memset node)."""
    device = torch.device("cuda", index)
    counters = _COUNTERS.get((index, stream))
    if counters is None and keep:
        counters = _COUNTERS[(index, stream)] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32,
                                                            device=device)
    if counters is not None and tiles <= counters.numel():
        return counters
    return torch.zeros(tiles, dtype=torch.int32, device=device)


class RowProduct:
    """``x @ dequant(W).T (+ bias)`` for one activation row ``x`` [1, k] of one dtype: the
    "gemv" plan for one weight, worked out once (split-K, config, kernel constants). With
    ``norm`` the row is first normalized, in the same launch: the product is that of the
    RMSNorm ``u * x * rsqrt(mean(x^2) + eps)`` of ``x`` with weight ``u`` [k] (x's dtype),
    computed without rounding between its steps (Hugging Face's formula rounds ``x *
    rsqrt(...)`` and the product with ``u`` to x's dtype: the results agree within those
    roundings); such a product is never split over K.

    :func:`fp4_matmul` builds one per one-row call; :func:`apt_model.fp4.ops.fp4_linear`
    keeps one per weight and activation dtype (``FP4Weight.kernels``), so that a decode step
    pays for little more than the launch: from the second call on (the first compiles or
    autotunes) the compiled kernels are launched directly, on the current stream, while
    the input, bias and output are 16-byte aligned as they were then.
    """

    def __init__(self, packed: Tensor, scales: Tensor, tensor_scale: Tensor | None, k: int,
                 x_dtype: torch.dtype, has_bias: bool, *, config: dict | None = None,
                 use_asm: bool | None = None, split_k: int | None = None,
                 norm: bool = False, eps: float = 0.0) -> None:
        is_nv, self.s_bytes, self.ts = _scale_operands(scales, tensor_scale)
        self.words = _as_words(packed)
        self.dtype, self.device = x_dtype, packed.device
        self.index = _index(self.device) if self.device.type == "cuda" else None
        n, kw = packed.shape[0], self.words.shape[1]
        self.n = n
        if use_asm is None:
            use_asm = not _interpreting()
        if config is None:
            config = fixed_config("gemv", 1)
        self.split, k_split = _k_splits(n, kw, self.device, "gemv", config, 1 if norm else split_k)
        arch = device_arch(self.device)
        pdl = arch >= (9, 0) and use_asm and gdc_wait is not None
        meta = _config_meta(config)
        consts = dict(N=n, K=k, KW=kw, stride_pn=self.words.stride(0),
                      stride_sn=self.s_bytes.stride(0), K_SPLIT=k_split, M_KEY=1, EPS=float(eps),
                      IS_NV=is_nv, HAS_BIAS=has_bias, SPLIT_K=self.split, USE_ASM=use_asm,
                      TS_ROWS=self.ts.numel() > 1, HW_E4M3=arch >= (8, 9), PDL=pdl, NORM=norm,
                      INTERP=_interpreting(), **meta)
        # unsplit, the partial sums and counters operands are the result (x's dtype)
        sums, counts = (torch.float32, torch.int32) if self.split > 1 else (x_dtype, x_dtype)
        self.gemv_key = ("gemv", self.index, x_dtype, x_dtype if has_bias else sums, sums, counts,
                         config is None, tuple(consts.items()))
        if pdl:
            consts["launch_pdl"] = True
        self.gemv_consts = consts
        self.gemv_fn = _gemv_tuned if config is None else _fp4_gemv_kernel
        self.gemv_grid = lambda meta_: (cdiv(n, meta_["BLOCK_N"]), cdiv(kw, k_split))  # noqa: E731
        # N tiles at the narrowest BLOCK_N a config may take: one split-K counter each
        self.tiles = cdiv(n, min(c.kwargs["BLOCK_N"] for c in GEMV_CONFIGS)
                          if config is None else config["BLOCK_N"])
        self.launch: tuple | None = None  # the compiled kernel, once known
        self._partial: tuple[Tensor, Tensor] | None = None  # (scratch, its split-K view)

    def _partial_sums(self, stream: int) -> Tensor:
        """The split-K partial sums [split, 1, N]: a view of ``stream``'s scratch
        (:func:`_stream_scratch`), made again only when that scratch was replaced."""
        scratch = _stream_scratch(self.index, stream, self.split * self.n)
        kept = self._partial
        if kept is None or kept[0] is not scratch:
            kept = self._partial = (scratch, scratch[: self.split * self.n].view(self.split, 1,
                                                                                 self.n))
        return kept[1]

    def __call__(self, x: Tensor, bias: Tensor | None, out: Tensor | None = None,
                 u: Tensor | None = None) -> Tensor:
        """The product for ``x`` (contiguous [1, k] of the dtype given), the norm weight ``u``
        (contiguous, k values of that dtype; with ``norm`` only) and ``bias`` (that dtype
        too, or None), into ``out`` ([1, N]) when given."""
        device = self.device
        if u is None:
            u = x
        result = out if out is not None else torch.empty((1, self.n), dtype=self.dtype, device=device)
        launch = self.launch
        if launch is not None and torch.cuda.current_device() == self.index \
                and not torch.cuda.is_current_stream_capturing():
            stream = torch._C._cuda_getCurrentRawStream(self.index)
            if self.split == 1:
                partial = counters = result
            else:
                partial = self._partial_sums(stream)
                counters = _split_counters(self.index, stream, self.tiles, True)
            b = bias if bias is not None else partial
            if x.data_ptr() % 16 == 0 and u.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0 \
                    and result.data_ptr() % 16 == 0:
                run, tail = launch
                run(x, u, self.words, self.s_bytes, self.ts, b, result, partial, counters, *tail,
                    stream=stream)
                return result
        # The first calls (compiling), CUDA-graph capture (whose partial sums must be the
        # graph's own), misaligned tensors and the interpreter: partial sums of this call's
        # own, launches through the JIT.
        if self.split == 1:
            partial = counters = result
        else:
            partial = torch.empty((self.split, 1, self.n), dtype=torch.float32, device=device)
            if self.index is None:  # the interpreter
                counters = torch.zeros(self.tiles, dtype=torch.int32, device=device)
            else:
                counters = _split_counters(self.index, torch._C._cuda_getCurrentRawStream(self.index),
                                           self.tiles, False)
        b = bias if bias is not None else partial
        aligned = all(t.data_ptr() % 16 == 0 for t in (x, u, b, result))
        launch = direct_launch(self.gemv_key, self.gemv_fn, self.gemv_grid,
                               (x, u, self.words, self.s_bytes, self.ts, b, result, partial,
                                counters), self.gemv_consts)
        if aligned and launch:
            self.launch = launch
        return result


def _dot_launch(kernel: str, m: int, k: int, words: Tensor, s_bytes: Tensor, ts: Tensor,
                is_nv: bool, x_dtype: torch.dtype, has_bias: bool, device: torch.device,
                config: dict | None, split_k: int | None, use_asm: bool,
                stride_xm: int) -> tuple[Callable, Callable[[dict], tuple[int, int]], dict, int]:
    """(kernel function, grid, constants, number of K splits) of the tiled kernel ``kernel``
    ("small" or "gemm") for ``m`` rows of ``x_dtype`` (row stride ``stride_xm``) times the
    packed weight ``words``: ``config`` pinned, else the first candidate for decode-sized
    "small" or without autotuning, else the autotuner's."""
    n, kw = words.shape
    if config is None:
        config = fixed_config(kernel, m)
    split, k_split = _k_splits(n, kw, device, kernel, config, split_k)
    meta = _config_meta(config)
    if kernel == "small":
        meta.setdefault("BLOCK_M", max(16, next_pow2(m)))
        fn = _fp4_dot_kernel if config else _small_tuned
    else:
        fn = _fp4_dot_kernel if config else _gemm_tuned
    m_key = next_pow2(m) if m <= SMALL_MAX_M else 128 * next_pow2(cdiv(m, 128))
    # fp16 activations keep fp16 operands with NVFP4 (every E2M1 x E4M3 product is exact
    # in fp16); MXFP4's power-of-two scales can leave fp16's range, so bf16 there.
    consts = dict(M=m, N=n, K=k, KW=kw, stride_xm=stride_xm, stride_pn=words.stride(0),
                  stride_sn=s_bytes.stride(0), stride_om=n, K_SPLIT=k_split, M_KEY=m_key,
                  F16=x_dtype == torch.float16 and is_nv, INTERP=_interpreting(), IS_NV=is_nv,
                  HAS_BIAS=has_bias, SPLIT_K=split, USE_ASM=use_asm, TS_ROWS=ts.numel() > 1,
                  **meta)

    def grid(meta_: dict) -> tuple[int, int]:
        return (cdiv(m, meta_["BLOCK_M"]) * cdiv(n, meta_["BLOCK_N"]),
                cdiv(kw, k_split))

    return fn, grid, consts, split


class MatProduct:
    """``x @ dequant(W).T (+ bias)`` for ``m`` activation rows (m > 1) of one dtype: the
    default plan of :func:`fp4_matmul` for one weight, worked out once, so a prefill pays
    for little more than the launches.

    The first call runs :func:`fp4_matmul` (which compiles, autotunes and, for large M,
    times "gemm" against "chunked"); from then on the kernel chosen runs with its key,
    grid and constants kept (the tiled kernels), or :func:`_chunked` with its operands
    prepared. ``x`` is contiguous [m, k].
    """

    def __init__(self, packed: Tensor, scales: Tensor, tensor_scale: Tensor | None, k: int,
                 m: int, x_dtype: torch.dtype, has_bias: bool) -> None:
        self.packed, self.scales, self.tensor_scale = packed, scales, tensor_scale
        self.k, self.m, self.n, self.dtype, self.has_bias = k, m, packed.shape[0], x_dtype, has_bias
        self.run: Callable[[Tensor, Tensor | None, Tensor], None] | None = None

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.run is None:
            out = fp4_matmul(x, self.packed, self.scales, self.tensor_scale, self.k, bias)
            self.run = self._prepared(x.device)
            return out
        result = torch.empty((self.m, self.n), dtype=self.dtype, device=x.device)
        self.run(x, bias, result)
        return result

    def _prepared(self, device: torch.device) -> Callable[[Tensor, Tensor | None, Tensor], None]:
        m, n, k = self.m, self.n, self.k
        kernel = kernel_for(m)
        is_nv, s_bytes, ts = _scale_operands(self.scales, self.tensor_scale)
        if kernel == "large":
            kernel = _settled_large_kernel(_large_key(device, n, k, m, self.dtype, self.scales.dtype,
                                                      self.has_bias)) or "chunked"
        if kernel == "chunked":
            slices = _slices(_packed_rows(self.packed), s_bytes, ts, is_nv, k, self.dtype, None)

            def chunked(x: Tensor, bias: Tensor | None, result: Tensor) -> None:
                _chunked(x, slices, bias, result)

            return chunked
        words = _as_words(self.packed)
        fn, grid, consts, split = _dot_launch(kernel, m, k, words, s_bytes, ts, is_nv, self.dtype,
                                              self.has_bias, device, None, None, not _interpreting(), k)
        sums = torch.float32 if split > 1 else self.dtype
        key = ("dot", device.index, fn is _fp4_dot_kernel, self.dtype, words.dtype, s_bytes.dtype,
               ts.dtype, self.dtype if self.has_bias else sums, sums, tuple(consts.items()))

        def tiled(x: Tensor, bias: Tensor | None, result: Tensor) -> None:
            partial = result if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                                            device=x.device)
            b = bias if bias is not None else partial
            direct_launch(key, fn, grid, (x, words, s_bytes, ts, b, partial), consts)
            if split > 1:
                _split_sum(partial, result)

        return tiled


def fp4_matmul(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    tensor_scale: Tensor | None,
    k: int,
    bias: Tensor | None = None,
    *,
    plan: KernelPlan | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``x @ dequant(W).T (+ bias)`` for 2-D ``x`` [M, k] with Triton; returns x's dtype.

    ``packed`` is uint8 [N, Kp/2] (Kp = k padded to the block), ``scales`` float8_e4m3fn
    (NVFP4) or uint8 E8M0 (MXFP4) [N, Kp/block]; ``tensor_scale`` the fp32 NVFP4 tensor
    scale (None for MXFP4). ``plan`` pins the kernel, config and variant (tests,
    benchmarks); by default the kernel and config are those of
    :func:`apt_model.fp4.kernel_plan.plan`, autotuned where it leaves the config open.
    ``out`` (contiguous [M, N], x's dtype) receives the result when given.
    """
    if not HAS_TRITON:
        raise RuntimeError("fp4_matmul needs Triton")
    if plan is None:
        kernel = config = use_asm = split_k = chunk_rows = None
    else:
        kernel, config, use_asm = plan.kernel, plan.config, plan.use_asm
        split_k, chunk_rows = plan.split_k, plan.chunk_rows
    m = x.shape[0]
    n = packed.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    kernel = kernel or kernel_for(m)
    if kernel == "gemv" and m > 0 and n > 0:
        if m != 1:
            raise ValueError(f"the gemv kernel takes one row, got {m}")
        return RowProduct(packed, scales, tensor_scale, k, x.dtype, bias is not None,
                          config=config, use_asm=use_asm, split_k=split_k)(x, bias, out)
    if kernel == "large":
        kernel = _large_kernel(x, packed, scales, tensor_scale, k, bias)
    if use_asm is None:
        use_asm = not _interpreting()
    is_nv, s_bytes, ts = _scale_operands(scales, tensor_scale)
    words = _as_words(packed)
    result = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return result
    if kernel == "chunked":
        slices = _slices(_packed_rows(packed), s_bytes, ts, is_nv, k, x.dtype, chunk_rows)
        return _chunked(x, slices, bias, result)
    fn, grid, consts, split = _dot_launch(kernel, m, k, words, s_bytes, ts, is_nv, x.dtype,
                                          bias is not None, x.device, config, split_k, use_asm,
                                          x.stride(0))
    # Split-K programs write fp32 partial sums [split, M, N], added up in a fixed order
    # afterwards: the result does not depend on scheduling (atomics would).
    out = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 \
        else result
    b = bias if bias is not None else out
    tensors = (x, words, s_bytes, ts, b, out)
    key = ("dot", x.device.index, fn is _fp4_dot_kernel, *(t.dtype for t in tensors),
           tuple(consts.items()))
    direct_launch(key, fn, grid, tensors, consts)
    if split > 1:
        _split_sum(out, result)
    return result
