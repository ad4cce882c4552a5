"""Sibling FP4 projections that read one input are multiplied as one when decoding.

Which siblings: the names models give them (``SIBLINGS``: attention's q/k/v, a gated MLP's
gate/up), all FP4 layers of one parent module with the same input width, format and bias
presence. The mechanism, and why it never changes results when a guess is wrong, is
:mod:`apt_model.fp4.fused`; a group packs when its members are frozen (``vb.freeze_fp4``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from apt_model.fp4.fused import FusedFP4Projections

__all__ = ["SIBLINGS", "fuse_projections"]

# Child names of layers that read the same input, by model family (Llama / Mistral / Qwen /
# APT's q_proj k_proj v_proj; gate_proj up_proj; APT's w_gate w_up; BERT's query key value;
# Mixtral-style experts' w1 w3).
SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w_gate", "w_up"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


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
