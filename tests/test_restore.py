"""``vb.restore``: an optimized model becomes the plain one again, weights included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.fp4 import FP4Linear
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization.engine import report_of
from apt_model.optimization.wrapping import wrapped_tags

MODES = ("full", "speed", "memory", "balanced")


def plain_apt() -> APTModel:
    torch.manual_seed(0)
    return APTModel(APTConfig.from_preset("tiny", dropout=0.0))


def assert_plain_like(model: nn.Module, reference: nn.Module) -> None:
    """Same module classes, no wrapper, no report, and the same tensors as ``reference``."""
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert not any(wrapped_tags(m) for m in model.modules()) and report_of(model) is None
    assert not any(isinstance(m, FP4Linear) for m in model.modules())
    own, ref = model.state_dict(), reference.state_dict()
    assert own.keys() == ref.keys()
    for key in ref:
        assert torch.equal(own[key], ref[key]), key


@pytest.mark.parametrize("mode", MODES)
def test_apt_model_round_trip(mode):
    reference = plain_apt()
    model = copy.deepcopy(reference)
    params = {name: p for name, p in model.named_parameters()}
    vb.optimize(model, mode=mode, verbose=False)
    assert report_of(model) is not None
    assert vb.restore(model) is model
    assert_plain_like(model, reference)
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameters
    x = torch.randint(0, 256, (2, 24))
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    assert model.blocks[0].attn.attn_implementation == "eager" and model.loss_implementation == "logits"
    assert vb.get_stats()["models"] == 0
    other = "memory" if mode != "memory" else "speed"  # and it can be optimized again, in another mode
    vb.optimize(model, mode=other, verbose=False)
    assert report_of(model).mode == other


def test_trained_fp4_model_keeps_what_it_learned():
    model = plain_apt()
    vb.optimize(model, mode="full", verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (2, 17))
    for _ in range(2):
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    vb.restore(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), name
    stepped = {id(q) for group in optimizer.param_groups for q in group["params"]}
    assert all(id(p) in stepped for p in model.parameters())  # the optimizer still steps them


def test_frozen_fp4_layers_come_back_dequantized():
    model = plain_apt()
    vb.optimize(model, mode="speed", verbose=False)
    vb.freeze_fp4(model)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        served = model(x).logits
        packed = {name: m.packed_weight() for name, m in model.named_modules() if isinstance(m, FP4Linear)}
    vb.restore(model)
    for name, weight in packed.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and torch.equal(linear.weight, weight.dequantize(torch.float32))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, served, rtol=1e-5, atol=1e-5)


def test_hugging_face_model_round_trip():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    model = copy.deepcopy(reference)
    vb.optimize(model, mode="full", verbose=False)
    assert model.config._attn_implementation != "eager"
    vb.restore(model)
    assert model.config._attn_implementation == "eager"
    assert_plain_like(model, reference)
    x = torch.randint(0, 256, (1, 10))
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


def test_restore_of_a_plain_model_changes_nothing():
    model = plain_apt()
    reference = copy.deepcopy(model)
    assert vb.restore(model) is model
    assert_plain_like(model, reference)
