"""Memory-saving operators (see each module for why). The FP4 ops live in :mod:`apt_model.fp4`."""

from apt_model.ops.linear_cross_entropy import default_chunk_tokens, linear_cross_entropy

__all__ = ["default_chunk_tokens", "linear_cross_entropy"]
