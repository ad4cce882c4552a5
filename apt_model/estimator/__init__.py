"""Know before you run: the peak memory of one training or decode step, measured by tracing
the step on fake tensors with VB's passes applied (``estimate``), and the tracker that
counts it (``MemoryTracker``, which runs on real tensors too: ``measure``)."""

from apt_model.estimator.estimate import (
    CUDA_RUNTIME_OVERHEAD,
    ESTIMATE_MODES,
    OPTIMIZERS,
    Estimate,
    Traced,
    context_length,
    decode_contexts,
    decode_sweep,
    decode_table,
    estimate,
    measure,
)
from apt_model.estimator.tracker import MemoryTracker

__all__ = ["CUDA_RUNTIME_OVERHEAD", "ESTIMATE_MODES", "OPTIMIZERS", "Estimate", "MemoryTracker", "Traced",
           "context_length", "decode_contexts", "decode_sweep", "decode_table", "estimate", "measure"]
