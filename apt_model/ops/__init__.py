"""Memory-saving operators (see each module for why)."""

from apt_model.ops.linear_cross_entropy import default_chunk_tokens, linear_cross_entropy

__all__ = ["default_chunk_tokens", "linear_cross_entropy"]
