"""Low-bit weight storage formats."""

from apt_model.formats.fp4 import (
    E2M1_VALUES,
    FP4_FORMATS,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    FP4Weight,
    e2m1_decode,
    e2m1_encode,
    fake_quantize_fp4,
    fp4_nbytes,
    pack_nibbles,
    quantize_fp4,
    quantize_mxfp4,
    quantize_nvfp4,
    unpack_nibbles,
)

__all__ = [
    "E2M1_VALUES",
    "FP4_FORMATS",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "FP4Weight",
    "e2m1_decode",
    "e2m1_encode",
    "fake_quantize_fp4",
    "fp4_nbytes",
    "pack_nibbles",
    "quantize_fp4",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "unpack_nibbles",
]
