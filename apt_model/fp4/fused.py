"""One product for sibling FP4 layers that read the same input: :class:`FusedFP4Projections`.

At batch-1 decoding an attention block multiplies one row by q, k and v, and a gated MLP by
gate and up: small products whose launches (host) and ramp-up (device) cost more than their
weight reads. Concatenating the members' packed weights by rows turns them into one GEMV, and
up to ``SMALL_MAX_M`` rows (batched decoding) into one wider product. Above that (prefill) the
members run alone: their outputs would be views of the one product, and a KV cache keeping
one member's output (Hugging Face's first ``DynamicCache`` update stores the value states as
they come) would keep the whole product alive, q's columns included.

How it stays invisible to the model's code: the members stay ordinary :class:`FP4Linear`
modules, called by the model as before. The first member called with an input computes the
product for all of them and returns its slice (for several rows a view of the product's
columns: splitting its last dim or merging its leading dims works as ``view`` does on any
linear output); a member called with that same tensor afterwards gets its slice without a
launch. Anything else (more rows, another input, members not frozen) runs the member alone,
so results never depend on whether the members really share their input; a group that sees
its members called with different inputs stops fusing for good.

Storage: the group holds the concatenated packed codes, block scales, per-row tensor scales
(NVFP4: each member keeps its own) and biases as non-persistent buffers, and the members'
``weight_packed`` / ``weight_scales`` become views of them, so nothing is stored twice,
state_dict and checkpoints are unchanged, and writing into a member's buffers (as
``load_state_dict`` does) writes the group's. ``.to()`` moves the group's tensors once (the
first member reached moves the group) and points the members at the moved ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from apt_model.fp4.format import FP4Weight
from apt_model.fp4.kernel_plan import SMALL_MAX_M
from apt_model.fp4.layer import FP4Linear, moved_uncast, written
from apt_model.fp4.ops import fp4_linear, fp4_linear_tensors, fp4_rms_norm_linear_tensors

__all__ = ["FusedFP4Projections"]

_KEYS = itertools.count(1)  # group keys (a member's 0 means no group)


def _held(member: FP4Linear) -> tuple:
    """What a member's part of the group was built from: its packed codes and scales (by
    identity: they are views of the group's, so writes into them are the group's already),
    and its tensor scale and bias, which the group copies (by identity and version)."""
    buffers, params = member._buffers, member._parameters  # asked once a fused product
    bias = params["bias"] if "bias" in params else member.bias
    tensor_scale = buffers.get("weight_tensor_scale")
    return (id(buffers.get("weight_packed")), id(buffers.get("weight_scales")),
            None if tensor_scale is None else (id(tensor_scale), written(tensor_scale)),
            None if bias is None else (id(bias), written(bias)))


def _fuses(group: FusedFP4Projections, buffers: dict, x: Tensor) -> bool:
    """Whether ``group`` (its ``buffers``) multiplies ``x`` as one product: active, packed,
    and at most ``SMALL_MAX_M`` rows."""
    return group.active and buffers["packed"] is not None and x.numel() <= SMALL_MAX_M * x.shape[-1]


class _Pending:
    """The product of one input until every member has taken its columns (a plain object:
    setting a module's attributes costs several times more on every decode step)."""

    __slots__ = ("input", "outputs", "left")

    def __init__(self) -> None:
        self.input: Tensor | None = None
        self.outputs: list[Tensor | None] = []
        self.left = 0  # members yet to take theirs


class FusedFP4Projections(nn.Module):
    """The frozen members' packed weights as one, and their product for one input."""

    @staticmethod
    def fusable(members: Sequence[object]) -> bool:
        """Whether ``members`` can form a group: two or more FP4 layers in no group yet, with
        the same input width, format and bias presence."""
        if len(members) < 2 or not all(isinstance(m, FP4Linear) and m._fused is None for m in members):
            return False
        first = members[0]
        return all((m.in_features, m.fmt, m.bias is None) == (first.in_features, first.fmt, first.bias is None)
                   for m in members)

    def __init__(self, members: Sequence[FP4Linear]) -> None:
        super().__init__()
        if not self.fusable(members):
            raise ValueError(f"cannot fuse {list(members)!r}: two or more FP4 layers in no group, "
                             "with the same input width, format and bias presence, are needed")
        first = members[0]
        object.__setattr__(self, "members", tuple(members))  # not submodules
        self.in_features = first.in_features
        self.fmt = first.fmt
        self.sizes = [member.out_features for member in members]
        self.active = True  # False once the members were seen reading different inputs
        self.key = next(_KEYS)
        for name in ("packed", "scales", "tensor_scale", "bias"):
            self.register_buffer(name, None, persistent=False)
        self._weight: FP4Weight | None = None
        self._views: list[tuple] = []
        self._pending = _Pending()
        for index, member in enumerate(members):
            member.join_fused(self, index)
        self.pack()

    def pack(self) -> bool:
        """Concatenate the members' packed weights once all are frozen (again if a member's
        buffers were replaced since); True if the group is packed now."""
        if not all(member.frozen for member in self.members):
            self.packed = self.scales = self.tensor_scale = self.bias = None
            return False
        weights = [member.packed_weight() for member in self.members]
        self.packed = torch.cat([w.packed for w in weights])
        self.scales = torch.cat([w.scales for w in weights])
        if self.fmt == "nvfp4":
            self.tensor_scale = torch.cat([w.tensor_scale.reshape(1).float().expand(w.shape[0])
                                           for w in weights]).reshape(-1, 1)
        if self.members[0].bias is not None:
            self.bias = torch.cat([member.bias.detach() for member in self.members])
        self._link()
        return True

    def _link(self) -> None:
        """Point each member's packed buffers at its rows of the group's tensors."""
        start = 0
        self._views = []
        for member, size in zip(self.members, self.sizes, strict=True):
            rows = slice(start, start + size)
            member.hold_packed(self.packed[rows], self.scales[rows])
            self._views.append(_held(member))
            start += size
        self._weight = None

    def _linked(self) -> bool:
        """Whether every member still holds the group's views (not tensors put in their place)."""
        return all(_held(member) == held for member, held in zip(self.members, self._views, strict=True))

    def _fused_weight(self) -> FP4Weight:
        """The group's packed weight, built once per packing."""
        if self._weight is None:
            self._weight = FP4Weight(self.fmt, self.packed, self.scales, self.tensor_scale,
                                     (self.packed.shape[0], self.in_features))
        return self._weight

    def take(self, index: int, given: Tensor, x: Tensor) -> Tensor | None:
        """Eagerly: member ``index``'s output for the tensor it was ``given`` (``x``: that input
        in the compute dtype) from the fused product, or None when the member must run alone
        (not packed, more than ``SMALL_MAX_M`` rows, group inactive). Compiled graphs take
        :meth:`traced_product` instead (``FP4Linear`` picks)."""
        buffers = self._buffers  # (not self.packed: module attribute lookups cost per call)
        if not _fuses(self, buffers, x):
            return None
        pending = self._pending
        if pending.input is not given or pending.outputs[index] is None:
            if pending.left and pending.input is not given:
                # Outputs for another input were never taken: the members do not share it.
                self.active = False
                pending.input, pending.outputs, pending.left = None, [], 0
                return None
            if not self._linked() and not self.pack():
                return None  # a member's buffers were replaced (packed again) or unfrozen
            out = fp4_linear(x, self._fused_weight(), buffers["bias"])
            pending.input = given
            pending.outputs = list(out.split_with_sizes(self.sizes, dim=-1))
            pending.left = len(self.sizes)
        outputs = pending.outputs
        out = outputs[index]
        outputs[index] = None
        pending.left -= 1
        if not pending.left:
            pending.input, pending.outputs = None, []
        return out

    def traced_product(self, x: Tensor, norm: tuple | None = None) -> list[Tensor] | None:
        """Inside ``torch.compile``: the members' outputs for ``x`` (in the compute dtype), as
        columns of one product, or None where the members run alone (as :meth:`take`).
        ``norm`` (input, weight, eps): ``x`` is that RMSNorm's output, which the product
        makes itself from the input (:func:`~apt_model.fp4.ops.fp4_rms_norm_linear`)."""
        buffers = self._buffers
        if not _fuses(self, buffers, x):
            return None
        if norm is not None:
            out = fp4_rms_norm_linear_tensors(*norm, buffers["packed"], buffers["scales"],
                                              buffers["tensor_scale"], self.in_features,
                                              buffers["bias"])
        else:
            out = fp4_linear_tensors(x, buffers["packed"], buffers["scales"],
                                     buffers["tensor_scale"], self.in_features, buffers["bias"])
        return list(out.split_with_sizes(self.sizes, dim=-1))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FusedFP4Projections:
        """Move the group's packed tensors (never cast: float8 scales, fp32 tensor scales) and
        its bias (cast too, as the members' are), then point the members at them again. The
        first member ``.to()`` reaches calls this (``FP4Linear._apply``), so the rows are
        copied once; later calls find the tensors moved already."""
        for name, tensor in list(self._buffers.items()):
            if tensor is not None:
                self._buffers[name] = fn(tensor) if name == "bias" else moved_uncast(fn, tensor)
        if self.packed is not None:
            self._link()
        return self

    def holds_members(self) -> bool:
        """Whether the group is packed and its members still serve from its tensors."""
        return self.packed is not None and self._linked()

    def release(self) -> None:
        """Detach the members (they keep views of the group's tensors, alive through them)."""
        for member in self.members:
            member.join_fused(None, 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={self.sizes}, fmt={self.fmt}"
