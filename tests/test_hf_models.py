"""``vb.optimize`` on Hugging Face models built from a config (no download)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import apt_model.optimization.vb_global as vb
from apt_model.optimization.fp4_linear import FP4Linear
from apt_model.optimization.wrapping import wrapped_tags

transformers = pytest.importorskip("transformers")


def llama(attn: str = "eager"):
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(attn: str = "eager"):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=128,
                                  attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("factory", [llama, gpt2], ids=["llama", "gpt2"])
def test_memory_mode_switches_attention_autocast_and_checkpointing(factory, sdpa_calls):
    x = tokens()
    ref = factory()
    ref_loss = ref(input_ids=x, labels=x).loss
    model = vb.optimize(factory(), mode="memory", verbose=False)
    assert model.config._attn_implementation == "vb_sdpa"
    report = model._vb_report
    assert report.attention_fused == 2 and report.checkpointed_blocks == 2
    assert wrapped_tags(model) == ["autocast"]
    model.train()
    out = model(input_ids=x, labels=x)
    assert sdpa_calls and set(sdpa_calls) == {torch.bfloat16}
    assert out.logits.dtype == torch.float32
    assert abs(out.loss.item() - ref_loss.item()) / ref_loss.item() < 2e-2
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_llama_fp4_layers_and_state_dict(sdpa_calls):
    ref = llama()
    model = vb.optimize(llama(), mode="speed", verbose=False)
    fp4 = [n for n, m in model.named_modules() if isinstance(m, FP4Linear)]
    assert len(fp4) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head skipped by default
    assert "lm_head" not in fp4
    assert list(model.state_dict()) == list(ref.state_dict())
    x = tokens(1)
    with torch.no_grad():
        a = ref(input_ids=x).logits
        b = model(input_ids=x).logits
    # FP4 weights change the numbers, not the function: the same next tokens mostly
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_gpt2_training_step_with_full_mode():
    model = vb.optimize(gpt2(), mode="full", verbose=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = tokens(2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert vb.get_stats()["steps"] == 8  # optimize() tracks the model: its optimizer steps count
