"""Which FP4 kernel multiplies which shape: the dispatch policy of the Triton FP4 matmul.

:func:`plan` says which kernel (and, where it is fixed, which config) a product of ``m``
activation rows by an ``n x k`` packed weight gets by default from
:func:`apt_model.fp4.triton_matmul.fp4_matmul`; a :class:`KernelPlan` handed to that function
pins the choice instead (tests, benchmarks). This module imports neither Triton nor the
kernels, so asking costs nothing on any machine.

The kernels, by the number of rows ``m``:

* ``"gemv"`` (``m <= GEMV_MAX_M``): one activation row, memory-bound.
* ``"small"`` (``m <= SMALL_MAX_M``): one 16..64-row tile per weight tile on the tensor cores.
  Up to ``DECODE_PINNED_M`` rows it runs its first candidate config as is, above that the
  autotuned one.
* ``m > SMALL_MAX_M`` ("large"): ``"gemm"``, the fused tiled matmul, or ``"chunked"``, weight
  slices dequantized by Triton and multiplied by cuBLAS. Which is faster depends on the GPU
  and the shape, so the first call per :class:`LargeKey` (device, N, K, M bucket, dtype,
  format, bias) times both and keeps the faster; until then :func:`plan` answers
  ``"large"``, afterwards the kernel kept (:func:`chosen_large_kernels` lists every choice).
  ``VB_FP4_LARGE_KERNEL=gemm|chunked`` pins one; fp32 activations always take ``"gemm"``
  (the chunked path is for 16-bit cuBLAS); without autotuning or in the interpreter,
  ``"chunked"``.

``VB_FP4_AUTOTUNE=0`` runs every kernel with its first candidate config (a fast start, for
tests); by default the candidates of :func:`candidate_configs` are autotuned per shape, on
the first call of each. The measurements behind the thresholds and the configs are in
BENCHMARKS.md (``bench/fp4_variants.py``, ``bench/fp4_linear.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from apt_model import env
from apt_model.ops.triton_launch import interpreting, next_pow2

__all__ = [
    "DECODE_PINNED_M",
    "GEMV_MAX_M",
    "KERNELS",
    "SMALL_MAX_M",
    "KernelPlan",
    "LargeKey",
    "autotuning",
    "candidate_configs",
    "chosen_large_kernels",
    "fixed_config",
    "interpreting",
    "kernel_for",
    "plan",
]

# Row-count thresholds between the kernels (H100 measurements: bench/fp4_variants.py).
GEMV_MAX_M = 1
SMALL_MAX_M = 64
# Up to this many rows the small kernel runs its first config without autotuning.
DECODE_PINNED_M = 16

# What a KernelPlan may name: a kernel, or "large" (gemm or chunked, timed at the first call).
KERNELS = ("gemv", "small", "gemm", "chunked", "large")



def autotuning() -> bool:
    """VB_FP4_AUTOTUNE=0 skips autotuning (first config of each list: fast start, tests)."""
    return env.switch(env.FP4_AUTOTUNE, True)


def _c(num_warps: int, num_stages: int, **meta) -> dict:
    return dict(meta, num_warps=num_warps, num_stages=num_stages)


# The configs each kernel's autotuner chooses from, as the ``config`` dicts a KernelPlan takes
# (kernel meta-parameters plus num_warps and num_stages). Small lists on purpose: each config
# is one compile (~1 s) on first use of a shape.
_CONFIGS: dict[str, tuple[dict, ...]] = {
    # H100, M = 1, by CUDA-graph replay (2026-11-26): 0.0596-0.0607 ms for 8192 -> 28672,
    # 0.022-0.026 for 8192 -> 8192 and 0.059-0.069 for 28672 -> 8192 (NVFP4 and MXFP4);
    # the first config was within 4% of the best on all six. Since the GEMV prepares the row
    # itself (H200, 2026-12-01) the first config takes 76 registers and runs 10-38% behind
    # the autotuner's pick on layers of 16384 rows and more (bench/fp4_read_floor.py).
    "gemv": (
        _c(8, 1, BLOCK_N=16, BLOCK_K=1024, PREFETCH=1),
        _c(4, 1, BLOCK_N=32, BLOCK_K=1024, PREFETCH=0),
        _c(8, 1, BLOCK_N=32, BLOCK_K=2048, PREFETCH=0),
        _c(8, 1, BLOCK_N=16, BLOCK_K=2048, PREFETCH=1),
    ),
    # H100, M = 16 (bench/fp4_variants.py, 2026-11-26): the first config 0.082 ms for
    # 8192 -> 28672 and 0.032 ms for 8192 -> 8192, the best of eight both times; with register
    # prefetch instead of the compiler's pipeline 0.14 ms. Up to DECODE_PINNED_M rows it is
    # used as is: an earlier autotuning over these once kept a config that then ran 2x slower.
    "small": (
        _c(4, 4, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, SWAP=False, PREFETCH=False),
        _c(4, 3, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, SWAP=False, PREFETCH=False),
        _c(4, 4, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, SWAP=False, PREFETCH=False),
    ),
    # H100, 8192 -> 28672, M = 4096: the first config 4.3 ms (1.5x cuBLAS), the others
    # 4.5-6.2 ms; the chunked path (2.9-3.0 ms) wins there and is picked at run time.
    "gemm": (
        _c(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP=False, PREFETCH=True),
        _c(4, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP=False, PREFETCH=True),
        _c(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP=False, PREFETCH=False),
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP=False, PREFETCH=True),
    ),
}


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown FP4 kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    return kernel


def candidate_configs(kernel: str) -> list[dict]:
    """The configs the autotuner of ``kernel`` chooses from, first the one it runs without
    autotuning (copies: changing them changes nothing). ``"chunked"`` and ``"large"`` have
    none (the chunked path has no Triton config of its own)."""
    return [dict(c) for c in _CONFIGS.get(_check_kernel(kernel), ())]


def fixed_config(kernel: str, m: int) -> dict | None:
    """The config ``kernel`` runs at ``m`` rows without asking the autotuner, or None where
    the autotuner picks (or the kernel has no config).

    Fixed: the first candidate for ``"small"`` up to ``DECODE_PINNED_M`` rows, and for every
    kernel when autotuning is off (``VB_FP4_AUTOTUNE=0``).
    """
    configs = _CONFIGS.get(_check_kernel(kernel))
    if not configs:
        return None
    if (kernel == "small" and m <= DECODE_PINNED_M) or not autotuning():
        return dict(configs[0])
    return None


def kernel_for(m: int) -> str:
    """The kernel family for ``m`` activation rows: "gemv", "small" or "large".

    "large" is the fused "gemm" or the "chunked" dequantize + cuBLAS path, whichever was
    measured faster for the shape (see the module docstring).
    """
    if m <= GEMV_MAX_M:
        return "gemv"
    return "small" if m <= SMALL_MAX_M else "large"


@dataclass(frozen=True)
class KernelPlan:
    """How :func:`apt_model.fp4.triton_matmul.fp4_matmul` runs one product.

    ``kernel``: "gemv" (one row), "small" (up to 64 rows), "gemm", "chunked", or "large"
    (gemm or chunked, whichever the first call per shape measures faster).
    ``config``: the kernel's Triton config as a dict (meta-parameters such as ``BLOCK_N``,
    ``BLOCK_K``, plus ``num_warps`` and ``num_stages``; see :func:`candidate_configs`);
    None: the autotuned one, or the fixed one where :func:`fixed_config` gives it.
    ``split_k``: how many programs share the reduction over K ("gemv", "small", "gemm");
    None: derived from the layer's size and the GPU's multiprocessor count.
    ``chunk_rows``: weight rows the "chunked" path dequantizes per cuBLAS call (None:
    ``triton_matmul.CHUNK_BYTES`` of bf16 at a time).
    ``use_asm``: the PTX decode (True) or the plain-Triton one (False); None: PTX except
    under the interpreter.
    """

    kernel: str
    config: dict | None = None
    split_k: int | None = None
    chunk_rows: int | None = None
    use_asm: bool | None = None

    def __post_init__(self) -> None:
        _check_kernel(self.kernel)
        for name in ("split_k", "chunk_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"KernelPlan.{name} must be a positive int or None, got {value!r}")


class LargeKey(NamedTuple):
    """What the choice between "gemm" and "chunked" is made for (M rounded up to a power of
    two; ``scales_dtype`` float8_e4m3fn for NVFP4, uint8 for MXFP4)."""

    device: torch.device
    n: int
    k: int
    m_bucket: int
    dtype: torch.dtype
    scales_dtype: torch.dtype
    bias: bool


# LargeKey -> "gemm" | "chunked", measured once per key by the kernel module.
_LARGE_CHOICE: dict[LargeKey, str] = {}


def chosen_large_kernels() -> dict[LargeKey, str]:
    """Every choice between "gemm" and "chunked" measured so far in this process (a copy)."""
    return dict(_LARGE_CHOICE)


def _large_key(device: torch.device, n: int, k: int, m: int, dtype: torch.dtype,
               scales_dtype: torch.dtype, bias: bool) -> LargeKey:
    return LargeKey(device, n, k, next_pow2(m), dtype, scales_dtype, bias)


def _settled_large_kernel(key: LargeKey) -> str | None:
    """The large-M kernel for ``key`` when no measurement is needed (or one was made)."""
    pinned = env.get(env.FP4_LARGE_KERNEL)
    if pinned in ("gemm", "chunked"):
        return pinned
    if key.dtype not in (torch.bfloat16, torch.float16):
        return "gemm"
    if not autotuning() or interpreting():
        return "chunked"
    return _LARGE_CHOICE.get(key)


def _remember_large_kernel(key: LargeKey, kernel: str) -> str:
    _LARGE_CHOICE[key] = kernel
    return kernel


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` with its index (the current CUDA device when none is named)."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def plan(m: int, n: int, k: int, *, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.bfloat16, fmt: str = "nvfp4",
         bias: bool = False) -> KernelPlan:
    """The kernel, and where it is fixed the config, that ``fp4_matmul`` runs by default for
    ``m`` rows of ``dtype`` activations times an ``n x k`` ``fmt`` weight (with a bias or not)
    on ``device`` (default: the current CUDA device).

    Large M answers ``"large"`` until the first call of that shape has measured "gemm"
    against "chunked", then the kernel it kept. ``config`` is None where the autotuner picks;
    ``split_k``, ``chunk_rows`` and ``use_asm`` are left to the launch (see
    :class:`KernelPlan`). Handing the result to ``fp4_matmul`` runs what it would run anyway.
    Describes the Triton path only: off CUDA, or without Triton, ``fp4_linear`` runs the
    PyTorch reference instead.
    """
    kernel = kernel_for(m)
    if kernel == "large":
        scales_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
        key = _large_key(_cuda_device(device), n, k, m, dtype, scales_dtype, bias)
        kernel = _settled_large_kernel(key) or "large"
    return KernelPlan(kernel, config=fixed_config(kernel, m))
