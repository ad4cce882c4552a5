"""``vb.optimize`` on Hugging Face models built from a config (no download), and the
Hugging Face builders (``from_pretrained`` / ``from_config``) handing their models to VB."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apt_model.fp4.layer as fl
import apt_model.optimization.vb_global as vb
from apt_model.fp4.format import fake_quantize_fp4, quantize_fp4
from apt_model.fp4.layer import FP4Linear
from apt_model.fp4.packed_checkpoint import load_fp4_checkpoint, save_fp4_checkpoint
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


def train(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    """Losses of ``steps`` AdamW steps of language modelling on ``x``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("factory", [llama, gpt2], ids=["llama", "gpt2"])
def test_memory_mode_switches_attention_autocast_and_checkpointing(factory, sdpa_calls, native_bf16):
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
    losses = train(model, tokens(2), steps=8)
    assert losses[-1] < losses[0]
    assert vb.get_stats()["steps"] == 8  # optimize() tracks the model: its optimizer steps count


# ----------------------------------------------------------------------------- GPT-2 Conv1D in FP4


def gpt2_eval():
    """``gpt2()`` without dropout, in eval mode: FP4 layers still train where grad is enabled."""
    model = gpt2()
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.eval()


def conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is transformers.pytorch_utils.Conv1D]


def fake_quantized_copy(model: nn.Module, fmt: str) -> nn.Module:
    """``model`` (plain) with every Conv1D weight replaced by its FP4 round trip, quantized
    as ``[out, in]`` like every FP4 weight: what a speed-mode model computes with."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in conv1d_names(ref):
            w = ref.get_submodule(name).weight
            w.copy_(fake_quantize_fp4(w.t().contiguous(), fmt).t())
    return ref


def test_gpt2_speed_mode_converts_every_conv1d_and_keeps_its_state_dict():
    plain = gpt2()
    names = conv1d_names(plain)
    params = {n: (plain.get_submodule(n).weight, plain.get_submodule(n).bias) for n in names}
    state = {k: v.shape for k, v in plain.state_dict().items()}
    model = vb.optimize(plain, mode="speed", verbose=False)
    report = report_of(model)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert [n for n, m in model.named_modules() if isinstance(m, FP4Linear)] == names
    assert report.fp4_layers == 8 and report.linear_total == 9  # and the tied lm_head
    for name, (weight, bias) in params.items():
        layer = model.get_submodule(name)
        assert layer.weight_transposed and layer.weight is weight and layer.bias is bias
        assert (layer.in_features, layer.out_features) == tuple(weight.shape)
    assert {k: v.shape for k, v in model.state_dict().items()} == state
    fresh = gpt2()  # plain checkpoints load both ways
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(gpt2().state_dict())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_gpt2_fp4_logits_are_the_fake_quantized_model(fmt):
    plain = gpt2_eval()
    ref = fake_quantized_copy(plain, fmt)
    model = vb.optimize(plain, mode="speed", fp4_format=fmt, verbose=False)
    for name in conv1d_names(ref):
        layer = model.get_submodule(name)
        packed, want = layer.packed_weight(), quantize_fp4(layer.weight.t().contiguous(), fmt)
        assert packed.shape == (layer.out_features, layer.in_features)
        assert torch.equal(packed.packed, want.packed)  # the transposed view quantizes bit for bit
        assert torch.equal(packed.scales.view(torch.uint8), want.scales.view(torch.uint8))
    x = tokens(3)
    with torch.no_grad():
        got, want = model(input_ids=x).logits, ref(input_ids=x).logits
    # the same fp32 weights; only the matmul kernels differ (F.linear vs Conv1D's addmm)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_speed_mode_gradients_are_straight_through_and_it_learns():
    plain = gpt2_eval()
    ref = fake_quantized_copy(plain, "nvfp4")
    model = vb.optimize(plain, mode="speed", verbose=False)
    x = tokens(4)
    model(input_ids=x, labels=x).loss.backward()
    ref(input_ids=x, labels=x).loss.backward()
    for name in conv1d_names(ref):
        got, want = model.get_submodule(name).weight.grad, ref.get_submodule(name).weight.grad
        assert got.shape == want.shape  # [in, out], the Conv1D's own layout
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), name
    model.zero_grad()
    losses = train(model, x, steps=6)
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("fused", [False, True])
def test_conv1d_layer_is_the_linear_layer_of_its_transposed_weight(fused, monkeypatch):
    """Both training paths (the fused one through the CPU reference ops here) and inference
    give a Conv1D's FP4 layer exactly the outputs and gradients of an nn.Linear's holding
    the transposed weight, its gradient transposed back."""
    calls = []
    if fused:
        monkeypatch.setattr(fl, "FUSED_TRAIN_MIN_WEIGHTS", 0)
        monkeypatch.setattr(fl, "triton_available", lambda device: True)
        real = fl.fused_training_linear
        monkeypatch.setattr(fl, "fused_training_linear", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(96, 64)
    linear = nn.Linear(64, 96)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    a, b = FP4Linear(conv), FP4Linear(linear)
    x = torch.randn(4, 64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = a(xa), b(xb)
    assert torch.equal(out_a, out_b)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    assert len(calls) == (2 if fused else 0)  # one per layer
    assert torch.equal(xa.grad, xb.grad) and torch.equal(conv.bias.grad, linear.bias.grad)
    assert conv.weight.grad.shape == (64, 96) and torch.equal(conv.weight.grad, linear.weight.grad.t())
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_gpt2_freeze_keeps_logits_and_restore_gives_conv1d_back():
    plain = gpt2_eval()
    x = tokens(5)
    with torch.no_grad():
        plain_logits = plain(input_ids=x).logits
    params = {n: plain.get_submodule(n).weight for n in conv1d_names(plain)}
    model = vb.optimize(plain, mode="speed", verbose=False)
    with torch.no_grad():
        fp4_logits = model(input_ids=x).logits
    vb.restore(model)  # not frozen: the same Parameter objects, the plain model's logits
    for name, weight in params.items():
        conv = model.get_submodule(name)
        assert type(conv) is transformers.pytorch_utils.Conv1D and conv.weight is weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, plain_logits)
    vb.optimize(model, mode="speed", verbose=False)
    stats = vb.get_stats()
    assert vb.freeze_fp4(model) == 8
    assert all(m.frozen for m in model.modules() if isinstance(m, FP4Linear))
    assert vb.get_stats()["param_bytes_after"] == stats["param_bytes_after"]  # the packed bytes
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, fp4_logits)
        packed = {n: model.get_submodule(n).packed_weight() for n in params}
    vb.restore(model)  # frozen: Conv1D layers holding the dequantized weights, [in, out]
    for name, weight in packed.items():
        conv = model.get_submodule(name)
        assert type(conv) is transformers.pytorch_utils.Conv1D and conv.weight.is_contiguous()
        assert torch.equal(conv.weight, weight.dequantize(torch.float32).t())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, fp4_logits, rtol=1e-5, atol=1e-5)


def test_gpt2_packed_checkpoint_loads_into_a_plain_gpt2(tmp_path):
    model = vb.optimize(gpt2_eval(), mode="speed", verbose=False)
    x = tokens(6)
    with torch.no_grad():
        served = model(input_ids=x).logits
    path = save_fp4_checkpoint(model, tmp_path / "gpt2.safetensors")
    torch.manual_seed(1)
    target = transformers.GPT2LMHeadModel(model.config)  # another init: all from the file
    loaded = load_fp4_checkpoint(path, target)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, FP4Linear)}
    assert list(layers) == conv1d_names(gpt2())
    assert all(m.frozen and m.weight_transposed for m in layers.values())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, served)
    assert type(layers["transformer.h.0.attn.c_attn"].to_plain()) is transformers.pytorch_utils.Conv1D


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
