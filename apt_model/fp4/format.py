"""Really-packed 4-bit floating-point weights: NVFP4 and MXFP4.

Both formats store E2M1 elements (two per byte) plus one scale per block of the
reduction (last) dimension:

* NVFP4: blocks of 16, FP8 E4M3 block scales and one FP32 per-tensor scale.
* MXFP4 (OCP MX v1.0): blocks of 32, E8M0 power-of-two block scales.

The numerics are bit-for-bit those of torchao 0.18's emulated reference
(``NVFP4Tensor.to_nvfp4`` with a per-tensor scale, ``MXTensor.to_mx`` with the
FLOOR scale mode), so weights produced here can be checked against, or handed
to, that ecosystem. torchao is only used by the tests, never imported here.

Everything is vectorised torch code without host synchronisation, because
``fake_quantize_fp4`` runs on every training step for every FP4 linear weight
and ``FP4Weight.dequantize`` on every inference forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from apt_model.errors import VBConfigError

__all__ = [
    "E2M1_VALUES",
    "FP4_FORMATS",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "FP4Weight",
    "e2m1_decode",
    "e2m1_encode",
    "fake_quantize_fp4",
    "fp4_nbytes",
    "pack_nibbles",
    "quantize_fp4",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "unpack_nibbles",
]

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP4_FORMATS = ("nvfp4", "mxfp4")

# Index = 4-bit code: bit 3 is the sign, bits 0-2 the magnitude. Code 8 is -0.0,
# which is what the hardware (and torchao) decode it to.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

E2M1_MAX = 6.0
E4M3_MAX = 448.0
# NVFP4 block scales are clamped to the smallest *normal* E4M3 value, as torchao does,
# so the subnormal E4M3 scales are never produced.
E4M3_MIN_NORMAL = 2.0**-6
E8M0_BIAS = 127
E8M0_NAN = 255
F32_EXP_BIAS = 127
# log2 of the largest power of two in E2M1 (4.0): MX FLOOR scale = 2^(floor(log2 amax) - 2).
E2M1_MAX_POW2 = 2
E2M1_EXP_BIAS = 1
# Floor of the default NVFP4 tensor scale: keeps (1 / tensor_scale) / smallest block scale
# (2^120 * 2^6) finite, so no element is scaled to inf or 0 * inf = NaN.
NVFP4_MIN_TENSOR_SCALE = 2.0**-120
F32_MIN_NORMAL = 2.0**-126
_F32_MANT_BITS = 23


# --------------------------------------------------------------------------- elements


def _e2m1_grid(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Round magnitudes ``a`` (already clamped to [0, 6]) onto the E2M1 grid.

    The grid is uniform within each binade group: spacing 0.5 below 2, 1 in [2, 4)
    and 2 in [4, 6]. Rounding ``a / step`` with ``torch.round`` (round-half-even) is
    exactly round-to-nearest-even on the code, because the code parity equals the
    parity of the multiple of ``step``. Returns ``(multiple, step, code_offset)``;
    the value is ``multiple * step`` and the magnitude code ``multiple + code_offset``.
    """
    ge2 = a >= 2.0
    ge4 = a >= 4.0
    step = torch.where(ge4, 2.0, torch.where(ge2, 1.0, 0.5))
    multiple = torch.round(a / step)
    offset = (ge2.to(torch.uint8) + ge4.to(torch.uint8)) * 2
    return multiple, step, offset


def _e2m1_round_magnitude(a: Tensor) -> Tensor:
    """Nearest E2M1 magnitude of ``a`` (>= 0; ties to even, saturating at 6).

    The fake-quantization fast path, equal to ``_e2m1_grid``'s rounding for every
    non-NaN input (NaN inputs only occur in blocks whose scale is NaN). Each
    device gets the variant that is fastest there.
    """
    if a.device.type == "cuda":
        return _round_by_bucket(a)
    return _round_by_magic_add(a)


def _round_by_magic_add(a: Tensor) -> Tensor:
    """Let the FPU round: add and subtract ``magic = step * 2^23``.

    The ulp of ``magic`` is ``step`` and ``magic / step`` is even, so ``a + magic``
    rounds ``a`` to a multiple of ``step`` with ties to even. ``step`` is half the
    power of two at or below ``clamp(a, 1, 4)``; ``magic`` is that power times
    2^22, built by adding 22 to its exponent field. Six elementwise passes.
    """
    binade = a.clamp(1.0, 4.0).view(torch.int32) & 0x7F800000
    magic = binade.add_(22 << _F32_MANT_BITS).view(torch.float32)
    return (a + magic).sub_(magic).clamp_(max=E2M1_MAX)


@functools.lru_cache(maxsize=16)
def _bucket_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """Decision boundaries and magnitudes for :func:`_round_by_bucket`.

    The boundaries are the midpoints between neighbouring magnitudes. With
    ``right=True`` a value equal to a boundary lands above it, so a midpoint whose
    upper neighbour has the even code (0.75, 1.75, 3.5) is used as is, and the
    others (0.25, 1.25, 2.5, 5) are nudged one ulp up so their ties fall below.
    """
    mids = (E2M1_VALUES[:7] + E2M1_VALUES[1:8]) / 2
    ties_down = torch.tensor([True, False, True, False, True, False, True])
    mids = torch.where(ties_down, torch.nextafter(mids, torch.full_like(mids, math.inf)), mids)
    return mids.to(device), E2M1_VALUES[:8].to(device)


def _round_by_bucket(a: Tensor) -> Tensor:
    """Binary search of ``a`` among the midpoints, then a table lookup: two passes."""
    boundaries, magnitudes = _bucket_tables(a.device)
    return magnitudes[torch.bucketize(a, boundaries, out_int32=True, right=True)]


def _nan_magnitude_code(bits: Tensor) -> Tensor:
    """Magnitude code torchao's bit-level cast assigns to a NaN with fp32 bits ``bits``.

    E2M1 has no NaN; torchao rounds the NaN's bit pattern as if it were a normal
    number and keeps the low byte, giving 2, 3 or 4 depending on the payload.
    The block scale is NaN in that case anyway, so the whole block decodes to NaN;
    reproducing the code keeps the packed bytes identical to the reference.
    """
    mag = bits & 0x7FFFFFFF
    shift = _F32_MANT_BITS - 1
    rebias = (E2M1_EXP_BIAS - F32_EXP_BIAS) << _F32_MANT_BITS
    rounded = mag + (rebias + (1 << (shift - 1)) - 1) + ((mag >> shift) & 1)
    return (rounded >> shift) & 0xFF


def e2m1_encode(x: Tensor) -> Tensor:
    """Encode already-scaled floats to 4-bit E2M1 codes (uint8, one code per element).

    Round to nearest, ties to even, saturating at ±6; the sign bit is kept for
    -0.0 and for negatives that round to zero, and infinities saturate.
    """
    x = x.float()
    multiple, _, offset = _e2m1_grid(x.abs().clamp(max=E2M1_MAX))
    nan = torch.isnan(x)
    magnitude = torch.where(nan, 0.0, multiple).to(torch.uint8) + offset
    magnitude = torch.where(
        nan, _nan_magnitude_code(x.view(torch.int32)).to(torch.uint8), magnitude
    )
    return magnitude | (torch.signbit(x).to(torch.uint8) << 3)


@functools.lru_cache(maxsize=16)
def _code_values(device: torch.device) -> Tensor:
    """E2M1_VALUES on ``device`` (cached so decoding never copies the table again)."""
    return E2M1_VALUES.to(device)


@functools.lru_cache(maxsize=16)
def _byte_values(device: torch.device) -> Tensor:
    """For every packed byte, its two decoded fp32 values: one gather dequantizes a byte."""
    codes = unpack_nibbles(torch.arange(256, dtype=torch.uint8).reshape(256, 1))  # [256, 2]
    return E2M1_VALUES[codes.long()].to(device)


def e2m1_decode(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode 4-bit codes (uint8, values 0..15) to floats (exact in every float dtype)."""
    return _code_values(codes.device)[codes.int()].to(dtype)


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack uint8 codes ``[..., K]`` (K even) into ``[..., K // 2]`` bytes.

    Element ``2i`` goes into the low nibble and ``2i + 1`` into the high nibble,
    the order torchao and the Blackwell FP4 GEMMs use.
    """
    if codes.shape[-1] % 2:
        raise ValueError(
            f"pack_nibbles needs an even last dimension, got shape {tuple(codes.shape)}"
        )
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] & 0x0F) | (pairs[..., 1] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., M]`` bytes to ``[..., 2 * M]`` codes."""
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# --------------------------------------------------------------------------- formats


def _check_format(fmt: str) -> str:
    if fmt not in FP4_FORMATS:
        raise VBConfigError(f"unknown FP4 format {fmt!r}; expected one of {', '.join(FP4_FORMATS)}")
    return fmt


def _block_size(fmt: str) -> int:
    return NVFP4_BLOCK if _check_format(fmt) == "nvfp4" else MXFP4_BLOCK


def _padded(k: int, block: int) -> int:
    return -(-k // block) * block


def fp4_nbytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes an :class:`FP4Weight` of this original shape stores (what ``nbytes()`` returns)."""
    block = _block_size(fmt)
    if len(shape) == 0:
        raise ValueError("an FP4 weight needs at least one dimension")
    k = shape[-1]
    n = math.prod(shape[:-1])
    kp = _padded(k, block)
    tensor_scale = 4 if fmt == "nvfp4" else 0
    return n * kp // 2 + n * (kp // block) + tensor_scale


# Inputs kept in their own dtype: abs/amax are exact in it, and mixing them with the
# fp32 scales promotes each element to fp32 on the fly, exactly as an explicit
# upcast would, without a separate conversion pass.
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _blocks(w: Tensor, block: int) -> Tensor:
    """``w`` as ``[N, K_padded / block, block]``: leading dims flattened, K zero-padded.

    Zero padding never changes a block maximum, so the padded elements only cost
    storage; they are trimmed again on dequantization. Other float dtypes
    (float64, float8) are converted to fp32, the precision the formats are defined in.
    """
    if w.dim() == 0:
        raise ValueError("an FP4 weight needs at least one dimension")
    if not w.is_floating_point():
        raise TypeError(f"FP4 quantization needs a floating-point tensor, got {w.dtype}")
    k = w.shape[-1]
    x = w.detach().reshape(math.prod(w.shape[:-1]), k)
    if x.dtype not in _NATIVE_DTYPES:
        x = x.float()
    pad = _padded(k, block) - k
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, block)


def _div(t: Tensor, constant: float) -> Tensor:
    """``t / constant`` correctly rounded on every device.

    CUDA turns division by a Python (CPU) scalar into multiplication by its rounded
    reciprocal, which is off by one ulp for e.g. 6; a 0-dim device tensor keeps
    true division, so CPU and CUDA give the same bits.
    """
    return t / torch.full((), constant, dtype=t.dtype, device=t.device)


def _default_tensor_scale(block_amax: Tensor) -> Tensor:
    """torchao's ``per_tensor_amax_to_scale``: amax / (448 * 6), in fp32, floored at 2^-120.

    The floor is the one deliberate difference from torchao and only acts when
    amax < 2e-33. Without it an all-zero weight (e.g. a zero-initialised
    projection) gets scale 0, block scales 0/0 = NaN and fake-quantizes to NaN,
    and a tensor of tiny values overflows the reciprocal scale to inf. With it,
    zeros encode exactly and such tensors just flush to zero.
    """
    amax = block_amax.amax() if block_amax.numel() else block_amax.new_zeros(())
    return _div(amax, E4M3_MAX * E2M1_MAX).clamp(min=NVFP4_MIN_TENSOR_SCALE)


class _Scaling(NamedTuple):
    """How one tensor's blocks are scaled into E2M1 range and back."""

    scales: Tensor  # stored block scales, [N, B]
    tensor_scale: Tensor | None
    to_e2m1_range: Callable[[Tensor], Tensor]  # elements [N, B, block] -> scaled, not rounded
    multiplier: Tensor  # fp32 [N, B]: decoded element * multiplier = dequantized value


def _nvfp4_scaling(block_amax: Tensor, tensor_scale: Tensor) -> _Scaling:
    """NVFP4 two-level scaling, in torchao's operation order so every rounding matches.

    Block scale = block_amax / 6 / tensor_scale, clamped to the normal E4M3 range and
    cast to E4M3; elements are multiplied by (1 / tensor_scale) / block_scale.
    """
    scales = (_div(block_amax, E2M1_MAX) / tensor_scale).clamp(E4M3_MIN_NORMAL, E4M3_MAX)
    scales = scales.to(torch.float8_e4m3fn)
    reciprocal = ((1.0 / tensor_scale) / scales.float()).unsqueeze(-1)
    return _Scaling(
        scales, tensor_scale, lambda t: t * reciprocal, _nvfp4_multiplier(scales, tensor_scale)
    )


def _nvfp4_multiplier(scales: Tensor, tensor_scale: Tensor) -> Tensor:
    """Per-block fp32 dequantization factor, rounded as torchao rounds it."""
    return tensor_scale * scales.float()


def _mxfp4_scaling(block_amax: Tensor) -> _Scaling:
    """MXFP4 FLOOR scaling: 2^(floor(log2(block amax)) - 2) as a biased E8M0 byte.

    The exponent is read off the fp32 bits (255 marks a NaN block). Like torchao,
    the divisor is clamped to the smallest normal fp32, so a scale byte of 0
    divides by 2^-126 but decodes as 2^-127; only blocks whose max is below
    2^-124 are affected.
    """
    exponent = ((block_amax.view(torch.int32) >> _F32_MANT_BITS) & 0xFF) - F32_EXP_BIAS
    biased = (exponent - E2M1_MAX_POW2).clamp(-E8M0_BIAS, E8M0_BIAS + 1) + E8M0_BIAS
    biased = torch.where(torch.isnan(block_amax), E8M0_NAN, biased)
    divisor = (biased << _F32_MANT_BITS).view(torch.float32).clamp(min=F32_MIN_NORMAL).unsqueeze(-1)
    scales = biased.to(torch.uint8)
    return _Scaling(scales, None, lambda t: t / divisor, _mxfp4_multiplier(scales))


def _mxfp4_multiplier(scales: Tensor) -> Tensor:
    """Exact fp32 value 2^(e - 127) of E8M0 bytes ``scales`` (NaN for 255), built from bits."""
    e = scales.to(torch.int32)
    subnormal = 1 << (_F32_MANT_BITS - 1)  # 2^-127 has no exponent field of its own
    bits = torch.where(e == 0, subnormal, e << _F32_MANT_BITS)
    return torch.where(e == E8M0_NAN, math.nan, bits.view(torch.float32))


def _scaling(x: Tensor, x_abs: Tensor, fmt: str, tensor_scale: Tensor | None) -> _Scaling:
    """The scaling of blocks ``x`` (``[N, B, block]``, with ``x_abs = |x|``)."""
    # Max-pooling the flat rows is the same maximum (NaN included) as amax over the
    # 16/32-wide last dim, and several times faster than that reduction on GPU and CPU.
    n, blocks, block = x_abs.shape
    block_amax = F.max_pool1d(x_abs.reshape(n, 1, blocks * block), block).reshape(n, blocks).float()
    if fmt == "mxfp4":
        return _mxfp4_scaling(block_amax)
    if tensor_scale is None:
        tensor_scale = _default_tensor_scale(block_amax)
    else:
        tensor_scale = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device)
        tensor_scale = tensor_scale.reshape(())
    return _nvfp4_scaling(block_amax, tensor_scale)


# --------------------------------------------------------------------------- container


@dataclass
class FP4Weight:
    """A weight stored really packed: 4-bit codes two per byte, plus its scales.

    ``packed`` is uint8 ``[N, K_padded / 2]``, ``scales`` is float8_e4m3fn (NVFP4) or
    E8M0 bytes in uint8 (MXFP4) of shape ``[N, K_padded / block]``; ``shape`` is the
    original shape, whose leading dimensions were flattened into N. ``kernels`` holds what
    a device's kernels prepared for this weight (filled by :mod:`apt_model.fp4.ops`; valid
    while these tensors are the weight's).
    """

    fmt: str
    packed: Tensor
    scales: Tensor
    tensor_scale: Tensor | None
    shape: tuple[int, ...]
    kernels: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_format(self.fmt)
        self.shape = tuple(int(s) for s in self.shape)
        if not self.shape:
            raise ValueError("an FP4 weight needs at least one dimension")
        n, kp = math.prod(self.shape[:-1]), _padded(self.shape[-1], self.block_size)
        expected = {
            "packed": ((n, kp // 2), torch.uint8),
            "scales": (
                (n, kp // self.block_size),
                torch.float8_e4m3fn if self.fmt == "nvfp4" else torch.uint8,
            ),
        }
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{self.fmt} weight of shape {self.shape}: {name} must be {dtype} {shape}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        if (self.fmt == "nvfp4") != (self.tensor_scale is not None):
            raise ValueError(
                f"{self.fmt}: tensor_scale must be {'given' if self.fmt == 'nvfp4' else 'None'}"
            )

    @property
    def block_size(self) -> int:
        return _block_size(self.fmt)

    def _multiplier(self) -> Tensor:
        if self.fmt == "nvfp4":
            return _nvfp4_multiplier(self.scales, self.tensor_scale)
        return _mxfp4_multiplier(self.scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight in ``dtype`` and its original shape (computed in fp32, then cast once)."""
        values = _byte_values(self.packed.device)[self.packed.int()]  # [N, Kp/2, 2]
        values = values.reshape(self.packed.shape[0], -1, self.block_size)
        return _scale_and_trim(values, self._multiplier(), self.shape, dtype)

    def nbytes(self) -> int:
        """Bytes actually stored: packed codes, block scales and the tensor scale."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def to(self, device: torch.device | str) -> FP4Weight:
        """The same weight with its tensors on ``device``."""
        return FP4Weight(
            self.fmt,
            self.packed.to(device),
            self.scales.to(device),
            None if self.tensor_scale is None else self.tensor_scale.to(device),
            self.shape,
        )

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors to save; with ``fmt`` and ``shape`` they rebuild the weight."""
        tensors = {"packed": self.packed, "scales": self.scales}
        if self.tensor_scale is not None:
            tensors["tensor_scale"] = self.tensor_scale
        return tensors

    @classmethod
    def from_state_tensors(
        cls, fmt: str, shape: tuple[int, ...] | torch.Size, tensors: dict[str, Tensor]
    ) -> FP4Weight:
        """Rebuild a weight saved with :meth:`state_tensors` (validates shapes and dtypes)."""
        return cls(
            fmt, tensors["packed"], tensors["scales"], tensors.get("tensor_scale"), tuple(shape)
        )


# --------------------------------------------------------------------------- entry points


def _quantize(w: Tensor, fmt: str, tensor_scale: Tensor | None = None) -> FP4Weight:
    with torch.no_grad():
        x = _blocks(w, _block_size(fmt))
        scaling = _scaling(x, x.abs(), fmt, tensor_scale)
        codes = e2m1_encode(scaling.to_e2m1_range(x))
        packed = pack_nibbles(codes.reshape(x.shape[0], -1))
    return FP4Weight(fmt, packed, scaling.scales, scaling.tensor_scale, tuple(w.shape))


def quantize_nvfp4(w: Tensor, tensor_scale: Tensor | None = None) -> FP4Weight:
    """NVFP4: 16-element blocks, E4M3 block scales and an FP32 tensor scale.

    ``tensor_scale`` defaults to amax(|w|) / (448 * 6), so the largest block scale
    uses the whole E4M3 range.
    """
    return _quantize(w, "nvfp4", tensor_scale)


def quantize_mxfp4(w: Tensor) -> FP4Weight:
    """MXFP4 (OCP MX v1.0): 32-element blocks with E8M0 (FLOOR) power-of-two scales."""
    return _quantize(w, "mxfp4")


def quantize_fp4(w: Tensor, fmt: str) -> FP4Weight:
    """Quantize ``w`` to ``fmt`` ("nvfp4" or "mxfp4")."""
    return _quantize(w, _check_format(fmt))


def fake_quantize_fp4(w: Tensor, fmt: str) -> Tensor:
    """``quantize_fp4(w, fmt).dequantize(w.dtype)``, bit for bit, without packing.

    This is the per-step hot path, so it skips codes and bytes: the scaled
    elements are rounded straight to E2M1 magnitudes and given back their sign.
    Elements whose rounding differs from the code path (NaN ones) only occur in
    blocks whose scale is NaN, so they come out NaN either way. No autograd
    graph is recorded; the caller adds the straight-through gradient.
    """
    with torch.no_grad():
        x = _blocks(w, _block_size(fmt))
        scaling = _scaling(x, x.abs(), fmt, None)
        scaled = scaling.to_e2m1_range(x)
        values = _e2m1_round_magnitude(scaled.abs()).copysign_(scaled)
        return _scale_and_trim(values, scaling.multiplier, w.shape, w.dtype)


def _scale_and_trim(
    values: Tensor, multiplier: Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """``values * multiplier`` per block (fp32 math, one rounding into ``dtype``), unpadded.

    Writing the product straight into a ``dtype`` buffer is the same single
    rounding as ``.to(dtype)`` afterwards, one pass cheaper.
    """
    out = torch.empty(values.shape, dtype=dtype, device=values.device)
    torch.mul(values, multiplier.unsqueeze(-1), out=out)
    return out.reshape(values.shape[0], -1)[:, : shape[-1]].reshape(shape)
