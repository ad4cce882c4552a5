"""FP4 weights for ``nn.Linear`` layers and GPT-2's ``Conv1D`` projections: :class:`FP4Linear`,
:func:`convert_to_fp4`, :func:`freeze_fp4`.

The master weight stays the same ``nn.Parameter`` object the user's optimizer updates, so
the model keeps learning and its state_dict stays plain. In training the layer computes
with the FP4-quantized weight and passes gradients straight through to the master weight
(the trained model is FP4-deployable); in inference it multiplies by the packed weight,
which is re-packed only when the master weight changes (at each use while a VGPU stack
streams the layer: :meth:`FP4Linear.keep_packed`).

Training takes one of two paths per call, by the number of activation rows, each the
faster one there (the measurements: BENCHMARKS.md, ``bench/fp4_train.py``); both quantize
with the Triton kernels on CUDA, and both give the same loss and gradients up to rounding:

* by default (:func:`straight_through_fp4`): the weight fake-quantized in one pass straight
  into the matmul's dtype, then cuBLAS forward and backward;
* a few rows through a large layer (``FUSED_TRAIN_MAX_ROWS``, ``FUSED_TRAIN_MIN_WEIGHTS``;
  :func:`fused_training_linear`): the weight packed, the forward and the input gradient by
  the fused FP4 kernels, which read 4.5 bits per weight instead of 16. Both paths re-read
  the fp32 master weight to quantize it, so the fused one only wins where the matmuls'
  weight reads dominate the launch overheads: large layers at a few rows.

For serving, :meth:`FP4Linear.freeze` (or :func:`freeze_fp4` on a whole model) drops the
master weight: the layer then holds only the packed weight, as buffers named
``weight_packed``, ``weight_scales`` and (NVFP4) ``weight_tensor_scale``, so the device holds
4.5 (NVFP4) or 4.25 (MXFP4) bits per weight instead of 32, and ``.to()`` and the state_dict
carry the packed form.

A ``Conv1D`` (``transformers.pytorch_utils``: ``x @ W + b`` with ``W`` stored ``[in, out]``) is
the same linear map with its weight stored transposed. Its `FP4Linear` keeps that Parameter
in its ``[in, out]`` layout (so the optimizer and the state_dict see the ``Conv1D``'s own
weight) and computes with the ``[out, in]`` view ``weight.t()``; gradients reach the
Parameter through that view, in its own layout. Packed and frozen weights are ``[out, in]``
for both kinds.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from apt_model.fp4.format import FP4Weight
from apt_model.fp4.ops import (
    fp4_fake_quantize,
    fp4_grad_input,
    fp4_linear,
    fp4_linear_tensors,
    fp4_quantize,
    fp4_rms_norm_linear_tensors,
    triton_available,
)
from apt_model.i18n import tr
from apt_model.ops.triton_launch import HALF_DTYPES

__all__ = [
    "FUSED_TRAIN_MAX_ROWS",
    "FUSED_TRAIN_MIN_WEIGHTS",
    "FP4_RIDERS",
    "PACKED_BUFFERS",
    "SIBLINGS",
    "FP4Linear",
    "convert_to_fp4",
    "count_linear_layers",
    "fp4_candidates",
    "freeze_fp4",
    "fused_training_linear",
    "is_conv1d",
    "linear_features",
    "moved_uncast",
    "note_traced_rms_norm",
    "retie",
    "straight_through_fp4",
    "tied_groups",
]

# Training takes the fused kernels for at most this many rows through a layer of at least
# this many weights (H100 measurements: bench/fp4_train.py, BENCHMARKS.md). On an H100 the
# fused path won by 3% for 8192 -> 28672 at 16 rows and lost at every row count for
# 4096 -> 4096.
FUSED_TRAIN_MAX_ROWS = 16
FUSED_TRAIN_MIN_WEIGHTS = 1 << 27

# Buffer names of a frozen layer, in FP4Weight.state_tensors() order.
PACKED_BUFFERS = {"packed": "weight_packed", "scales": "weight_scales",
                  "tensor_scale": "weight_tensor_scale"}

# Inside torch.compile: a fused group's product, by the group's key, until each member took
# its columns ([input, outputs, members yet to take theirs]). One module dict, so that no
# object of a group is reached through two members: a compiled graph guards on every path
# it read an object through, each call, and on their being the same object.
TRACED_GROUP_OUTPUTS: dict[int, list] = {}

# Inside torch.compile: the attribute of a traced RMSNorm output naming its (input, weight,
# eps) (``note_traced_rms_norm``).
_TRACED_NORM_ATTR = "_vb_rms_norm"


def note_traced_rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> None:
    """Inside ``torch.compile``: ``out`` is ``rms_norm(x, weight, eps)``. A frozen FP4 layer
    (or fused group) given ``out`` as its one row then makes the norm inside its GEMV from
    ``x`` (:func:`~apt_model.fp4.ops.fp4_rms_norm_linear`), so the compiled graph drops the
    norm's own kernel where nothing else reads ``out``. The note is an attribute of the
    traced tensor: it leaves no state behind the call."""
    setattr(out, _TRACED_NORM_ATTR, (x, weight, eps))


def _traced_norm_of(given: torch.Tensor, dtype: torch.dtype) -> tuple | None:
    """The noted norm (input, weight, eps) whose output is ``given``, where the GEMV can make
    it: one row, the input, weight and output all of ``dtype``, a 16-bit one."""
    entry = getattr(given, _TRACED_NORM_ATTR, None)
    if entry is None:
        return None
    x, weight, eps = entry
    if dtype in HALF_DTYPES and given.dtype == x.dtype == weight.dtype == dtype \
            and given.numel() == given.shape[-1] and weight.shape == given.shape[-1:]:
        return x, weight, eps
    return None


def _conv1d_class() -> type[nn.Module] | None:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` if that module is imported, else None.

    Looked up in ``sys.modules``, never imported: a model can only hold ``Conv1D`` layers once
    their module has been imported, so a model without any costs no transformers import.
    Matching the class itself, not its name, cannot mistake another library's ``Conv1D`` (a
    real convolution, or a copy with another forward) for this one.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly GPT-2's ``Conv1D`` (not a subclass, whose forward may differ)."""
    conv1d = _conv1d_class()
    return conv1d is not None and type(module) is conv1d


def count_linear_layers(model: nn.Module) -> int:
    """The linear layers of ``model`` that reports count: ``nn.Linear`` (and subclasses),
    GPT-2 ``Conv1D`` and `FP4Linear`."""
    return sum(isinstance(m, (nn.Linear, FP4Linear)) or is_conv1d(m) for m in model.modules())


class _QuantizeStraightThrough(torch.autograd.Function):
    """Forward: the FP4 round trip of the weight, in ``dtype``. Backward: the identity
    (straight-through), in the master weight's dtype."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        return fp4_fake_quantize(weight, fmt, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.to(ctx.weight_dtype), None, None


class _FusedFP4LinearTrain(torch.autograd.Function):
    """Few rows: ``x @ fp4(W)^T + b`` by the fused kernels, gradients straight through.

    The forward packs the master weight and runs the fused product; the backward gets the
    input gradient from the packed weight (fused kernel) and the weight gradient as
    ``grad^T x``, handed to the master weight unchanged (straight-through), as the
    fake-quantized path does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                fmt: str) -> torch.Tensor:
        q = fp4_quantize(weight, fmt)
        ctx.save_for_backward(x, q.packed, q.scales, q.tensor_scale)
        ctx.fmt, ctx.shape = fmt, q.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return fp4_linear(x, q, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, packed, scales, tensor_scale = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            q = FP4Weight(ctx.fmt, packed, scales, tensor_scale, ctx.shape)
            grad_x = fp4_grad_input(grad, q).to(x.dtype)
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def straight_through_fp4(weight: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """The FP4 round trip of ``weight`` in ``dtype``, whose gradient reaches ``weight``
    unchanged (straight-through, in the weight's dtype): the default training path of
    :class:`FP4Linear` multiplies by this with ``F.linear``."""
    return _QuantizeStraightThrough.apply(weight, fmt, dtype)


def fused_training_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          fmt: str) -> torch.Tensor:
    """``x @ fp4(weight)^T + bias`` by the fused FP4 kernels (the reference ops off CUDA),
    gradients straight through to ``weight``: :class:`FP4Linear`'s training path for a few
    rows through a large layer. ``x``, ``weight`` and ``bias`` share one dtype."""
    return _FusedFP4LinearTrain.apply(x, weight, bias, fmt)


def written(t: torch.Tensor) -> int:
    """``t``'s version counter: how often it was written in place; -1 for an inference tensor
    (e.g. a VGPU slot's view bound under ``inference_mode``), which has none and cannot be
    written in place outside that mode."""
    return -1 if t.is_inference() else t._version


class FP4Linear(nn.Module):
    """A linear layer whose weight is used in NVFP4 or MXFP4 form."""

    def __init__(self, linear: nn.Module, fmt: str = "nvfp4") -> None:
        """Take over ``linear``, an ``nn.Linear`` or a GPT-2 ``Conv1D``: its weight and bias
        ``Parameter`` objects, the weight kept in its own layout (``[in, out]`` for ``Conv1D``,
        recorded as ``weight_transposed``)."""
        super().__init__()
        self.weight_transposed = is_conv1d(linear)
        self.in_features, self.out_features = linear_features(linear)
        self.fmt = fmt
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: FP4Weight | None = None
        self._packed_key: tuple | None = None
        self._keep_packed = True  # see keep_packed
        self._compute_dtype: torch.dtype | None = None  # a frozen layer's output dtype
        self._fused = None  # the FusedFP4Projections this layer belongs to (not a submodule)
        self._fused_index = 0
        self._fused_key = 0  # that group's key (0: none)

    @classmethod
    def from_packed(cls, weight: FP4Weight, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> FP4Linear:
        """A frozen layer serving ``weight`` (shape ``[out, in]``), computing in ``dtype``."""
        if len(weight.shape) != 2:
            raise ValueError(f"FP4Linear needs a 2-D weight [out, in], got shape {weight.shape}")
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit {out_features} outputs")
        layer = cls(nn.Linear(in_features, out_features, bias=False, device="meta"), weight.fmt)
        layer._install_packed(weight, dtype)
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        return layer

    @property
    def frozen(self) -> bool:
        """True once the master weight is gone and only the packed weight is kept."""
        return self._parameters.get("weight") is None  # (not ``self.weight``: asked per call)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the weight is dequantized to: the master weight's, recorded at freezing."""
        if self.frozen:
            assert self._compute_dtype is not None
            return self._compute_dtype
        return self.weight.dtype

    def master_weight(self) -> torch.Tensor:
        """The master weight (of a layer not frozen) as ``[out, in]``: the Parameter, or for a
        ``Conv1D`` its transposed view, through which gradients reach the Parameter in its own
        ``[in, out]`` layout."""
        return self.weight.t() if self.weight_transposed else self.weight

    def keep_packed(self, keep: bool) -> None:
        """Whether :meth:`packed_weight` keeps the weight it quantizes from the master weight
        between calls (the default) or quantizes it at each call and keeps nothing (``keep``
        False; what is kept is dropped now). A VGPU stack that streams this layer's master
        weight turns keeping off: a kept copy would stay on the device outside the stack's
        plan, and the offloaded optimizer writes the new weight into the master's home, which
        the cache's key (the Parameter's identity, version and device) does not see. A frozen
        layer's packed weight is its buffers either way."""
        self._keep_packed = keep
        if not self.frozen:
            self._packed = None
            self._packed_key = None

    def packed_weight(self) -> FP4Weight:
        """The packed FP4 weight, re-quantized only when the master weight was changed or moved
        (at every call where :meth:`keep_packed` turned keeping off).

        A frozen layer's is built from its buffers, so it follows ``.to()`` and
        ``load_state_dict`` (rebuilt only when a buffer was replaced or written to). Inside
        ``torch.compile`` nothing is cached: a tensor's version counter cannot be guarded
        on, so the compiled graph builds (frozen) or quantizes (master weight) it in place,
        with no graph break.
        """
        compiling = torch.compiler.is_compiling()
        if self.frozen:
            buffers = self._buffers
            if compiling:
                return FP4Weight.from_state_tensors(self.fmt, (self.out_features, self.in_features), {
                    key: buffers[name] for key, name in PACKED_BUFFERS.items()
                    if buffers.get(name) is not None})
            # Asked once per call when decoding: the cheapest check that the buffers are the
            # same tensors, unwritten (identity and version of each).
            packed, scales = buffers["weight_packed"], buffers["weight_scales"]
            tensor_scale = buffers.get("weight_tensor_scale")
            key = (id(packed), written(packed), id(scales), written(scales), id(tensor_scale),
                   None if tensor_scale is None else written(tensor_scale))
            if self._packed is None or self._packed_key != key:
                present = {"packed": packed, "scales": scales}
                if tensor_scale is not None:
                    present["tensor_scale"] = tensor_scale
                self._packed = FP4Weight.from_state_tensors(
                    self.fmt, (self.out_features, self.in_features), present)
                self._packed_key = key
            return self._packed
        w = self.weight
        if compiling or not self._keep_packed:
            return fp4_quantize(self.master_weight().detach(), self.fmt)
        key = (id(w), w._version, w.device)
        if self._packed is None or self._packed_key != key:
            with torch.no_grad():
                self._packed = fp4_quantize(self.master_weight(), self.fmt)
            self._packed_key = key
        return self._packed

    def freeze(self) -> FP4Linear:
        """Keep only the packed weight (for serving): the master weight is dropped for good.

        The packed weight is exactly the one inference used before, so outputs do not change.
        The layer's fused group (if any) packs once all its members are frozen.
        """
        if not self.frozen:
            self._install_packed(self.packed_weight(), self.weight.dtype)
        if self._fused is not None:
            self._fused.pack()
        return self

    def hold_packed(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        """Serve (frozen) from ``packed`` and ``scales`` (equal in value to the layer's own, e.g.
        views of a fused group's rows), dropping the cached weight that held the old ones."""
        self.weight_packed = packed
        self.weight_scales = scales
        self._packed = None
        self._packed_key = None

    def join_fused(self, group, index: int) -> None:
        """Belong to ``group`` (a :class:`~apt_model.fp4.fused.FusedFP4Projections`) as its
        member ``index``, or to none (``group`` None)."""
        object.__setattr__(self, "_fused", group)  # a reference, not a submodule
        self._fused_index = index
        self._fused_key = 0 if group is None else group.key

    def to_plain(self) -> nn.Module:
        """The plain layer this one stands for, an ``nn.Linear`` or (``weight_transposed``) a
        GPT-2 ``Conv1D``: holding the same master weight and bias ``Parameter`` objects, or for
        a frozen layer its dequantized weight (in the compute dtype, on the packed weight's
        device; ``[in, out]`` and contiguous for a ``Conv1D``)."""
        weight = self.weight
        if weight is None:
            dense = self.packed_weight().dequantize(self.compute_dtype)
            weight = nn.Parameter(dense.t().contiguous() if self.weight_transposed else dense)
        if self.weight_transposed:
            with torch.device("meta"):
                plain = _conv1d_class()(self.out_features, self.in_features)
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        plain.weight = weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    def _install_packed(self, weight: FP4Weight, dtype: torch.dtype) -> None:
        """Replace the master weight (if any) by ``weight``'s tensors, registered as buffers."""
        shape = (self.out_features, self.in_features)
        if tuple(weight.shape) != shape:
            raise ValueError(f"packed weight of shape {weight.shape} does not fit a layer of shape {shape}")
        del self.weight
        self.register_parameter("weight", None)
        tensors = weight.state_tensors()
        for key, name in PACKED_BUFFERS.items():
            self.register_buffer(name, tensors.get(key))
        self.fmt = weight.fmt
        self._compute_dtype = dtype
        self._packed = None
        self._packed_key = None

    def plain_weight_nbytes(self) -> int:
        """Bytes the weight takes unpacked, in the master weight's dtype (for statistics)."""
        itemsize = torch.empty((), dtype=self.compute_dtype, device="meta").element_size()
        return self.out_features * self.in_features * itemsize

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FP4Linear:
        """``.to()``, ``.cuda()``, ``.half()``... move a frozen layer's packed tensors but never
        cast them (float8 scales are "floating point" to torch); a dtype change becomes the new
        compute dtype instead."""
        if not self.frozen:
            return super()._apply(fn, recurse)
        if self._fused is not None and self._fused.holds_members():
            self._fused._apply(fn)  # the group's rows moved once; this layer's views follow
        packed = {name: self._buffers[name] for name in PACKED_BUFFERS.values()
                  if self._buffers.get(name) is not None}
        for name in packed:
            self._buffers[name] = None  # the base class skips them; the key order is kept
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(packed)
        device = packed["weight_packed"].device
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        for name, tensor in packed.items():
            self._buffers[name] = moved_uncast(fn, tensor)
        if probe.is_floating_point():
            self._compute_dtype = probe.dtype
        return self

    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The one inference path (no master-weight gradient needed): the packed weight,
        multiplied by the fused FP4 kernel on CUDA (the dequantize-then-matmul reference
        elsewhere), or this layer's part of its fused group's product. Under autocast the
        activations go in the autocast dtype, as ``F.linear`` would take them."""
        given = x
        x = _activations_in(x, self.compute_dtype)
        if self._fused is not None:
            out = self._fused.take(self._fused_index, given, x)
            if out is not None:
                return out
        return fp4_linear(x, self.packed_weight(), self._parameters.get("bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._parameters.get("weight") is None:  # frozen
            if torch.is_grad_enabled() and self.training:  # no guard on training under no_grad
                raise RuntimeError(tr(
                    f"{self._describe()} 已冻结为推理用的打包FP4权重 (没有主权重), 无法训练; "
                    "请在 freeze_fp4 之前训练, 推理时用 model.eval() 或 torch.no_grad()",
                    f"{self._describe()} is frozen to packed FP4 for serving (no master weight) and "
                    "cannot be trained; train before freeze_fp4, and run inference under model.eval() "
                    "or torch.no_grad()"))
            if torch.compiler.is_compiling():
                return _traced_frozen_forward(self, x)
            return self._inference_forward(x)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._training_forward(x)
        return self._inference_forward(x)

    def _training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """FP4 weight, straight-through gradients; the fused kernels for few rows (see the
        module docstring). Under autocast the weight is quantized straight into the
        autocast dtype, the same single rounding as autocast's cast of the fp32 result."""
        device_type = x.device.type
        dtype = self.weight.dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x = x.to(dtype)
        if (x.dtype == dtype and x.numel() <= FUSED_TRAIN_MAX_ROWS * self.in_features
                and self.in_features * self.out_features >= FUSED_TRAIN_MIN_WEIGHTS
                and triton_available(x.device)):
            return fused_training_linear(x, self.master_weight(), self.bias, self.fmt)
        return F.linear(x, straight_through_fp4(self.master_weight(), self.fmt, dtype), self.bias)

    def _describe(self) -> str:
        return f"FP4Linear({self.in_features}->{self.out_features}, {self.fmt})"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={self.fmt}"
                + (", weight_transposed=True" if self.weight_transposed else "")
                + (", frozen=True" if self.frozen else ""))


def _activations_in(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a frozen layer multiplies it: in the autocast dtype under autocast (as
    ``F.linear`` would take it), else in the layer's compute ``dtype``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x if x.dtype == dtype else x.to(dtype)


def _traced_frozen_forward(layer: FP4Linear, x: torch.Tensor) -> torch.Tensor:
    """A frozen layer's ``_inference_forward`` as ``torch.compile`` traces it, reading few of
    the layer's attributes (each read is a guard the compiled graph checks every call): its
    buffers, compute dtype, input width, bias and group key; only a group's first member
    reaches the group, the others take their columns from ``TRACED_GROUP_OUTPUTS``."""
    given = x
    x = _activations_in(x, layer._compute_dtype)
    norm = _traced_norm_of(given, layer._compute_dtype)
    key = layer._fused_key
    if key:
        out = _traced_member_output(layer, key, given, x, norm)
        if out is not None:
            return out
    buffers = layer._buffers
    if norm is not None:
        return fp4_rms_norm_linear_tensors(*norm, buffers["weight_packed"], buffers["weight_scales"],
                                           buffers.get("weight_tensor_scale"), layer.in_features,
                                           layer._parameters.get("bias"))
    return fp4_linear_tensors(x, buffers["weight_packed"], buffers["weight_scales"],
                              buffers.get("weight_tensor_scale"), layer.in_features,
                              layer._parameters.get("bias"))


def _traced_member_output(layer: FP4Linear, key: int, given: torch.Tensor,
                          x: torch.Tensor, norm: tuple | None) -> torch.Tensor | None:
    """Inside ``torch.compile``: group member ``layer``'s columns of its group's product for
    the tensor it was ``given``, the first member computing the product, or None where the
    member must run alone (the group does not fuse this input, or the first member did not
    run on the same tensor). ``norm``: ``given`` is that noted RMSNorm's output, which the
    group's product then makes itself. A product whose columns were not all taken when the first
    member runs again stops the group for good, as eagerly (:meth:`FusedFP4Projections.take`)."""
    index = layer._fused_index
    entry = TRACED_GROUP_OUTPUTS.get(key)
    if index == 0:
        if entry is not None:  # the last product's columns were not all taken: as eagerly,
            layer._fused.active = False  # the members do not share their input; they run alone
            del TRACED_GROUP_OUTPUTS[key]
            return None
        outputs = layer._fused.traced_product(x, norm)
        if outputs is None:
            return None
        entry = TRACED_GROUP_OUTPUTS[key] = [given, outputs, len(outputs)]
    elif entry is None or entry[0] is not given or entry[1][index] is None:
        return None
    out, entry[1][index] = entry[1][index], None
    entry[2] -= 1
    if not entry[2]:
        del TRACED_GROUP_OUTPUTS[key]
    return out


def freeze_fp4(model: nn.Module) -> int:
    """Freeze every `FP4Linear` of ``model`` for serving; returns how many this call froze.

    The model is put in eval mode: without master weights it can only serve.
    """
    layers = [m for m in model.modules() if isinstance(m, FP4Linear) and not m.frozen]
    for layer in layers:
        layer.freeze()
    model.eval()
    return len(layers)


def moved_uncast(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """``fn(tensor)`` (a ``Module._apply`` function) for a packed tensor: moved where ``fn``
    moves it, never cast (float8 scales are "floating point" to torch, ``.half()`` would
    cast them)."""
    moved = fn(tensor)
    return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that are one object under several names (tied weights, e.g.
    a head tied to the embedding)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Point every name of each tied group at one parameter again, the first not on the
    meta device (the one a loader filled), after loading gave the names parameters of their own."""
    for group in groups:
        param = next((p for p in map(model.get_parameter, group) if not p.is_meta),
                     model.get_parameter(group[0]))
        for name in group:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, param)


def _shared_weight_ids(model: nn.Module) -> set[int]:
    return {id(model.get_parameter(group[0])) for group in tied_groups(model)}


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a linear layer: ``nn.Linear`` (or a subclass), ``FP4Linear``,
    or GPT-2 ``Conv1D`` (``nx``, ``nf``)."""
    return (module.nx, module.nf) if is_conv1d(module) else (module.in_features, module.out_features)


def _plain_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` (exactly those classes: a
    subclass may compute something else); None for any other module."""
    return linear_features(module) if type(module) is nn.Linear or is_conv1d(module) else None


# Layers too small to be worth FP4 alone that join their siblings' product when those are
# FP4, whatever ``min_features`` says: there they add a few rows to one launch instead of
# costing a launch of their own. APT's autopoietic down projection (d -> ap_rank) reads
# attention's input, as q/k/v do.
FP4_RIDERS = {"ap_down": ("q_proj", "k_proj", "v_proj")}

# Child names of layers that read the same input, by model family, longest first: the
# riders with their siblings; Llama / Mistral / Qwen / APT's q_proj k_proj v_proj;
# gate_proj up_proj; APT's w_gate w_up; BERT's query key value; Mixtral-style experts' w1 w3.
# A group's members are multiplied as one product at decode
# (``apt_model.optimization.fused_projections``).
SIBLINGS = (
    *((*siblings, rider) for rider, siblings in FP4_RIDERS.items()),
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w_gate", "w_up"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


def fp4_candidates(model: nn.Module, skip: tuple[str, ...], min_features: int) -> list[tuple[str, nn.Module]]:
    """Linear layers (``nn.Linear``, GPT-2 ``Conv1D``) worth converting: not tied, not named
    in the skip list, not tiny (fewer than ``min_features`` in or out) unless an
    ``FP4_RIDERS`` layer whose siblings are converted, with the same input width."""
    shared = _shared_weight_ids(model)
    out, riders = [], []
    for name, module in model.named_modules():
        features = _plain_features(module)
        if features is None:
            continue
        if id(module.weight) in shared:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            continue
        if min(features) >= min_features:
            out.append((name, module))
        elif name.rpartition(".")[2] in FP4_RIDERS:
            riders.append((name, module))
    picked = {id(module) for _, module in out}
    for name, module in riders:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        siblings = [parent._modules.get(sibling) for sibling in FP4_RIDERS[child]]
        if all(id(s) in picked and _plain_features(s)[0] == _plain_features(module)[0]
               for s in siblings):
            out.append((name, module))
    return out


def convert_to_fp4(model: nn.Module, fmt: str, skip: tuple[str, ...], min_features: int) -> list[FP4Linear]:
    """Swap every candidate ``nn.Linear`` or ``Conv1D`` for an `FP4Linear` holding the same
    parameters."""
    converted = []
    for name, linear in fp4_candidates(model, skip, min_features):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = FP4Linear(linear, fmt)
        layer.train(linear.training)
        setattr(parent, child, layer)
        converted.append(layer)
    return converted
