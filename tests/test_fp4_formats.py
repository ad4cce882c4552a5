"""Tests of the packed NVFP4 / MXFP4 formats, bit-exact against torchao's emulated reference."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apt_model.errors import VBConfigError
from apt_model.fp4.format import (
    E2M1_VALUES,
    FP4_FORMATS,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    FP4Weight,
    e2m1_decode,
    e2m1_encode,
    fake_quantize_fp4,
    fp4_nbytes,
    pack_nibbles,
    quantize_fp4,
    quantize_mxfp4,
    quantize_nvfp4,
    unpack_nibbles,
)

E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (distinguishes -0.0, and any NaN equals any NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    view = INT_VIEW[a.dtype]
    return torch.equal(a[~nan_a].view(view), b[~nan_b].view(view))


# --------------------------------------------------------------------------- inputs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(shape, seed=0):
    return torch.randn(shape, generator=_gen(seed))


def _heavy_tailed(shape, seed=1):
    return torch.empty(shape).cauchy_(generator=_gen(seed)) * 0.05


def _wide_range(shape, seed=2):
    g = _gen(seed)
    rows = torch.exp(torch.randn(shape[0], 1, generator=g) * 6)
    return torch.randn(shape, generator=g) * rows


def _zero_rows(shape, seed=3):
    x = _normal(shape, seed)
    x[::3] = 0.0
    x[1, : min(shape[1], 20)] = 0.0  # a zero block inside a non-zero row
    x[1, 0] = -0.0
    return x


def _tiny_blocks(shape, seed=4):
    """Rows far below the tensor max: NVFP4 block scales fall into the E4M3 subnormal range."""
    x = _normal(shape, seed)
    factors = torch.tensor([1.0, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-7, 1e-9])
    return x * factors[torch.arange(shape[0]) % len(factors)].unsqueeze(1)


DISTRIBUTIONS = {
    "normal": _normal,
    "heavy_tailed": _heavy_tailed,
    "wide_range": _wide_range,
    "zero_rows": _zero_rows,
    "tiny_blocks": _tiny_blocks,
}
SHAPES = [(16, 128), (8, 48), (5, 40), (4, 7)]


# --------------------------------------------------------------------------- oracle


@pytest.fixture(scope="module")
def torchao_mx():
    """torchao's NVFP4Tensor / MXTensor (CPU emulation), imported only by the tests."""
    nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    return nvfp4, mx, kernels


def _oracle(torchao_mx, x: torch.Tensor, fmt: str, tensor_scale: torch.Tensor | None = None):
    """(packed, scale bytes, tensor scale, dequantize(dtype) -> original shape) from torchao.

    torchao takes fp32/bf16 2-D input with K a multiple of the block; fp16 is widened
    (exactly) to fp32, leading dims are flattened and K is zero-padded here.
    """
    nvfp4, mx, _ = torchao_mx
    shape = x.shape
    block = NVFP4_BLOCK if fmt == "nvfp4" else MXFP4_BLOCK
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype == torch.float16:
        x2 = x2.float()
    pad = -shape[-1] % block
    x2 = torch.nn.functional.pad(x2, (0, pad)).contiguous()
    if fmt == "nvfp4":
        if tensor_scale is None:
            tensor_scale = nvfp4.per_tensor_amax_to_scale(torch.max(torch.abs(x2)))
        t = nvfp4.NVFP4Tensor.to_nvfp4(x2, per_tensor_scale=tensor_scale)
        scales = t.scale.view(torch.uint8)
    else:
        t = mx.MXTensor.to_mx(x2, torch.float4_e2m1fn_x2, block_size=MXFP4_BLOCK)
        scales = t.scale.view(torch.uint8)
        tensor_scale = None

    def dequantize(dtype):
        return t.dequantize(dtype)[:, : shape[-1]].reshape(shape)

    return t.qdata, scales, tensor_scale, dequantize


def _assert_matches_oracle(torchao_mx, x, fmt, tensor_scale=None):
    q = quantize_nvfp4(x, tensor_scale) if fmt == "nvfp4" else quantize_mxfp4(x)
    packed, scales, ts, dequantize = _oracle(torchao_mx, x, fmt, tensor_scale)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.scales.view(torch.uint8), scales)
    if fmt == "nvfp4":
        assert _same_bits(q.tensor_scale, ts.float().reshape(()))
    else:
        assert q.tensor_scale is None
    for dtype in (torch.float32, torch.bfloat16):
        assert _same_bits(q.dequantize(dtype), dequantize(dtype)), dtype
    # torchao multiplies fp16 in fp16 (overflowing the scale); we round the exact fp32 product once.
    assert _same_bits(q.dequantize(torch.float16), dequantize(torch.float32).half())
    return q


@pytest.mark.parametrize("fmt", FP4_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_bit_exact_against_torchao(torchao_mx, fmt, dtype, dist):
    for i, shape in enumerate(SHAPES):
        x = DISTRIBUTIONS[dist](shape, seed=10 * i).to(dtype)
        _assert_matches_oracle(torchao_mx, x, fmt)


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_bit_exact_against_torchao_3d(torchao_mx, fmt):
    x = _normal((3, 4, 64), seed=5)
    q = _assert_matches_oracle(torchao_mx, x, fmt)
    assert q.packed.shape == (12, 32) and q.dequantize().shape == (3, 4, 64)


def test_nvfp4_explicit_tensor_scale_matches_torchao(torchao_mx):
    x = _wide_range((8, 64), seed=6)
    for scale in (1.0, 1e-3, 0.37):
        _assert_matches_oracle(torchao_mx, x, "nvfp4", torch.tensor(scale))


def test_e2m1_encode_matches_torchao_on_random_bit_patterns(torchao_mx):
    """Every fp32 class (normals, subnormals, inf, NaN payloads) encodes like torchao's cast."""
    _, _, kernels = torchao_mx
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=_gen(7), dtype=torch.int32)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, 6.0, 7.0])
    x = torch.cat([bits.view(torch.float32), special])
    assert torch.equal(e2m1_encode(x), kernels.f32_to_f4_unpacked(x))


@pytest.mark.parametrize("variant", ["_round_by_magic_add", "_round_by_bucket"])
def test_fast_rounding_equals_encode_decode_on_random_bit_patterns(variant):
    """Both fake-quantization rounding kernels (CPU and CUDA) must agree with the code path."""
    from apt_model.fp4 import format as fp4_format

    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=_gen(18), dtype=torch.int32)
    grid = torch.linspace(-8, 8, 4097)  # every tie and every E2M1 value, both signs
    y = torch.cat([bits.view(torch.float32), grid, torch.tensor([math.inf, -math.inf, -0.0])])
    y = y[~torch.isnan(y)]
    fast = getattr(fp4_format, variant)(y.abs()).copysign_(y)
    assert _same_bits(fast, e2m1_decode(e2m1_encode(y)))


def test_nibble_order_matches_torchao(torchao_mx):
    _, _, kernels = torchao_mx
    codes = torch.randint(0, 16, (6, 20), generator=_gen(8), dtype=torch.uint8)
    assert torch.equal(pack_nibbles(codes), kernels.pack_uint4(codes))
    assert torch.equal(
        unpack_nibbles(pack_nibbles(codes)), kernels.unpack_uint4(kernels.pack_uint4(codes))
    )


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_nan_and_inf_follow_torchao(torchao_mx, fmt):
    x = _normal((4, 64), seed=9)
    x[0, 3] = math.nan
    x[1, 40] = -math.nan
    x[2, 5] = math.inf
    x[3, 33] = -math.inf
    if fmt == "nvfp4":
        # The default scale would be inf; with a finite one the inf elements saturate.
        q = _assert_matches_oracle(torchao_mx, x, fmt, torch.tensor(0.01))
        assert q.scales.view(torch.uint8)[0, 0] == 0x7F  # E4M3 NaN
    else:
        q = _assert_matches_oracle(torchao_mx, x, fmt)
        assert q.scales[0, 0] == 255 and q.scales[2, 0] == 253
    deq = q.dequantize()
    assert torch.isnan(deq[0, :16]).all() and not torch.isnan(deq[0, 32:]).any()
    assert torch.isnan(deq[1, 32:48]).all()
    assert not torch.isnan(deq[2]).any() and deq[2, 5] > 0 and deq[3, 33] < 0


# --------------------------------------------------------------------------- ties, saturation, tiny


TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
TIES_TO_EVEN = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_e2m1_ties_to_even_and_saturation():
    x = torch.tensor(TIES + [-t for t in TIES] + [6.5, 7.0, 1e30, -6.01])
    expected = TIES_TO_EVEN + [-t for t in TIES_TO_EVEN] + [6.0, 6.0, 6.0, -6.0]
    assert _same_bits(e2m1_decode(e2m1_encode(x)), torch.tensor(expected))
    assert e2m1_encode(torch.tensor([-0.25]))[0] == 8  # negative rounding to zero keeps its sign


def test_nvfp4_ties_and_saturation_by_hand(torchao_mx):
    # tensor amax 2688 -> default tensor scale exactly 1; block amax 6 -> block scale 1,
    # block amax 12 -> 2, block amax 6.375 = 6 * 1.0625 -> E4M3 tie, rounds to even 1.0.
    block1 = [6.0] + TIES + [-t for t in TIES] + [0.0]
    x = torch.tensor(
        [
            [2688.0] + [0.0] * 15,
            block1,
            [2 * v for v in block1],
            [6.375, 6.2, 5.9] + [0.0] * 13,
        ]
    )
    q = quantize_nvfp4(x)
    assert q.tensor_scale.item() == 1.0
    assert q.scales.float().flatten().tolist() == [448.0, 1.0, 2.0, 1.0]
    expected1 = [6.0] + TIES_TO_EVEN + [-t for t in TIES_TO_EVEN] + [0.0]
    deq = q.dequantize()
    assert _same_bits(deq[1], torch.tensor(expected1))
    assert _same_bits(deq[2], 2 * torch.tensor(expected1))
    assert deq[3, :3].tolist() == [6.0, 6.0, 6.0]  # 6.375 and 6.2 saturate
    _assert_matches_oracle(torchao_mx, x, "nvfp4")


def test_mxfp4_ties_and_saturation_by_hand(torchao_mx):
    # block amax in [4, 8) -> scale 2^0 (byte 127): 6.5 .. 7.99 saturate to 6.
    # block amax in [8, 16) -> scale 2^1 (byte 128): ties are doubled.
    row = TIES + [-t for t in TIES] + [6.5, 7.0, 7.99, -7.5] + [0.0] * 14
    x = torch.tensor([row, [2 * v for v in row]])
    q = quantize_mxfp4(x)
    assert q.scales.flatten().tolist() == [127, 128]
    expected = TIES_TO_EVEN + [-t for t in TIES_TO_EVEN] + [6.0, 6.0, 6.0, -6.0] + [0.0] * 14
    deq = q.dequantize()
    assert _same_bits(deq[0], torch.tensor(expected))
    assert _same_bits(deq[1], 2 * torch.tensor(expected))
    _assert_matches_oracle(torchao_mx, x, "mxfp4")


def test_nvfp4_tiny_block_scales_clamp_to_smallest_normal_e4m3(torchao_mx):
    x = _tiny_blocks((8, 32), seed=11)
    q = _assert_matches_oracle(torchao_mx, x, "nvfp4")
    scales = q.scales.float()
    assert scales.min().item() == 2.0**-6  # never an E4M3 subnormal
    assert (scales[6:] == 2.0**-6).all()  # rows 1e-7 and 1e-9 below the max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_fp32_subnormal_blocks(torchao_mx, dtype):
    """Blocks below 2^-124 get scale byte 0 (2^-127) and torchao's divisor clamp."""
    x = torch.cat([_normal((2, 64), seed=12) * s for s in (1e-36, 1e-38, 1e-40, 3e-43)])
    q = _assert_matches_oracle(torchao_mx, x.to(dtype), "mxfp4")
    assert (q.scales[-4:] == 0).all()


def test_all_zero_and_tiny_tensors_do_not_become_nan():
    """The one deviation from torchao: its default scale 0 makes all-zero weights NaN."""
    for fmt in FP4_FORMATS:
        for x in (torch.zeros(4, 32), torch.full((4, 32), 1e-40), torch.full((4, 32), -1e-36)):
            deq = quantize_fp4(x, fmt).dequantize()
            assert torch.isfinite(deq).all() and (deq.abs() <= x.abs() * 1.5).all()
            assert _same_bits(fake_quantize_fp4(x, fmt), deq)
    q = quantize_nvfp4(torch.zeros(2, 16))
    assert (q.packed == 0).all() and (q.dequantize() == 0).all()


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_float64_input_is_quantized_as_its_fp32_rounding(fmt):
    # 0.25 + 1e-12 is a tie (-> 0) once in fp32, but would round up to 0.5 in float64.
    w = torch.tensor(
        [[2688.0] + [0.0] * 31, [6.0, 0.25 + 1e-12, 1.75 - 1e-12] + [0.0] * 29], dtype=torch.float64
    )
    q = quantize_fp4(w, fmt)
    assert torch.equal(q.packed, quantize_fp4(w.float(), fmt).packed)
    assert q.dequantize()[1, :3].tolist() == [6.0, 0.0, 2.0]
    fq = fake_quantize_fp4(w, fmt)
    assert fq.dtype == torch.float64 and fq[1, :3].tolist() == [6.0, 0.0, 2.0]


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize(("fmt", "bits"), [("nvfp4", 4.5), ("mxfp4", 4.25)])
def test_bits_per_weight(fmt, bits):
    x = _normal((256, 1024))
    q = quantize_fp4(x, fmt)
    block = q.block_size
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (256, 512)
    assert q.scales.shape == (256, 1024 // block) and q.scales.element_size() == 1
    tensor_scale_bytes = 4 if fmt == "nvfp4" else 0
    assert q.nbytes() == 256 * 512 + 256 * 1024 // block + tensor_scale_bytes
    assert q.nbytes() * 8 / x.numel() == pytest.approx(bits, abs=1e-3)


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_fp4_nbytes_matches_stored_bytes(fmt):
    for shape in [(16, 128), (5, 40), (3, 1), (2, 3, 70), (33,)]:
        q = quantize_fp4(_normal(shape), fmt)
        assert fp4_nbytes(shape, fmt) == q.nbytes(), shape


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_padding_of_k(fmt):
    block = NVFP4_BLOCK if fmt == "nvfp4" else MXFP4_BLOCK
    x = _normal((6, 40), seed=13)
    kp = -(-40 // block) * block
    q = quantize_fp4(x, fmt)
    assert (
        q.shape == (6, 40) and q.packed.shape == (6, kp // 2) and q.scales.shape == (6, kp // block)
    )
    assert (unpack_nibbles(q.packed)[:, 40:] == 0).all()  # padding encodes as +0
    deq = q.dequantize()
    assert deq.shape == (6, 40)
    padded = quantize_fp4(torch.nn.functional.pad(x, (0, kp - 40)), fmt)
    assert torch.equal(padded.packed, q.packed) and torch.equal(
        padded.scales.view(torch.uint8), q.scales.view(torch.uint8)
    )
    assert _same_bits(padded.dequantize()[:, :40], deq)


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_state_tensors_round_trip(fmt):
    x = _normal((2, 3, 40), seed=14)
    q = quantize_fp4(x, fmt)
    state = q.state_tensors()
    assert set(state) == (
        {"packed", "scales", "tensor_scale"} if fmt == "nvfp4" else {"packed", "scales"}
    )
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    r = FP4Weight.from_state_tensors(fmt, torch.Size([2, 3, 40]), torch.load(buf))
    assert r.shape == (2, 3, 40) and r.block_size == q.block_size and r.nbytes() == q.nbytes()
    assert _same_bits(r.dequantize(), q.dequantize())
    moved = q.to("cpu")
    assert _same_bits(moved.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))
    bad = dict(state, packed=state["packed"][:, :-1])
    with pytest.raises(ValueError, match="packed"):
        FP4Weight.from_state_tensors(fmt, (2, 3, 40), bad)


def test_unknown_format_is_a_config_error():
    for call in (
        lambda: quantize_fp4(torch.ones(2, 16), "nvfp8"),
        lambda: fake_quantize_fp4(torch.ones(2, 16), "nvfp8"),
        lambda: fp4_nbytes((2, 16), "nvfp8"),
    ):
        with pytest.raises(VBConfigError, match="nvfp8"):
            call()


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_no_data_dependent_host_code(fmt):
    """Meta tensors have no data: this fails if a .item()/nonzero()/Python branch on values sneaks in."""
    w = torch.empty(64, 40, device="meta")
    assert fake_quantize_fp4(w, fmt).shape == (64, 40)
    assert quantize_fp4(w, fmt).dequantize(torch.bfloat16).shape == (64, 40)


# --------------------------------------------------------------------------- elements (properties)


def test_encode_decode_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert _same_bits(values, E2M1_VALUES)
    assert values[:8].tolist() == E2M1_MAGNITUDES and torch.signbit(values[8:]).all()
    assert torch.equal(e2m1_encode(values), codes)  # decode(encode(v)) == v, -0.0 included
    for dtype in DTYPES:
        assert _same_bits(e2m1_decode(e2m1_encode(values.to(dtype)), dtype), values.to(dtype))


def _nearest_code(x: float) -> int:
    """Reference E2M1 encoder on exact rationals: nearest magnitude, ties to the even code."""
    a = Fraction(6) if math.isinf(x) else min(Fraction(abs(x)), Fraction(6))
    dist = [abs(a - Fraction(m)) for m in E2M1_MAGNITUDES]
    best = min(dist)
    code = min((i for i, d in enumerate(dist) if d == best), key=lambda i: i % 2)
    return code | (8 if math.copysign(1.0, x) < 0 else 0)


_near_ties = st.sampled_from(TIES + E2M1_MAGNITUDES).flatmap(
    lambda t: st.sampled_from(
        [t, math.nextafter(t, 0.0), math.nextafter(t, 10.0), t * (1 + 2**-23), t * (1 - 2**-24)]
    )
)
_floats = st.floats(width=32, allow_nan=False) | _near_ties | _near_ties.map(lambda v: -v)


@settings(max_examples=200, deadline=None)
@given(st.lists(_floats, min_size=1, max_size=64))
def test_encode_is_nearest_with_ties_to_even(values):
    x = torch.tensor(values, dtype=torch.float32)
    expected = [_nearest_code(v) for v in x.tolist()]
    assert e2m1_encode(x).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15)), max_size=32))
def test_pack_unpack_round_trip(pairs):
    flat = [c for pair in pairs for c in pair]
    c = torch.tensor(flat, dtype=torch.uint8).reshape(len(flat))
    for codes in (c, torch.stack([c, c.flip(0)])):  # 1-D and 2-D
        packed = pack_nibbles(codes)
        assert packed.shape == (*codes.shape[:-1], len(pairs))
        assert torch.equal(unpack_nibbles(packed), codes)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_unpack_pack_round_trip(data):
    packed = torch.tensor(list(data), dtype=torch.uint8)
    codes = unpack_nibbles(packed)
    assert codes.shape == (2 * len(data),) and int(codes.max()) <= 15
    assert torch.equal(pack_nibbles(codes), packed)


def test_nibble_order_low_first():
    assert pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    with pytest.raises(ValueError):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


# --------------------------------------------------------------------------- dequantization


def _half_gap(y: torch.Tensor) -> torch.Tensor:
    """Largest rounding error at scaled magnitude y: half the E2M1 spacing, plus saturation."""
    a = y.abs()
    half = torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))
    return half + (a - 6).clamp(min=0)


@pytest.mark.parametrize("fmt", FP4_FORMATS)
@pytest.mark.parametrize("dist", ["normal", "heavy_tailed", "wide_range"])
def test_dequant_error_within_half_a_step(fmt, dist):
    x = DISTRIBUTIONS[dist]((32, 256), seed=15)
    q = quantize_fp4(x, fmt)
    block = q.block_size
    step_scale = q._multiplier().repeat_interleave(block, dim=1)  # dequant factor per element
    y = x / step_scale
    err = (q.dequantize() - x).abs()
    bound = step_scale * _half_gap(y) * (1 + 1e-5) + 1e-30
    assert (err <= bound).all()


@pytest.mark.parametrize(("fmt", "limit"), [("nvfp4", 0.11), ("mxfp4", 0.13)])
def test_relative_error_on_gaussian(fmt, limit):
    x = _normal((128, 512), seed=16)
    rel = ((quantize_fp4(x, fmt).dequantize() - x).norm() / x.norm()).item()
    assert 0.03 < rel < limit


@pytest.mark.parametrize("fmt", FP4_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_fake_quantize_equals_dequantize_of_quantize(fmt, dtype, dist):
    for i, shape in enumerate([(16, 128), (5, 40), (2, 3, 50)]):
        w = (
            DISTRIBUTIONS[dist]((math.prod(shape[:-1]), shape[-1]), seed=20 + i)
            .reshape(shape)
            .to(dtype)
        )
        fq = fake_quantize_fp4(w, fmt)
        assert fq.dtype == dtype and fq.shape == w.shape
        assert _same_bits(fq, quantize_fp4(w, fmt).dequantize(dtype))


@pytest.mark.parametrize("fmt", FP4_FORMATS)
def test_fake_quantize_with_nan_and_no_autograd(fmt):
    w = _normal((4, 64), seed=17).requires_grad_()
    with torch.no_grad():
        w[0, 3] = math.nan
        w[2, 9] = -math.inf
    fq = fake_quantize_fp4(w, fmt)
    assert not fq.requires_grad and fq.grad_fn is None
    assert _same_bits(fq, quantize_fp4(w, fmt).dequantize())
    if fmt == "nvfp4":
        # As in torchao, a non-finite amax makes the default tensor scale, hence everything, NaN.
        assert torch.isnan(fq).all()
    else:
        assert torch.isnan(fq[0, :32]).all() and not torch.isnan(fq[1:]).any()


def test_the_fp4_package_names_resolve_lazily():
    """``apt_model.fp4`` imports its modules on first use of a name; every public name
    resolves to the object its module defines."""
    import importlib

    import apt_model.fp4 as fp4_package

    for name in fp4_package.__all__:
        value = getattr(fp4_package, name)
        module = getattr(value, "__module__", "apt_model.fp4.format")  # FP4_FORMATS: a tuple
        assert module.startswith("apt_model.fp4."), (name, module)
        assert getattr(importlib.import_module(module), name) is value, name
    assert fp4_package.FP4_FORMATS == FP4_FORMATS == ("nvfp4", "mxfp4")
    assert fp4_package.quantize_fp4 is quantize_fp4
    with pytest.raises(AttributeError):
        fp4_package.no_such_name  # noqa: B018
