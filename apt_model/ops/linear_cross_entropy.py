"""Fused, chunked linear + cross-entropy: the LM-head loss without the full logits.

Why: for a large vocabulary the LM head dominates training memory. With batch 8 x seq 1024,
vocab 50304 under bf16 autocast, the plain path keeps bf16 logits (0.8 GB), their fp32 upcast
(1.65 GB) and the log-softmax saved for backward (1.65 GB), and backward adds gradients of the
same size. Here the tokens are processed in chunks: per chunk the logits, the loss and, already
in the forward, the gradients w.r.t. the chunk's hidden states and the weight are computed, and
the chunk's logits are freed. Nothing of size tokens x vocab outlives a chunk; backward only
scales the stored gradients by ``grad_output`` (the loss is a scalar). This is the technique
Liger Kernel calls FusedLinearCrossEntropy, written here in plain PyTorch.

Cost: the gradients are computed whenever a gradient may be wanted (grad mode on and an input
requiring grad), even if ``backward`` is never called; evaluate under ``torch.no_grad()`` (or
``inference_mode``) to skip that work. ``model.eval()`` alone does not skip it, since training
with dropout off still needs the gradients.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

# A chunk's fp32 logits hold at most this many elements: 64 Mi floats = 256 MiB.
_CHUNK_ELEMENTS = 64 * 2**20
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's fp32 logits stay within ~256 MiB.

    ``max(1, 2**26 // vocab)``, rounded down to a multiple of 8 (matmul-friendly row counts)
    when that is at least 8: 1328 tokens for a vocabulary of 50304, 262144 for 256.
    """
    chunk = max(1, _CHUNK_ELEMENTS // vocab_size)
    return chunk - chunk % 8 if chunk >= 8 else chunk


def _loss_and_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                    ignore_index: int, chunk: int, compute_dtype: torch.dtype,
                    need_hidden: bool, need_weight: bool, need_bias: bool
                    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Mean loss over non-ignored targets and the requested gradients, chunk by chunk.

    ``hidden`` is (N, d), ``targets`` (N,). Matmuls run in ``compute_dtype``; the softmax math
    and the weight/bias gradient accumulation in fp32 (fp64 for fp64 inputs). Autocast is
    switched off inside so every dtype here is the one written.
    """
    device_type = hidden.device.type
    no_autocast = (torch.autocast(device_type, enabled=False)
                   if torch.is_autocast_enabled(device_type) else contextlib.nullcontext())
    with no_autocast:
        n_tokens, d = hidden.shape
        vocab = weight.shape[0]
        math_dtype = torch.promote_types(compute_dtype, torch.float32)
        w = weight.to(compute_dtype)  # cast once, not per chunk
        b = None if bias is None else bias.to(compute_dtype)

        valid_all = targets != ignore_index
        # A tensor, not .item(): no host-device sync. With nothing valid the sum is 0 and so
        # is the loss (F.cross_entropy would give NaN).
        scale = 1.0 / valid_all.sum().clamp(min=1).to(math_dtype)
        total = torch.zeros((), dtype=math_dtype, device=hidden.device)

        need_grad = need_hidden or need_weight or need_bias
        grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                       if need_hidden else None)
        grad_weight = (torch.zeros(vocab, d, dtype=math_dtype, device=weight.device)
                       if need_weight else None)
        grad_bias = (torch.zeros(vocab, dtype=math_dtype, device=weight.device)
                     if need_bias else None)

        for start in range(0, n_tokens, chunk):
            end = min(start + chunk, n_tokens)
            h = hidden[start:end].to(compute_dtype)
            valid = valid_all[start:end]
            target = targets[start:end].masked_fill(~valid, 0)[:, None]  # any legal index

            # One (chunk, vocab) buffer, reused in place: logits -> exp -> softmax -> gradient.
            logits = F.linear(h, w, b).to(math_dtype)
            target_logit = logits.gather(1, target).squeeze(1)
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            sum_exp = exp.sum(dim=1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)
            total += torch.where(valid, lse - target_logit, 0.0).sum()
            if not need_grad:
                continue

            # d loss / d logits = (softmax - onehot(target)) / n_valid on valid rows, 0 elsewhere.
            weight_per_row = valid.to(math_dtype) * scale
            grad_logits = exp.div_(sum_exp)
            grad_logits.scatter_add_(1, target, -valid.to(math_dtype)[:, None])
            grad_logits.mul_(weight_per_row[:, None])
            g = grad_logits.to(compute_dtype)

            if grad_hidden is not None:
                rows = grad_hidden[start:end]
                if rows.dtype == compute_dtype:
                    torch.mm(g, w, out=rows)
                else:
                    rows.copy_(g @ w)
            if grad_weight is not None:
                if compute_dtype == math_dtype:
                    grad_weight.addmm_(g.t(), h)
                else:  # low-precision product, fp32 accumulation across chunks
                    grad_weight += g.t() @ h
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)

        loss = total * scale
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None and bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return loss, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients computed in forward; backward scales them by the scalar ``grad_output``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                ignore_index: int, chunk: int, compute_dtype: torch.dtype) -> Tensor:
        loss, grad_hidden, grad_weight, grad_bias = _loss_and_grads(
            hidden, weight, bias, targets, ignore_index, chunk, compute_dtype,
            need_hidden=hidden.requires_grad, need_weight=weight.requires_grad,
            need_bias=bias is not None and bias.requires_grad)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        # A 0-dim grad_output does not promote: each gradient keeps its dtype.
        grad_hidden, grad_weight, grad_bias = (None if g is None else g * grad_output
                                               for g in ctx.saved_tensors)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, chunk_tokens: int | None = None) -> Tensor:
    """``F.cross_entropy((hidden @ weight.T + bias).float(), targets, ignore_index=...)`` without
    materializing the logits.

    ``hidden`` is (..., d), ``weight`` (vocab, d), ``targets`` hidden's leading shape; the mean
    runs over targets that are not ``ignore_index``; the loss is fp32 (fp64 for fp64 inputs,
    which are not rounded to fp32 as ``.float()`` would). If every target is ignored the loss is 0
    and so are the gradients, not NaN as in ``F.cross_entropy``: a batch of pure padding then
    adds nothing to training instead of poisoning it.

    Under autocast for hidden's device type the matmuls run in the autocast dtype, as
    ``F.linear`` would, while softmax and loss stay fp32; the weight gradient is accumulated in
    fp32 and returned in the weight's dtype, the hidden gradient in hidden's dtype. Extra memory
    is one chunk of ``chunk_tokens`` x vocab logits (default: ``default_chunk_tokens``) plus
    gradient buffers the size of ``hidden`` and ``weight``. Tied weights work: autograd adds
    this gradient to the embedding's.
    """
    if weight.dim() != 2 or hidden.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"hidden (..., d) and weight (vocab, d) do not match: "
                         f"{tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0])
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")

    device_type = hidden.device.type
    floats = [hidden.dtype, weight.dtype] + ([] if bias is None else [bias.dtype])
    if torch.is_autocast_enabled(device_type) and all(t in _AUTOCAST_ELIGIBLE for t in floats):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
        for t in floats[1:]:
            compute_dtype = torch.promote_types(compute_dtype, t)

    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    targets_1d = targets.reshape(-1)
    inputs = [hidden, weight] + ([] if bias is None else [bias])
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return _loss_and_grads(hidden_2d, weight, bias, targets_1d, ignore_index, chunk_tokens,
                               compute_dtype, False, False, False)[0]
    return _LinearCrossEntropy.apply(hidden_2d, weight, bias, targets_1d, ignore_index,
                                     chunk_tokens, compute_dtype)
