"""The VGPU stack: virtual VRAM over the compute device, pinned host RAM and SSD swap files.

``attach(model, blocks, levels)`` places a model by a plan (:mod:`.placement`) and streams
its repeated blocks into Level 0 ahead of use (:mod:`.streaming`); ``detach`` gives the
plain model back; ``stack_of(model).stats()`` reports the levels' real counters.
``offload_optimizer(model, adamw)`` keeps the fp32 masters and AdamW state of a model in
training in host RAM (or, past the host RAM levels, in SSD swap files) and steps them on the
host (:mod:`.offload`); with it, streamed blocks train
too, under activation checkpointing (fetched again in backward, in reverse order).
"""

from apt_model.vgpu.offload import OffloadedAdamW, offload_optimizer
from apt_model.vgpu.streaming import VGPUStack, attach, detach, stack_of

__all__ = ["OffloadedAdamW", "VGPUStack", "attach", "detach", "offload_optimizer", "stack_of"]
