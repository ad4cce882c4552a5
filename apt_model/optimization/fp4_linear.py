"""FP4 weights for ``nn.Linear`` layers.

The master weight stays the same ``nn.Parameter`` object the user's optimizer updates, so
the model keeps learning and its state_dict stays plain. In training the layer computes
with the FP4-quantized weight and passes gradients straight through to the master weight
(the trained model is FP4-deployable); in inference it multiplies by the packed weight,
which is re-packed only when the master weight changes.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from apt_model.formats.fp4 import FP4Weight, fake_quantize_fp4, quantize_fp4


class _QuantizeStraightThrough(torch.autograd.Function):
    """Forward: the FP4 round trip of the weight. Backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, fmt: str) -> torch.Tensor:
        return fake_quantize_fp4(weight, fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class FP4Linear(nn.Module):
    """A linear layer whose weight is used in NVFP4 or MXFP4 form."""

    def __init__(self, linear: nn.Linear, fmt: str = "nvfp4") -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.fmt = fmt
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: FP4Weight | None = None
        self._packed_key: tuple[int, int, torch.device] | None = None

    def packed_weight(self) -> FP4Weight:
        """The packed FP4 weight, re-quantized only when the master weight was changed or moved."""
        w = self.weight
        key = (id(w), w._version, w.device)
        if self._packed is None or self._packed_key != key:
            with torch.no_grad():
                self._packed = quantize_fp4(w.detach(), self.fmt)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            weight = _QuantizeStraightThrough.apply(self.weight, self.fmt)
        else:
            weight = self.packed_weight().dequantize(self.weight.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fmt={self.fmt}"


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """Ids of parameters reachable under more than one module (e.g. a head tied to the embedding)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def fp4_candidates(model: nn.Module, skip: tuple[str, ...], min_features: int) -> list[tuple[str, nn.Linear]]:
    """Linear layers worth converting: not tied, not tiny, not named in the skip list."""
    shared = _shared_weight_ids(model)
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if id(module.weight) in shared:
            continue
        if min(module.in_features, module.out_features) < min_features:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            continue
        out.append((name, module))
    return out


def convert_to_fp4(model: nn.Module, fmt: str, skip: tuple[str, ...], min_features: int) -> list[FP4Linear]:
    """Swap every candidate ``nn.Linear`` for an `FP4Linear` holding the same parameters."""
    converted = []
    for name, linear in fp4_candidates(model, skip, min_features):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = FP4Linear(linear, fmt)
        layer.train(linear.training)
        setattr(parent, child, layer)
        converted.append(layer)
    return converted
