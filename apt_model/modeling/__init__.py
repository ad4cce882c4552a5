"""The APT model family (see ``apt_model.modeling.apt_model``)."""

from apt_model.modeling.apt_model import (
    PRESETS,
    APTAttention,
    APTBlock,
    APTConfig,
    APTLargeModel,
    APTModel,
    APTOutput,
    RMSNorm,
    SwiGLU,
)
from apt_model.modeling.kv_cache import KVCache, LayerKVCache, StaticKVCache

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
    "StaticKVCache",
    "SwiGLU",
]
