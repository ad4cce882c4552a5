"""The APT model family (see ``apt_model.modeling.apt_model``)."""

from apt_model.modeling.apt_model import (
    PRESETS,
    APTAttention,
    APTBlock,
    APTConfig,
    APTLargeModel,
    APTModel,
    APTOutput,
    KVCache,
    LayerKVCache,
    RMSNorm,
    SwiGLU,
)

__all__ = [
    "PRESETS",
    "APTAttention",
    "APTBlock",
    "APTConfig",
    "APTLargeModel",
    "APTModel",
    "APTOutput",
    "KVCache",
    "LayerKVCache",
    "RMSNorm",
    "SwiGLU",
]
