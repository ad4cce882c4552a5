"""CUDA autocast's fp32 ops, in a step traced on fake CPU tensors.

VB's bf16 autocast on fake CPU tensors follows CPU autocast's op lists. CUDA autocast runs
more ops in fp32 (``pow``, ``exp``, ``softmax``, ``layer_norm``, ``sum``, ...): GPT-2's tanh
GELU, for one, keeps fp32 intermediates on a card and bf16 ones on the CPU.
``cuda_autocast()`` makes those ops run as CUDA autocast runs them, with nothing hard-coded:

* which ops: those with a CUDA autocast kernel and no CPU one, read from the dispatcher of
  the torch installed (``cuda_only_ops``);
* what CUDA autocast does to a call: asked of CUDA autocast itself, on fake CUDA tensors of
  the same shapes and dtypes (it runs on fake tensors without a GPU once switched on below
  the Python switch that refuses it there; ``_cuda_dtype``, cached by signature);
* where it computes in fp32, the call's half-precision tensors are cast to fp32 before it, as
  autocast casts them: above autograd, so the copies autograd saves are counted.

The functions are swapped on their modules and on ``torch.Tensor`` while active (as
``attention.cuda_attention`` swaps attention): a ``TorchFunctionMode`` would miss the
recomputation of checkpointed blocks inside ``backward``. Calls below autocast (inside an
operator's own implementation) are left alone. Not thread-safe: one trace at a time.
Ops CUDA runs in bf16 and CPU autocast leaves in fp32 (``einsum``, ``addmv``, ...) are not
changed: the CPU trace keeps them in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

_HALF = (torch.float16, torch.bfloat16)
_OWNERS = (torch, torch.Tensor, F)
_active = False  # inside a swapped function: calls it makes are left alone


@functools.cache
def cuda_only_ops() -> frozenset[str]:
    """Names of the aten ops CUDA autocast handles and CPU autocast does not."""
    def has(op: str, key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)

    return frozenset(op.removeprefix("aten::").split(".")[0] for op in torch._C._dispatch_get_all_op_names()
                     if op.startswith("aten::") and has(op, "AutocastCUDA") and not has(op, "AutocastCPU"))


def _targets() -> list[tuple[Any, str]]:
    """(owner, attribute) of every Python entry point of those ops: ``torch.pow``,
    ``Tensor.pow``, ``Tensor.__pow__``, ``F.layer_norm``, ... (in-place ones excluded:
    autocast leaves them alone)."""
    out = []
    for name in sorted(cuda_only_ops()):
        for owner in _OWNERS:
            for attribute in (name, f"__{name}__", f"__r{name}__"):
                if callable(getattr(owner, attribute, None)):
                    out.append((owner, attribute))
    return out


@contextlib.contextmanager
def cuda_autocast_on(dtype: torch.dtype) -> Iterator[None]:
    enabled, before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", before)


def _signature(args: Any) -> tuple:
    return tuple((t.dtype, t.dim()) if isinstance(t, torch.Tensor) else repr(t) for t in tree_leaves(args))


_probed: dict[tuple, torch.dtype | None] = {}


def _cuda_dtype(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype CUDA autocast computes ``function(*args, **kwargs)`` in (its first floating
    output's), asked of CUDA autocast on fake CUDA tensors like the call's; None when it
    cannot say (the call fails there)."""
    key = (function, _signature((args, kwargs)), torch.get_autocast_dtype("cpu"))
    if key not in _probed:
        from torch._subclasses.fake_tensor import FakeTensorMode

        def shadow(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

        dtype = None
        with _disable_current_modes(), FakeTensorMode(), cuda_autocast_on(key[2]):
            try:
                out = function(*tree_map(shadow, args), **tree_map(shadow, kwargs))
                dtype = next((t.dtype for t in tree_leaves(out)
                              if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                dtype = None
        _probed[key] = dtype
    return _probed[key]


def _upcast(t: Any) -> Any:
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t


def _under_autocast() -> bool:
    """Whether CPU autocast would see a call made now (on, and not inside an operator)."""
    return torch.is_autocast_enabled("cpu") and not torch._C._dispatch_tls_is_dispatch_key_excluded(
        torch._C.DispatchKey.AutocastCPU)


def _as_on_cuda(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _active
        if _active or not _under_autocast():
            return function(*args, **kwargs)
        _active = True
        try:
            half = any(isinstance(t, torch.Tensor) and t.dtype in _HALF for t in tree_leaves((args, kwargs)))
            if not half or _cuda_dtype(function, args, kwargs) != torch.float32:
                return function(*args, **kwargs)
            args, kwargs = tree_map(_upcast, (args, kwargs))
            with torch.autocast("cpu", enabled=False):
                return function(*args, **kwargs)
        finally:
            _active = False

    return wrapper


@contextlib.contextmanager
def cuda_autocast() -> Iterator[None]:
    """While active, the ops CUDA autocast runs in fp32 run in fp32 under CPU autocast too
    (see the module doc); every function is restored on exit."""
    saved = [(owner, attribute, owner.__dict__.get(attribute)) for owner, attribute in _targets()]
    for owner, attribute, _ in saved:
        setattr(owner, attribute, _as_on_cuda(getattr(owner, attribute)))
    try:
        yield
    finally:
        for owner, attribute, original in saved:
            if original is None:  # inherited (Tensor's methods from its C base): drop the swap
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
