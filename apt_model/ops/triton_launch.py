"""Launching a compiled Triton kernel again without the JIT's per-call work.

Eager decoding launches the same few kernel shapes thousands of times, and Triton's
per-call work (the autotuner's lookup, binding and specializing every argument) costs
several times the ~15 µs of a cuBLAS call on a slow host. So after the first launch of a
kernel for a given key (shape, dtypes, constants and the 16-byte alignment of each tensor,
which is what Triton specializes on), :func:`direct_launch` calls the compiled kernel's own
runner with the constant arguments bound once; the key's alignment part is checked every
call. Importing this module never imports Triton (the first launch of a key does).
"""

from __future__ import annotations

from torch import Tensor

from apt_model import env

__all__ = ["direct_launch", "interpreting"]

_DIRECT: dict[tuple, tuple] = {}


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
    _DIRECT[key] = direct = (compiled[grids[-1]], tuple(chosen[name] for name in names))
    return direct
