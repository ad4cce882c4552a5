"""Launching a compiled Triton kernel again without the JIT's per-call work.

Eager decoding launches the same few kernel shapes thousands of times, and Triton's
per-call work (the autotuner's lookup, binding and specializing every argument) costs
several times the ~15 µs of a cuBLAS call on a slow host. So after the first launch of a
kernel for a given key (shape, dtypes, constants and the 16-byte alignment of each tensor,
which is what Triton specializes on), :func:`direct_launch` calls the compiled kernel's own
runner with the constant arguments bound once; the key's alignment part is checked every
call. On the Triton versions whose launcher was checked (``_BARE_VERSIONS``), the runner is
Triton's C launch function itself with its fixed arguments bound, skipping the per-launch
Python of Triton's runner (stream lookup, launch metadata, calls of the launch hooks, scratch
allocation) wherever a kernel needs no scratch; while a launch hook is set (Triton 3.6 keeps
them in chains, empty by default), it launches through that runner. Importing this module
never imports Triton (the first launch of a key does).

:func:`cdiv` and :func:`next_pow2` are the host's integer helpers for grids and block sizes:
Triton 3.6's ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions, several
microseconds a call on the host.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from apt_model import env

__all__ = ["HALF_DTYPES", "cdiv", "direct_launch", "interpreting", "next_pow2", "sm_count",
           "triton_runs_on"]

HALF_DTYPES = (torch.bfloat16, torch.float16)  # the 16-bit dtypes the decoding kernels take

_DIRECT: dict[tuple, tuple] = {}
# Triton versions whose C launcher takes (grid x, y, z, stream, function, cooperative grid,
# programmatic dependent launch, global scratch, profile scratch, packed metadata, launch
# metadata, enter hook, exit hook, kernel arguments...), as 3.6 does; others use the runner.
_BARE_VERSIONS = ("3.6.",)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """The least power of two >= ``v`` (1 for ``v`` <= 1)."""
    return 1 << max(0, (v - 1).bit_length())


@functools.cache
def triton_runs_on(index: int) -> bool:
    """Whether this package's Triton kernels run on CUDA device ``index``: Triton installed,
    compute capability 8.0 or newer."""
    return importlib.util.find_spec("triton") is not None and \
        torch.cuda.get_device_capability(index) >= (8, 0)


@functools.cache
def sm_count(index: int) -> int:
    """CUDA device ``index``'s multiprocessor count (grids sized to fill the GPU)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env.get(env.TRITON_INTERPRET) == "1"


def _aligned(tensors: tuple[Tensor, ...]) -> tuple[bool, ...]:
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def direct_launch(key: tuple, fn, grid, tensors: tuple[Tensor, ...], consts: dict) -> tuple | None:
    """``fn[grid](*tensors, **consts)``: the first time for ``key`` through the JIT (or the
    autotuner ``fn``), then straight through the compiled kernel, on the current stream.
    ``tensors`` are the kernel's leading parameters (the only ones that may change under one
    key). Returns the compiled kernel's (runner, constant arguments) once known (None under
    the interpreter)."""
    key = (key, _aligned(tensors))
    direct = _DIRECT.get(key)
    if direct is not None:
        runner, tail = direct
        runner(*tensors, *tail)
        return direct
    import triton

    grids = []

    def grid_fn(meta: dict) -> tuple[int, ...]:
        launch_grid = tuple(grid(meta) if callable(grid) else grid)
        grids.append(launch_grid + (1,) * (3 - len(launch_grid)))  # the runner reads 3
        return grids[-1]

    compiled = fn[grid_fn](*tensors, **consts)
    if compiled is None or not hasattr(compiled, "__getitem__"):  # the interpreter
        return None
    tuned = isinstance(fn, triton.runtime.Autotuner)  # it wraps the JIT function
    jit = fn.fn if tuned else fn
    chosen = {**consts, **(fn.best_config.kwargs if tuned else {})}
    names = jit.arg_names[len(tensors):]
    if not all(name in chosen for name in names):
        return None
    grid = grids[-1]
    runner = _bare_runner(compiled, grid, tensors[0].device.index) or compiled[grid]
    _DIRECT[key] = direct = (runner, tuple(chosen[name] for name in names))
    return direct


def _bare_runner(compiled, grid: tuple[int, int, int], index: int):
    """``compiled``'s launch on ``grid`` as one call of Triton's C launcher (the runner's
    signature: the kernel's arguments, then ``stream=``; default the current stream of CUDA
    device ``index``), or None where that is not known to be safe. While a launch hook is
    set, each call goes through Triton's runner instead, which calls the hooks."""
    import triton
    from triton import knobs

    if not triton.__version__.startswith(_BARE_VERSIONS):
        return None
    launcher = getattr(compiled, "run", None)
    launch = getattr(launcher, "launch", None)
    if launch is None or getattr(launcher, "global_scratch_size", 1) \
            or getattr(launcher, "profile_scratch_size", 1):
        return None
    head = (*grid, None, compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl,
            None, None, compiled.packed_metadata, None, None, None)
    current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent from CPU builds
    hooked = compiled[grid]
    runtime = knobs.runtime

    def run(*args, stream: int | None = None) -> None:
        if _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook):
            hooked(*args, stream=stream)
        else:
            launch(*head[:3], current_stream(index) if stream is None else stream, *head[4:], *args)

    return run


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook is set: a callable, or a hook chain holding any."""
    return hook is not None and getattr(hook, "calls", True) != []
