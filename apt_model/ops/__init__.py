"""Memory-saving and FP4 operators (see each module for why)."""

from apt_model.ops.fp4_matmul import (
    fp4_fake_quantize,
    fp4_grad_input,
    fp4_linear,
    fp4_linear_reference,
    fp4_quantize,
    triton_available,
)
from apt_model.ops.linear_cross_entropy import default_chunk_tokens, linear_cross_entropy

__all__ = [
    "default_chunk_tokens",
    "fp4_fake_quantize",
    "fp4_grad_input",
    "fp4_linear",
    "fp4_linear_reference",
    "fp4_quantize",
    "linear_cross_entropy",
    "triton_available",
]
