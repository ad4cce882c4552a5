"""The VGPU stack: virtual VRAM over the compute device, pinned host RAM and SSD swap files.

``attach(model, blocks, levels)`` places a model by a plan (:mod:`.placement`) and streams
its repeated blocks into Level 0 ahead of use (:mod:`.streaming`); ``detach`` gives the
plain model back; ``stack_of(model).stats()`` reports the levels' real counters.
"""

from apt_model.vgpu.streaming import VGPUStack, attach, detach, stack_of

__all__ = ["VGPUStack", "attach", "detach", "stack_of"]
