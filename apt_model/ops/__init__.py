"""Memory-saving and FP4 operators (see each module for why)."""

from apt_model.ops.fp4_matmul import fp4_linear, fp4_linear_reference, triton_available
from apt_model.ops.linear_cross_entropy import default_chunk_tokens, linear_cross_entropy

__all__ = [
    "default_chunk_tokens",
    "fp4_linear",
    "fp4_linear_reference",
    "linear_cross_entropy",
    "triton_available",
]
