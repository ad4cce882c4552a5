"""bf16 autocast around a model's forward, so the user's loop needs no change.

Outputs come back in fp32 (as a plain model's would), so a loss computed outside the model
keeps full precision. Devices without native bf16 (``accelerator.supports_bf16``: a CPU
without AVX512-BF16 or AMX, for one) keep fp32 and say so once. :func:`bf16_assumed` sets the
answer for a while (the estimator traces a target device's step on this machine's CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from apt_model.accelerator import supports_bf16
from apt_model.i18n import tr
from apt_model.optimization.wrapping import wrap_forward

_WARNED: set[str] = set()
_ASSUMED: ContextVar[bool | None] = ContextVar("vb_bf16_assumed", default=None)


@contextlib.contextmanager
def bf16_assumed(native: bool) -> Iterator[None]:
    """While open, :func:`autocast_dtype` takes ``native`` as the answer to whether the
    device has bf16, whatever this machine's CPU says (and warns of nothing)."""
    token = _ASSUMED.set(native)
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device has it; else None (and a one-time warning)."""
    assumed = _ASSUMED.get()
    if assumed is not None:
        return torch.bfloat16 if assumed else None
    if supports_bf16(device):
        return torch.bfloat16
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(
            tr(f"虚拟Blackwell: {device.type} 没有原生bf16 (CPU需要AVX512-BF16或AMX)，混合精度已关闭："
               "模拟的bf16会更慢；fp16需要损失缩放，因此保持fp32",
               f"Virtual Blackwell: {device.type} has no native bf16 (a CPU needs AVX512-BF16 or AMX); mixed "
               "precision is off: emulated bf16 would be slower, and fp16 would need loss scaling, so the "
               "model stays in fp32"),
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def _model_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


_HALF = (torch.bfloat16, torch.float16)


def _upcast(value: Any) -> Any:
    """fp32 copy of a half-precision tensor, or of the half tensors in a plain tuple."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF else value
    if type(value) is tuple:
        return tuple(_upcast(v) if isinstance(v, torch.Tensor) else v for v in value)
    return value


def upcast_outputs(out: Any) -> Any:
    """fp32 copies of the half-precision tensors among a forward's outputs (one level deep).

    Caches and other objects inside the outputs are left alone.
    """
    if isinstance(out, dict):  # includes Hugging Face ModelOutput (an OrderedDict)
        for key in list(out.keys()):
            out[key] = _upcast(out[key])
        return out
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        changes = {f.name: _upcast(getattr(out, f.name)) for f in dataclasses.fields(out) if f.init}
        return dataclasses.replace(out, **changes)
    return _upcast(out)


def _autocast_forward(forward: Callable[..., Any], module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    device = _model_device(module)
    dtype = autocast_dtype(device)
    if dtype is None or torch.is_autocast_enabled(device.type):
        return forward(*args, **kwargs)
    with torch.autocast(device.type, dtype=dtype):
        out = forward(*args, **kwargs)
    return upcast_outputs(out)


def apply_autocast(model: nn.Module) -> None:
    wrap_forward(model, "autocast", _autocast_forward)
