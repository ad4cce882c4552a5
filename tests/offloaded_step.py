"""For the estimator's VGPU tests: the device-side peak of a real CPU training step with the
offloaded optimizer (and a VGPU stack, if any), by the estimator's own memory tracker."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from apt_model.estimator import MemoryTracker
from apt_model.vgpu.offload import OffloadedAdamW
from apt_model.vgpu.streaming import VGPUStack


def device_peak(model: nn.Module, optimizer: OffloadedAdamW, step: Callable[[], None],
                inputs: list[torch.Tensor], stack: VGPUStack | None = None) -> int:
    """Peak bytes of ``step()`` (run once before, to create the optimizer state) that a device
    would hold: the tracker counts the model, ``inputs``, the optimizer state and the stack's
    slots and homes from the start, then the host's part (the stack's homes, the optimizer's
    arena and swap files, its step counters) is taken off. The host steps run in a worker thread, which the
    tracker does not see."""
    step()
    state = list(optimizer.state.values())  # moments: views of the host arena's one buffer or of swap files; step counters
    homes = {} if stack is None else {
        h.untyped_storage()._cdata: h for h in (b.home_flat for b in stack.blocks) if h is not None}
    slots = [] if stack is None else [slot.buffer for slot in stack.slots]
    with MemoryTracker() as tracker:
        tracker.add([*model.parameters(), *model.buffers(), *inputs, *(t for s in state for t in s.values()),
                     *slots, *homes.values()])
        tracker.reset_peak()
        step()
    at_home = sum(h.untyped_storage().nbytes() for h in homes.values())
    stats = optimizer.stats()
    return tracker.peak - at_home - stats["host_bytes"] - stats["disk_bytes"] - 4 * len(state)
