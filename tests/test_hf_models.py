"""``vb.optimize`` on Hugging Face models built from a config (no download), and the
Hugging Face builders (``from_pretrained`` / ``from_config``) handing their models to VB."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.fp4.layer import FP4Linear
from apt_model.optimization import config as vb_config
from apt_model.optimization import hf_patch, vb_autopatch
from apt_model.optimization.engine import report_of
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


# ----------------------------------------------------------------------------- builders


def tiny_config():
    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama saved while VB was off."""
    vb.disable()
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config())
    assert report_of(model) is None
    model.save_pretrained(folder)
    return str(folder)


# Each builds with eager attention, so that VB switching it to SDPA is visible.
BUILDERS = {
    "_from_config": lambda path: transformers.LlamaForCausalLM._from_config(
        tiny_config(), attn_implementation="eager"),
    "auto_from_config": lambda path: transformers.AutoModelForCausalLM.from_config(
        tiny_config(), attn_implementation="eager"),
    "from_pretrained": lambda path: transformers.LlamaForCausalLM.from_pretrained(
        path, attn_implementation="eager"),
    "auto_from_pretrained": lambda path: transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"),
}


@pytest.mark.parametrize("mode", ["balanced", "memory"])
@pytest.mark.parametrize("builder", list(BUILDERS))
def test_hf_builders_hand_their_model_to_vb(builder, mode, saved_llama):
    if mode == "balanced":
        vb.enable_balanced_mode(verbose=False)
    else:
        vb.enable(mode=mode, verbose=False)
    model = BUILDERS[builder](saved_llama)
    report = report_of(model)
    assert report is not None and report.mode == mode
    assert model.config._attn_implementation == "vb_sdpa" and report.attention_fused == 2
    assert wrapped_tags(model) == ["autocast"]
    blocks = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert report.checkpointed_blocks == (2 if mode == "memory" else 0)
    assert all(wrapped_tags(b) == (["checkpoint"] if mode == "memory" else []) for b in blocks)
    # only the outermost build is handed over (from_pretrained builds through inner builders)
    assert vb.get_stats()["models"] == 1
    x = torch.randint(0, 256, (1, 16))
    assert model(input_ids=x, labels=x).loss.isfinite()


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_hf_builders_stay_plain_when_vb_is_off_or_auto_patch_is_off(builder, saved_llama):
    vb.enable(mode="memory", verbose=False)
    vb.disable()
    plain = BUILDERS[builder](saved_llama)
    vb.enable(mode="memory", auto_patch=False, verbose=False)
    unpatched = BUILDERS[builder](saved_llama)
    for model in (plain, unpatched):
        assert report_of(model) is None
        assert model.config._attn_implementation == "eager"
        assert type(model) is transformers.LlamaForCausalLM and wrapped_tags(model) == []
    assert vb.get_stats()["models"] == 0


class Composite(transformers.LlamaPreTrainedModel):
    """An HF model whose constructor builds its sub-model through ``from_config``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.inner = transformers.AutoModel.from_config(config)
        self.post_init()


def test_models_built_inside_a_constructor_are_left_to_the_outer_model():
    vb.enable(mode="memory", verbose=False)
    direct = Composite(tiny_config())  # direct construction: not covered, and nothing half-done
    assert report_of(direct) is None and report_of(direct.inner) is None
    built = Composite._from_config(tiny_config())
    assert report_of(built) is not None and report_of(built.inner) is None

    class Head(nn.Module):  # a registered class loading its backbone in its constructor
        def __init__(self) -> None:
            super().__init__()
            self.backbone = transformers.AutoModel.from_config(tiny_config())
            self.head = nn.Linear(64, 2)

    vb.register_model_class(Head)
    try:
        head = Head()
    finally:
        vb_autopatch.unregister(Head)
    assert report_of(head) is not None and report_of(head.backbone) is None
    assert vb.get_stats()["models"] == 2  # built and head


def test_hf_patch_is_idempotent_and_can_be_undone():
    vb.enable(verbose=False)  # arms (here: applies) the patch
    base = transformers.PreTrainedModel
    patched = base.__dict__["from_pretrained"], base.__dict__["_from_config"]
    hf_patch.install()
    assert (base.__dict__["from_pretrained"], base.__dict__["_from_config"]) == patched
    try:
        hf_patch.uninstall()
        assert not hf_patch.installed()
        assert base.__dict__["_from_config"].__func__ is patched[1].__func__.__wrapped__
        assert report_of(transformers.LlamaForCausalLM._from_config(tiny_config())) is None
    finally:
        hf_patch.install()
    assert hf_patch.installed()
    assert report_of(transformers.LlamaForCausalLM._from_config(tiny_config())) is not None


def test_enable_does_not_import_transformers_and_hooks_its_later_import(tmp_path):
    code = textwrap.dedent("""
        import sys
        import apt_model.optimization.vb_global as vb
        vb.enable(verbose=False)
        print("transformers" in sys.modules)
        import transformers
        from apt_model.optimization import hf_patch
        from apt_model.optimization.engine import report_of
        cfg = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        print(report_of(model).mode, report_of(model).attention_fused)
        print(hf_patch.installed(), any(type(f).__module__ == hf_patch.__name__ for f in sys.meta_path))
    """)
    env = {k: v for k, v in os.environ.items() if k not in vb_config.ENV_VARS}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-4:] == ["False", "balanced 2", "True False", ""]
