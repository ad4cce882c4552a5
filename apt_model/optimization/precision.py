"""bf16 autocast around a model's forward, so the user's loop needs no change.

Outputs come back in fp32 (as a plain model's would), so a loss computed outside the model
keeps full precision. Devices without native bf16 keep fp32 and say so once.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from apt_model.accelerator import supports_bf16
from apt_model.i18n import tr
from apt_model.optimization.wrapping import wrap_forward

_WARNED: set[str] = set()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device has it; else None (and a one-time warning)."""
    if supports_bf16(device):
        return torch.bfloat16
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(
            tr(f"虚拟Blackwell: {device.type} 不支持bf16，混合精度已关闭（fp16需要损失缩放，保持fp32以免训练发散）",
               f"Virtual Blackwell: {device.type} has no bf16; mixed precision is off (fp16 would need "
               "loss scaling, so the model stays in fp32 rather than risk diverging)"),
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
