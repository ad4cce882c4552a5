"""FP4 weights (NVFP4 / MXFP4): the whole feature, one module for each part.

=====================  ===================================================================
``format``             the formats in PyTorch: :class:`FP4Weight`, quantize / dequantize,
                       nibble packing, ``FP4_FORMATS`` (imports torch only)
``ops``                the custom ops ``apt_model::fp4_linear``, ``fp4_grad_input``,
                       ``fp4_quantize``, ``fp4_fake_quantize``: Triton kernels on CUDA, the
                       PyTorch reference elsewhere (Triton is imported on first CUDA use)
``kernel_plan``        which kernel runs for which shape: :func:`plan`, :class:`KernelPlan`
``triton_matmul``      the Triton GEMV / GEMM / dequantize / input-gradient kernels and
                       :func:`fp4_matmul`, their launcher (imports Triton)
``triton_quantize``    the Triton quantization kernels (imports Triton)
``layer``              :class:`FP4Linear`, :func:`convert_to_fp4`, :func:`freeze_fp4`
``packed_checkpoint``  packed FP4 safetensors checkpoints: save, load, read the metadata
``hf_loading``         Hugging Face safetensors checkpoints loaded straight into frozen FP4
                       layers, one tensor at a time (imports transformers when called)
=====================  ===================================================================

Importing this package imports none of them: each name below is imported from its module
when first used (``from apt_model.fp4 import FP4Linear`` imports ``layer`` and what it
needs), so ``import apt_model.fp4.format`` stays as light as that module. Only
``fp4_matmul`` imports Triton. Nothing here imports ``apt_model.optimization`` or
``apt_model.training``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apt_model.fp4.format import (
        FP4_FORMATS,
        FP4Weight,
        fake_quantize_fp4,
        fp4_nbytes,
        quantize_fp4,
        quantize_mxfp4,
        quantize_nvfp4,
    )
    from apt_model.fp4.hf_loading import checkpoint_shards, load_hf_checkpoint_fp4
    from apt_model.fp4.kernel_plan import KernelPlan, chosen_large_kernels, plan
    from apt_model.fp4.layer import FP4Linear, convert_to_fp4, fp4_candidates, freeze_fp4
    from apt_model.fp4.ops import (
        fp4_fake_quantize,
        fp4_grad_input,
        fp4_linear,
        fp4_linear_reference,
        fp4_quantize,
        triton_available,
    )
    from apt_model.fp4.packed_checkpoint import (
        load_fp4_checkpoint,
        read_fp4_metadata,
        save_fp4_checkpoint,
    )
    from apt_model.fp4.triton_matmul import fp4_matmul

# public name -> the module (of this package) defining it
_EXPORTS = {
    "FP4_FORMATS": "format",
    "FP4Weight": "format",
    "fake_quantize_fp4": "format",
    "fp4_nbytes": "format",
    "quantize_fp4": "format",
    "quantize_mxfp4": "format",
    "quantize_nvfp4": "format",
    "fp4_fake_quantize": "ops",
    "fp4_grad_input": "ops",
    "fp4_linear": "ops",
    "fp4_linear_reference": "ops",
    "fp4_quantize": "ops",
    "triton_available": "ops",
    "KernelPlan": "kernel_plan",
    "chosen_large_kernels": "kernel_plan",
    "plan": "kernel_plan",
    "fp4_matmul": "triton_matmul",
    "FP4Linear": "layer",
    "convert_to_fp4": "layer",
    "fp4_candidates": "layer",
    "freeze_fp4": "layer",
    "load_fp4_checkpoint": "packed_checkpoint",
    "read_fp4_metadata": "packed_checkpoint",
    "save_fp4_checkpoint": "packed_checkpoint",
    "checkpoint_shards": "hf_loading",
    "load_hf_checkpoint_fp4": "hf_loading",
}

__all__ = [
    "FP4Linear",
    "FP4Weight",
    "FP4_FORMATS",
    "KernelPlan",
    "checkpoint_shards",
    "chosen_large_kernels",
    "convert_to_fp4",
    "fake_quantize_fp4",
    "fp4_candidates",
    "fp4_fake_quantize",
    "fp4_grad_input",
    "fp4_linear",
    "fp4_linear_reference",
    "fp4_matmul",
    "fp4_nbytes",
    "fp4_quantize",
    "freeze_fp4",
    "load_fp4_checkpoint",
    "load_hf_checkpoint_fp4",
    "plan",
    "quantize_fp4",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "read_fp4_metadata",
    "save_fp4_checkpoint",
    "triton_available",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
