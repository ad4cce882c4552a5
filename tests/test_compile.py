"""Speed-mode models compile whole with ``torch.compile(fullgraph=True)``: no graph break at
the FP4 layers (their packed-weight cache is skipped inside compiled code), and the compiled
model gives the eager model's logits bit for bit. ``aot_eager`` traces exactly what inductor
would receive, without compiling C++ on the CPU."""

from __future__ import annotations

import pytest
import torch

import apt_model.optimization.vb_global as vb
from apt_model.modeling.apt_model import APTConfig, APTModel


def compiled_logits_match(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> None:
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, **kwargs).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, **kwargs).logits
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_speed_mode_apt_model_compiles_whole(frozen, fmt):
    torch.manual_seed(0)
    model = vb.optimize(APTModel(APTConfig.from_preset("tiny")), mode="speed", fp4_format=fmt,
                        verbose=False).eval()
    if frozen:
        vb.freeze_fp4(model)
    compiled_logits_match(model, torch.randint(0, 256, (1, 16)))


def test_speed_mode_hugging_face_model_compiles_whole():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config).eval()
    vb.optimize(model, mode="speed", fp4_min_features=32, verbose=False)
    assert vb.get_stats()["layers"]["fp4"] == 14
    vb.freeze_fp4(model)
    compiled_logits_match(model, torch.randint(0, 256, (1, 16)), use_cache=False)


@pytest.mark.parametrize("frozen", [False, True])
def test_speed_mode_gpt2_compiles_whole(frozen):
    """GPT-2's Conv1D projections in FP4 (their [in, out] weights used transposed)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    vb.optimize(model, mode="speed", verbose=False)
    assert vb.get_stats()["layers"]["fp4"] == 8
    if frozen:
        vb.freeze_fp4(model)
    compiled_logits_match(model, torch.randint(0, 256, (1, 16)), use_cache=False)
