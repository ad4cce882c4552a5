"""Sibling FP4 projections that read one input are multiplied as one when decoding.

Which siblings: the names models give them (``SIBLINGS``: attention's q/k/v, with APT's
``ap_down`` where there is one; a gated MLP's gate/up), all FP4 layers of one parent module
with the same input width, format and bias presence. The mechanism, and why it never
changes results when a guess is wrong, is :mod:`apt_model.fp4.fused`; a group packs when its
members are frozen (``vb.freeze_fp4``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from apt_model.fp4.fused import FusedFP4Projections
from apt_model.fp4.layer import SIBLINGS

__all__ = ["SIBLINGS", "fuse_projections"]


def fuse_projections(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Group ``model``'s sibling FP4 projections; returns (groups made, the undo).

    Each group is registered on the siblings' parent as ``vb_fused_<names>`` (no state_dict
    keys: its buffers are non-persistent); the undo removes the groups again.
    """
    made: list[tuple[nn.Module, str, FusedFP4Projections]] = []
    for parent in list(model.modules()):
        for names in SIBLINGS:
            members = [parent._modules.get(name) for name in names]
            if FusedFP4Projections.fusable(members):
                name = "vb_fused_" + "_".join(names)
                group = FusedFP4Projections(members)
                parent.add_module(name, group)
                made.append((parent, name, group))

    def undo() -> None:
        for parent, name, group in made:
            group.release()
            delattr(parent, name)

    return len(made), undo
