"""The decoder layers' one-launch kernels (``apt_model.ops.decoder``) and the pass that gives
them to a model (``apt_model.optimization.fused_decoder``): which modules it takes (by what
they compute), that it changes no result, that it undoes, and, on CUDA, that the kernels run
and match the formulas (rotary and SiLU-mul bit for bit)."""

from __future__ import annotations

import copy
import io
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_fp4_matmul import needs_interpreter, run_in_interpreter
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.ops import decoder
from apt_model.optimization.engine import report_of
from apt_model.optimization.fused_decoder import fuse_decoder_ops

transformers = pytest.importorskip("transformers")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config).eval()


class GemmaStyleNorm(nn.Module):
    """``x * (1 + w)``: an RMSNorm with another formula, which must be left alone."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GeluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rotary_users() -> int:
    """How many live optimized models use Llama's wrapped rotary function (0: not wrapped)."""
    import apt_model.optimization.fused_decoder as fused_decoder

    entry = fused_decoder._ROTARY.get(id(modeling_llama.__dict__))
    return 0 if entry is None else entry[2]


def test_llama_norms_mlps_and_rotary_are_found_and_restore_undoes_them():
    users = rotary_users()
    model = tiny_llama()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = model(x).logits
    vb.optimize(model, mode="speed", fp4_min_features=32, verbose=False)
    # 2 layers x 2 norms + the final norm, 2 MLPs, 2 attentions, the rotary function
    assert report_of(model).fused_decoder_ops == 5 + 2 + 2 + 1
    assert type(model.model.norm).__module__ == "apt_model.optimization.fused_decoder"
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"  # what name-matching code finds
    assert isinstance(model.model.norm, modeling_llama.LlamaRMSNorm)
    assert isinstance(model.model.layers[0].mlp, modeling_llama.LlamaMLP)
    assert modeling_llama.apply_rotary_pos_emb._vb_original is not None
    assert rotary_users() == users + 1
    vb.restore(model)
    assert type(model.model.norm) is modeling_llama.LlamaRMSNorm
    assert type(model.model.layers[1].mlp) is modeling_llama.LlamaMLP
    assert rotary_users() == users
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_the_rotary_function_is_wrapped_while_an_optimized_model_lives():
    import gc

    gc.collect()
    users = rotary_users()
    first, second = tiny_llama(), tiny_llama()
    for model in (first, second):
        vb.optimize(model, mode="speed", fp4_min_features=32, verbose=False)
    vb.restore(first)
    assert rotary_users() == users + 1
    vb.restore(second)
    vb.restore(second)  # twice changes nothing
    assert rotary_users() == users
    third = tiny_llama()
    vb.optimize(third, mode="speed", fp4_min_features=32, verbose=False)
    assert rotary_users() == users + 1
    del third
    gc.collect()
    assert rotary_users() == users  # dropped without restore
    if users == 0:
        assert not hasattr(modeling_llama.apply_rotary_pos_emb, "_vb_original")


def test_only_optimized_models_attention_asks_for_the_rotary_kernel(monkeypatch):
    """The wrapped rotary function is shared by every Llama of the process; a plain model's
    attention never asks for the kernel."""
    import apt_model.optimization.fused_decoder as fused_decoder

    asked = []
    monkeypatch.setattr(fused_decoder, "fused_rotary", lambda *a: asked.append(1))
    optimized, plain = tiny_llama(), tiny_llama()
    _, undo = fuse_decoder_ops(optimized)
    x = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        plain(x)
        assert not asked
        optimized(x)
        assert len(asked) == 2  # one per layer
    undo()


def test_other_formulas_are_left_alone():
    model = nn.Sequential(GemmaStyleNorm(24), GeluMLP(), nn.LayerNorm(24))
    count, undo = fuse_decoder_ops(model)
    assert count == 0
    assert [type(m) for m in model] == [GemmaStyleNorm, GeluMLP, nn.LayerNorm]
    undo()


def test_off_cuda_the_fused_model_is_the_original_bit_for_bit():
    """On the CPU (and in training, or compiled) the fused classes call the original forward."""
    model = tiny_llama()
    reference = copy.deepcopy(model)
    count, undo = fuse_decoder_ops(model)
    assert count == 10
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    assert torch.equal(model(x).logits, reference(x).logits)  # with autograd
    undo()


def test_a_fused_model_pickles():
    model = tiny_llama()
    fuse_decoder_ops(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.model.norm) is type(model.model.norm)


def test_reference_formulas_are_hugging_face_llama():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16).bfloat16(), torch.randn(2, 2, 5, 16).bfloat16()
    cos, sin = torch.randn(2, 5, 16).bfloat16(), torch.randn(2, 5, 16).bfloat16()
    for got, want in zip(decoder.rotary(q, k, cos, sin),
                         modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)
    norm = modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 16).bfloat16()
    assert torch.equal(decoder.rms_norm(x, norm.weight, 1e-5), norm(x))
    g, u = torch.randn(3, 16).bfloat16(), torch.randn(3, 16).bfloat16()
    assert torch.equal(decoder.silu_mul(g, u), F.silu(g) * u)


@needs_interpreter
def test_kernels_in_the_interpreter():
    """Each kernel once on the CPU through Triton's interpreter, in fp32 (the interpreter's
    own bf16 cast is not the hardware's; the CUDA tests check bf16): strided q and k, a
    broadcast cos, gate and up as the halves of one product."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from apt_model.ops import decoder, triton_decoder as td
        torch.manual_seed(0)
        x, w = torch.randn(5, 48) * 3, torch.randn(48)
        out = torch.empty(5, 48)
        td.rms_norm_rows(x, w, 1e-6, out)
        torch.testing.assert_close(out, decoder.rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)
        q = torch.randn(2, 3, 4, 16).transpose(1, 2)
        k = torch.randn(2, 3, 2, 16).transpose(1, 2)
        cos, sin = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        td.rotary_qk(q, k, cos, sin, qo, ko)
        rq, rk = decoder.rotary(q, k, cos, sin)
        assert torch.equal(qo, rq) and torch.equal(ko, rk)
        full = torch.randn(6, 160)
        o = torch.empty(6, 80)
        td.silu_mul_rows(full[:, :80], full[:, 80:], o)
        torch.testing.assert_close(o, F.silu(full[:, :80]) * full[:, 80:], rtol=1e-6, atol=1e-6)
        print("OK")
    """)
    run_in_interpreter(script)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_match_the_formulas(dtype):
    torch.manual_seed(0)
    dev = "cuda"
    x, w = (torch.randn(7, 4096, device=dev) * 3).to(dtype), torch.randn(4096, device=dev).to(dtype)
    assert decoder.fused_rms_norm(x, w, 1e-5) is not None
    hidden = x.float()
    want = w * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    got = decoder.fused_rms_norm(x, w, 1e-5)
    # the sum of squares in another order: at most one unit in the last place
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((got.float() - want.float()).abs() <= 2 * ulp).all()
    q = torch.randn(1, 1, 32, 128, device=dev).to(dtype).transpose(1, 2)
    k = torch.randn(1, 1, 8, 128, device=dev).to(dtype).transpose(1, 2)
    cos, sin = torch.randn(1, 1, 128, device=dev).to(dtype), torch.randn(1, 1, 128, device=dev).to(dtype)
    fused = decoder.fused_rotary(q, k, cos, sin)
    assert fused is not None
    for got, want in zip(fused, modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)
    both = torch.randn(3, 2 * 14336, device=dev).to(dtype)
    g, u = both[:, :14336], both[:, 14336:]
    assert torch.equal(decoder.fused_silu_mul(g, u), F.silu(g) * u)


@cuda
def test_cuda_speed_mode_generate_takes_the_kernels_and_keeps_the_tokens(monkeypatch):
    """Greedy tokens with the kernels equal those with the original forwards (the same FP4
    model, ``fused_here`` answering no), and the logits agree to bf16 rounding."""
    import apt_model.optimization.fused_decoder as fused_decoder

    model = tiny_llama().to("cuda", torch.bfloat16)
    prompt = torch.randint(0, 256, (1, 8), device="cuda")
    vb.optimize(model, mode="speed", fp4_min_features=32, verbose=False)
    vb.freeze_fp4(model)
    calls = []
    kernels = decoder._kernels()
    for name in ("rms_norm_rows", "rotary_qk", "silu_mul_rows"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return (model.generate(prompt, max_new_tokens=8, do_sample=False),
                    model(prompt).logits.float())

    tokens, logits = run()
    assert {"rms_norm_rows", "rotary_qk", "silu_mul_rows"} <= set(calls)
    calls.clear()
    for module in (decoder, fused_decoder):
        monkeypatch.setattr(module, "fused_here", lambda *tensors: False)
    plain_tokens, plain_logits = run()
    assert not calls
    assert torch.equal(tokens, plain_tokens)
    torch.testing.assert_close(logits, plain_logits, rtol=2e-2, atol=2e-2)
