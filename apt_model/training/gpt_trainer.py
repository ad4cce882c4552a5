"""Training for any GPT-style causal LM whose forward takes ``input_ids``/``labels`` and returns
an object with ``.loss`` (Hugging Face GPT-2/Llama built from a config, or APT).

The loop, schedule, checkpoints and resume are the playground trainer's; only model building
and sampling differ, since such models need not pass through VB's autopatch nor share APT's
``generate`` signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from apt_model.estimator import context_length
from apt_model.optimization import vb_global as vb
from apt_model.training.trainer import (
    SAMPLE_TEMPERATURE,
    SAMPLE_TOP_K,
    TrainConfig,
    Trainer,
)


class GPTTrainer(Trainer):
    """``Trainer`` for a model from ``model_factory`` (called after seeding, on every resume)."""

    def __init__(self, cfg: TrainConfig, model_factory: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, model_factory)

    def build_model(self) -> nn.Module:
        """The factory's model, optimized by VB when it is on (a no-op for autopatched APT)."""
        model = super().build_model()
        return vb.optimize(model) if vb.is_enabled() else model

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                 generator: torch.Generator) -> torch.Tensor:
        """Top-k sampling through the plain forward: works for any model returning ``.logits``."""
        was_training = model.training
        model.eval()
        limit = context_length(model)
        tokens = prompt
        for _ in range(max_new_tokens):
            window = tokens if limit is None else tokens[:, -limit:]
            logits = model(window).logits[:, -1].float() / SAMPLE_TEMPERATURE
            kth = torch.topk(logits, min(SAMPLE_TOP_K, logits.shape[-1]), dim=-1).values[:, -1:]
            probs = logits.masked_fill(logits < kth, float("-inf")).softmax(dim=-1)
            tokens = torch.cat((tokens, torch.multinomial(probs, 1, generator=generator)), dim=1)
        model.train(was_training)
        return tokens

