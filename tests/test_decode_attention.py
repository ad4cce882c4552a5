"""One-token attention over a key/value cache (``apt_model.ops.decode_attention``): the kernel
against the formula and SDPA (grouped heads, masks, a cache cut into slices), where it runs
and where it leaves the inputs to SDPA, inside compiled graphs, and in Hugging Face models."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_fp4_matmul import needs_interpreter, run_in_interpreter

from apt_model.ops.decode_attention import decode_attention, decode_attention_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sdpa(q, k, v, mask, scale):
    """SDPA with each key/value head repeated for its query heads, in [B, 1, H, D]."""
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                         v.repeat_interleave(groups, 1), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _masks(batch: int, heads: int, seq: int, device="cpu"):
    """None, a boolean mask shared by the batch, a boolean mask per sequence and head (one
    sequence's first half masked), an additive mask with the dtype's minimum, as Hugging
    Face builds them."""
    shared = torch.rand(1, 1, 1, seq, device=device) > 0.3
    shared[..., 0] = True
    per = torch.ones(batch, heads, 1, seq, dtype=torch.bool, device=device)
    per[0, :, :, : seq // 2] = False
    additive = torch.zeros(batch, 1, 1, seq, device=device)
    additive[..., seq // 3:] = torch.finfo(torch.float32).min
    return [None, shared, per, additive]


def test_reference_is_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 64), torch.randn(2, 2, 37, 64), torch.randn(2, 2, 37, 64)
    for mask in _masks(2, 8, 37):
        want = _sdpa(q, k, v, mask, 0.3)
        torch.testing.assert_close(decode_attention_reference(q, k, v, mask, 0.3), want)


def test_every_position_masked_gives_zeros():
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    assert torch.equal(decode_attention_reference(q, k, v, mask, 0.25), torch.zeros(1, 1, 2, 16))


def test_left_to_the_caller_off_cuda_and_for_other_shapes():
    """On the CPU, with several query positions, with gradients: None (the caller's SDPA)."""
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    assert decode_attention(q, k, v, None) is None
    assert decode_attention(torch.randn(1, 4, 3, 32), k, v, None) is None


def test_the_op_compiles_whole_graph():
    """The op inside ``torch.compile(fullgraph=True)`` (its fake kernel gives the shapes; on
    the CPU it runs the formula): no graph break, the formula's values."""
    torch._dynamo.reset()
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32)
    mask = torch.rand(1, 1, 1, 9) > 0.5
    op = torch.ops.apt_model.decode_attention
    compiled = torch.compile(lambda *a: op(*a) * 2.0, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask, 0.2),
                               decode_attention_reference(q, k, v, mask, 0.2) * 2.0)


@needs_interpreter
def test_kernels_in_the_interpreter():
    """The kernel on the CPU through Triton's interpreter, in fp32: grouped heads, each mask
    kind, a head width that is not a power of two, one slice and several (the merge), a
    sequence with every position masked, strided queries as Hugging Face hands them."""
    script = textwrap.dedent(inspect.getsource(_masks)) + textwrap.dedent("""
        import torch
        from apt_model.ops import triton_attention as ta
        from apt_model.ops.decode_attention import decode_attention_reference as ref
        torch.manual_seed(0)
        for batch, heads, kv_heads, seq, d in ((2, 4, 2, 150, 64), (1, 2, 1, 300, 80)):
            q = torch.randn(batch, 1, heads, d).transpose(1, 2)  # strided like HF's query
            k, v = torch.randn(batch, kv_heads, seq, d), torch.randn(batch, kv_heads, seq, d)
            for mask in _masks(batch, heads, seq):
                out = torch.empty(batch, heads, d)
                ta.decode_attention_into(q, k, v, mask, 0.125, out)
                want = ref(q, k, v, mask, 0.125).reshape(batch, heads, d)
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert ta._split(2, 5, None) == 4 and ta._split(32, 5, None) == 1
        q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 200, 16), torch.randn(1, 1, 200, 16)
        out = torch.full((1, 2, 16), float("nan"))
        ta.decode_attention_into(q, k, v, torch.zeros(1, 1, 1, 200, dtype=torch.bool), 0.25, out)
        assert torch.equal(out, torch.zeros(1, 2, 16))
        print("OK")
    """)
    run_in_interpreter(script)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_sdpa(dtype):
    """Against SDPA on the same 16-bit inputs, short and long caches (one slice and many),
    within what their different summation orders allow."""
    torch.manual_seed(0)
    for batch, heads, kv_heads, seq, d in ((1, 32, 8, 256, 128), (3, 8, 8, 4096, 64),
                                           (2, 12, 4, 77, 96)):
        q = torch.randn(batch, 1, heads, d, device="cuda", dtype=dtype).transpose(1, 2)
        k = torch.randn(batch, kv_heads, seq, d, device="cuda", dtype=dtype)
        v = torch.randn(batch, kv_heads, seq, d, device="cuda", dtype=dtype)
        for mask in _masks(batch, heads, seq, "cuda"):
            if mask is not None and mask.is_floating_point():
                mask = mask.to(dtype).clamp_min(torch.finfo(dtype).min)
            got = decode_attention(q, k, v, mask, 0.09)
            assert got is not None and got.shape == (batch, 1, heads, d)
            want = decode_attention_reference(q, k, v, mask, 0.09).float()
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2)
            if mask is None or mask.any(-1).all():  # SDPA gives NaN for fully masked rows
                torch.testing.assert_close(got.float(), _sdpa(q, k, v, mask, 0.09).float(),
                                           rtol=2e-2, atol=1e-2)


@cuda
def test_cuda_kernel_in_a_compiled_cuda_graph():
    """Inside ``torch.compile(fullgraph=True, mode="reduce-overhead")``: no graph break, the
    same values as eager, and a replay sees new cache contents."""
    torch._dynamo.reset()
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 512, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.arange(512, device="cuda").view(1, 1, 1, 512) < 300

    def step(q, k, v, mask):
        return decode_attention(q * 1.0, k, v, mask) + 0.0

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        got = compiled(q, k, v, mask)
        torch.testing.assert_close(got, step(q, k, v, mask), rtol=0, atol=0)
    k.copy_(torch.randn_like(k))
    got = compiled(q, k, v, mask).clone()
    torch.testing.assert_close(got, step(q, k, v, mask), rtol=0, atol=0)


@cuda
def test_cuda_hugging_face_decoding_attends_through_the_kernel(monkeypatch):
    """A speed-mode Hugging Face Llama (grouped heads) decodes through the kernel, and its
    greedy tokens and per-step logits match the same model attending through SDPA."""
    transformers = pytest.importorskip("transformers")
    import apt_model.optimization.vb_global as vb
    from apt_model.ops import triton_attention

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits far apart: no near ties for rounding to flip
    vb.optimize(model, mode="speed", fp4=False, verbose=False)
    prompt = torch.randint(0, 256, (1, 12), device="cuda")
    calls = []
    original = triton_attention.decode_attention_into
    monkeypatch.setattr(triton_attention, "decode_attention_into",
                        lambda *a: calls.append(1) or original(*a))

    def run():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=12, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)

    out = run()
    assert calls
    calls.clear()
    import apt_model.optimization.attention as attention

    monkeypatch.setattr(attention, "decode_attention", lambda *a: None)
    plain = run()
    assert not calls
    assert torch.equal(out.sequences, plain.sequences)
    for got, want in zip(out.logits, plain.logits, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=0.5)


@cuda
def test_cuda_apt_static_decoding_attends_through_the_kernel(monkeypatch):
    """APT's static-cache decode step (graphed and compiled) attends through the kernel and
    keeps the greedy tokens of the SDPA step; the step's logits agree to bf16 rounding."""
    from apt_model.modeling.apt_model import APTConfig, APTModel
    from apt_model.ops import triton_attention

    torch.manual_seed(0)
    model = APTModel(APTConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, d_ff=256,
                               max_seq_len=128, attn_implementation="sdpa"))
    model = model.to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits far apart: no near ties for rounding to flip
    prompt = torch.randint(0, 256, (2, 9), device="cuda")
    calls = []
    original = triton_attention.decode_attention_into
    monkeypatch.setattr(triton_attention, "decode_attention_into",
                        lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        got = model.generate(prompt, 20, do_sample=False, static_cache=True)
        assert calls
        graphed = model.generate(prompt, 20, do_sample=False, compile_step=True)
        import apt_model.modeling.apt_model as apt

        monkeypatch.setattr(apt, "decode_attention", lambda *a: None)
        model.clear_decode_cache()
        want = model.generate(prompt, 20, do_sample=False, static_cache=True)
    assert torch.equal(got, want)
    assert torch.equal(graphed, want)


def test_speed_mode_routes_sdpa_models_to_the_kernel_and_restore_undoes_it():
    """Speed mode moves a Hugging Face model on SDPA to "vb_sdpa" and marks its attention
    modules; ``decode_attention=False`` leaves it alone; ``vb.restore`` gives it back."""
    transformers = pytest.importorskip("transformers")
    import apt_model.optimization.vb_global as vb
    from apt_model.optimization.attention import DECODE_ATTR

    def llama():
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(config)

    def marked(model):
        return sum(getattr(m, DECODE_ATTR, False) for m in model.modules())

    model = llama()
    vb.optimize(model, mode="speed", fp4=False, verbose=False)
    assert model.config._attn_implementation == "vb_sdpa" and marked(model) == 2
    vb.restore(model)
    assert model.config._attn_implementation == "sdpa" and marked(model) == 0
    off = llama()
    vb.optimize(off, mode="speed", fp4=False, decode_attention=False, verbose=False)
    assert off.config._attn_implementation == "sdpa" and marked(off) == 0
