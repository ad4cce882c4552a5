"""A decoder layer's small steps, one kernel launch each when decoding eagerly on CUDA.

Why: at batch-1 decoding a Hugging Face Llama layer spends most of its host time on about
forty small PyTorch calls around its matmuls (RMSNorm alone is eight, the rotary embedding
of q and k sixteen), each a kernel launch; on a slow host they, not the weight reads,
bound the step. These functions compute the same formulas:

* :func:`rms_norm`: ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``;
* :func:`rotary`: ``q * cos + rotate_half(q) * sin`` and the same for ``k``;
* :func:`silu_mul`: ``silu(gate) * up``;

as one Triton launch (:mod:`apt_model.ops.triton_decoder`) where that applies: plain CUDA
tensors, eagerly (inside ``torch.compile`` the formula is traced, and Inductor fuses it), with
nothing to differentiate, Triton installed. Everywhere else they run the formula in
PyTorch. The rotary embedding and SiLU-mul are bit for bit the formula; RMSNorm may differ
in the last bit of a few values (its fp32 sum of squares is added in another order).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from apt_model.ops.triton_launch import HALF_DTYPES, triton_runs_on

__all__ = ["fused_here", "fused_rms_norm", "fused_rotary", "fused_silu_mul", "rms_norm", "rotary",
           "rotate_half", "silu_mul"]

_PLAIN = (Tensor, torch.nn.Parameter)  # not subclasses such as fake tensors


def _kernels() -> ModuleType:
    """The Triton kernels (imported on first use, where :func:`triton_runs_on` holds)."""
    import apt_model.ops.triton_decoder as triton_decoder

    return triton_decoder


def fused_here(*tensors: Tensor) -> bool:
    """Whether the Triton kernels take ``tensors``: plain CUDA tensors (no subclass such as a
    fake tensor), outside ``torch.compile``, none needing a gradient, on a GPU of compute
    capability 8.0+ with Triton installed."""
    first = tensors[0]
    if torch.compiler.is_compiling() or type(first) not in _PLAIN or not first.is_cuda:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(type(t) in _PLAIN and t.device == first.device for t in tensors) and \
        triton_runs_on(first.device.index)


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """:func:`rms_norm` by the kernel, or None where the kernel does not take these inputs."""
    if not (fused_here(x, weight) and x.is_contiguous() and weight.is_contiguous()
            and weight.shape == x.shape[-1:] and x.numel()):
        return None
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _kernels().rms_norm_rows(x.view(-1, x.shape[-1]), weight, eps, out.view(-1, x.shape[-1]))
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face Llama's RMSNorm of ``x`` [..., N] with ``weight`` [N]: in fp32, rounded to
    ``x``'s dtype, then times ``weight`` (output in their promoted dtype)."""
    fused = fused_rms_norm(x, weight, eps)
    if fused is not None:
        return fused
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """The last dim's halves swapped, the new first half negated."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``(q * cos + rotate_half(q) * sin, the same for k)`` for ``q`` [B, Hq, S, D], ``k``
    [B, Hk, S, D] and ``cos``, ``sin`` [B or 1, S, D] (broadcast over the heads)."""
    fused = fused_rotary(q, k, cos, sin)
    if fused is not None:
        return fused
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def fused_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`rotary` by the kernel, or None where the kernel does not take these inputs."""
    if not _rotary_fusable(q, k, cos, sin):
        return None
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _kernels().rotary_qk(q, k, cos, sin, q_out, k_out)
    return q_out, k_out


def _rotary_fusable(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if not fused_here(q, k, cos, sin):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, seq, d = q.shape
    if k.shape[0] != batch or k.shape[2:] != (seq, d) or cos.shape[1:] != (seq, d) \
            or cos.shape[0] not in (1, batch) or d % 2 or not q.numel() or not k.numel():
        return False
    if not all(t.dtype == q.dtype for t in (k, cos, sin)) or q.dtype not in HALF_DTYPES:
        return False
    return all(t.stride(-1) == 1 for t in (q, k, cos, sin)) and cos.stride() == sin.stride()


def fused_silu_mul(gate: Tensor, up: Tensor) -> Tensor | None:
    """:func:`silu_mul` by the kernel, or None where the kernel does not take these inputs."""
    if not (fused_here(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype
            and gate.dtype in HALF_DTYPES and gate.numel()):
        return None
    n = gate.shape[-1]
    try:  # rows of one stride each (e.g. the halves of one gate/up product)
        g, u = gate.view(-1, n), up.view(-1, n)
    except RuntimeError:
        return None
    if g.stride(-1) != 1 or u.stride(-1) != 1:
        return None
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _kernels().silu_mul_rows(g, u, out.view(-1, n))
    return out


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, each step rounded to the inputs' dtype."""
    fused = fused_silu_mul(gate, up)
    return fused if fused is not None else F.silu(gate) * up
