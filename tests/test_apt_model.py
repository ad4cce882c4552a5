"""Tests of the APT model: presets, attention paths, cache, generation, loss, ties, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import apt_model.modeling.apt_model as apt_module
from apt_model.errors import VBConfigError
from apt_model.modeling import (
    PRESETS,
    APTAttention,
    APTBlock,
    APTConfig,
    APTLargeModel,
    APTModel,
    KVCache,
    decoding,
)
from apt_model.modeling.kv_cache import StaticKVCache, StaticLayerKVCache

IMPLS = ["eager", "sdpa"]


def tiny(seed: int = 0, randomize_gates: bool = True, **overrides) -> APTModel:
    """A tiny fp32 model; gates made non-zero so the autopoietic term is exercised too."""
    torch.manual_seed(seed)
    model = APTModel(APTConfig.from_preset("tiny", **overrides))
    if randomize_gates:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.ap_gate.normal_(0.0, 0.5)
    return model


def ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


class SDPASpy:
    """Records every call to F.scaled_dot_product_attention, then runs the real one."""

    def __init__(self) -> None:
        self.real = F.scaled_dot_product_attention
        self.calls: list[dict] = []

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        self.calls.append(dict(q=q, k=k, attn_mask=attn_mask, is_causal=is_causal))
        return self.real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)


@pytest.fixture
def sdpa_spy(monkeypatch: pytest.MonkeyPatch) -> SDPASpy:
    spy = SDPASpy()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return spy


# ---- config and presets ----------------------------------------------------------------------


def test_presets_exist_and_have_fp4_friendly_dims() -> None:
    assert {"tiny", "small", "medium", "large", "xl"} <= set(PRESETS)
    for name in PRESETS:
        c = APTConfig.from_preset(name)
        assert c.vocab_size == 256
        assert c.d_model % 32 == 0 and c.d_ff % 32 == 0, name
        assert c.head_dim % 8 == 0, name
        if name in ("medium", "large", "xl"):
            assert c.head_dim >= 64, name


@pytest.mark.parametrize("name,low,high", [
    ("tiny", 0.5e6, 1.5e6), ("small", 10e6, 25e6), ("medium", 85e6, 120e6),
    ("large", 300e6, 400e6), ("xl", 1.2e9, 1.5e9),
])
def test_preset_sizes_and_exact_counts(name: str, low: float, high: float) -> None:
    config = APTConfig.from_preset(name)
    assert low <= config.num_parameters() <= high
    with torch.device("meta"):  # real structure, no memory: exact count even for xl
        model = APTModel(config)
    assert model.num_parameters() == config.num_parameters()
    # The documented table must be the computed count.
    assert f"{config.num_parameters():,}" in apt_module.__doc__


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_num_parameters_real_instances(name: str) -> None:
    model = APTModel(APTConfig.from_preset(name))
    by_hand = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_parameters() == model.config.num_parameters() == by_hand


@pytest.mark.parametrize("overrides", [
    dict(tie_embeddings=False), dict(ap_rank=8, vocab_size=300, n_layers=3), dict(d_ff=100),
])
def test_num_parameters_formula_other_shapes(overrides: dict) -> None:
    model = APTModel(APTConfig.from_preset("tiny", **overrides))
    assert model.num_parameters() == model.config.num_parameters()


def test_default_models_use_small_and_large() -> None:
    assert APTModel().config == APTConfig.from_preset("small")
    with torch.device("meta"):
        large = APTLargeModel()
    assert large.config == APTConfig.from_preset("large")
    config = APTConfig.from_preset("tiny")
    assert APTLargeModel(config).config == config
    assert APTModel(config, n_layers=2).config.n_layers == 2


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_bad_preset_name_lists_valid_names(monkeypatch: pytest.MonkeyPatch, lang: str) -> None:
    monkeypatch.setenv("VB_LANG", lang)
    with pytest.raises(VBConfigError) as info:
        APTConfig.from_preset("huge")
    message = str(info.value)
    assert "huge" in message
    for name in PRESETS:
        assert name in message
    assert isinstance(info.value, ValueError)


def test_bad_config_values_raise() -> None:
    with pytest.raises(VBConfigError, match="no_such_field"):
        APTConfig.from_preset("tiny", no_such_field=1)
    with pytest.raises(VBConfigError):
        APTConfig.from_preset("tiny", n_heads=3)  # 128 does not split into 3 heads
    with pytest.raises(VBConfigError, match="flash"):
        APTConfig.from_preset("tiny", attn_implementation="flash")


# ---- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_masking(impl: str) -> None:
    model = tiny(attn_implementation=impl).eval()
    a = ids(length=12)
    b = a.clone()
    b[:, 7] = (b[:, 7] + 1) % 256
    la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :7], lb[:, :7], rtol=0, atol=1e-6)
    assert (la[:, 7:] - lb[:, 7:]).abs().max() > 1e-3  # the change is seen from position 7 on


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_chunks_match_full_forward(impl: str) -> None:
    model = tiny(attn_implementation=impl).eval()
    x = ids(length=12)
    full = model(x).logits
    out1 = model(x[:, :5], use_cache=True)
    cache = out1.past_key_values
    assert isinstance(cache, KVCache) and cache.length == 5
    out2 = model(x[:, 5:11], past_key_values=cache, use_cache=True)  # multi-token chunk
    out3 = model(x[:, 11:], past_key_values=cache, use_cache=True)  # single decode step
    assert cache.length == 12
    stitched = torch.cat([out1.logits, out2.logits, out3.logits], dim=1)
    torch.testing.assert_close(stitched, full, rtol=0, atol=1e-5)


def test_eager_and_sdpa_agree_fp32_logits_and_grads() -> None:
    x = ids(length=24)
    results = {}
    for impl in IMPLS:
        model = tiny(attn_implementation=impl)
        out = model(x, labels=x)
        out.loss.backward()
        results[impl] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (le, ge), (ls, gs) = results["eager"], results["sdpa"]
    torch.testing.assert_close(le, ls, rtol=0, atol=1e-5)
    assert ge.keys() == gs.keys()
    for name in ge:
        torch.testing.assert_close(ge[name], gs[name], rtol=0, atol=1e-5, msg=name)
    assert ge["blocks.0.attn.ap_down.weight"].abs().max() > 0  # the gated term really trains


def test_sdpa_path_calls_sdpa_with_the_right_masks(sdpa_spy: SDPASpy) -> None:
    model = tiny(attn_implementation="sdpa").eval()
    n = model.config.n_layers
    x = ids(length=10)

    model(x)  # no cache: built-in causal mask
    assert len(sdpa_spy.calls) == n
    assert all(c["is_causal"] and c["attn_mask"] is None for c in sdpa_spy.calls)

    sdpa_spy.calls.clear()
    cache = model(x[:, :4], use_cache=True).past_key_values
    model(x[:, 4:9], past_key_values=cache)  # chunk after a prefix: explicit boolean mask
    chunk_calls = sdpa_spy.calls[n:]
    assert len(chunk_calls) == n
    for c in chunk_calls:
        assert not c["is_causal"]
        assert c["attn_mask"].dtype == torch.bool and c["attn_mask"].shape == (5, 9)

    sdpa_spy.calls.clear()
    model(x[:, 9:], past_key_values=cache)  # one-token decode: no mask at all
    assert len(sdpa_spy.calls) == n
    assert all(not c["is_causal"] and c["attn_mask"] is None for c in sdpa_spy.calls)


def test_eager_path_does_not_call_sdpa(sdpa_spy: SDPASpy) -> None:
    model = tiny(attn_implementation="eager")
    model(ids(), labels=ids()).loss.backward()
    assert sdpa_spy.calls == []


def test_q_and_k_stay_bf16_under_autocast(sdpa_spy: SDPASpy) -> None:
    model = tiny(attn_implementation="sdpa")
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    assert sdpa_spy.calls
    for c in sdpa_spy.calls:
        assert c["q"].dtype == torch.bfloat16 and c["k"].dtype == torch.bfloat16
    assert out.logits.dtype == torch.float32  # labels given: logits upcast for the loss
    assert torch.isfinite(out.loss)


def test_set_attn_implementation(sdpa_spy: SDPASpy) -> None:
    model = tiny(attn_implementation="eager")
    model.set_attn_implementation("sdpa")
    attns = [m for m in model.modules() if isinstance(m, APTAttention)]
    assert len(attns) == model.config.n_layers
    assert all(m.attn_implementation == "sdpa" for m in attns)
    model(ids())
    assert len(sdpa_spy.calls) == model.config.n_layers
    with pytest.raises(VBConfigError, match="flash2"):
        model.set_attn_implementation("flash2")
    # the plain attribute is what counts, read at every forward
    for m in attns:
        m.attn_implementation = "eager"
    sdpa_spy.calls.clear()
    model(ids())
    assert sdpa_spy.calls == []


# ---- blocks and checkpointing ---------------------------------------------------------------


def test_blocks_convention_and_checkpoint_wrapping() -> None:
    model = tiny()
    assert APTModel._no_split_modules == ["APTBlock"]
    assert all(type(b) is APTBlock for b in model.blocks)
    x = ids()
    model(x, labels=x).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for block in model.blocks:  # what the optimizer does from outside
        inner = block.forward
        block.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=0, atol=1e-6, msg=name)


# ---- loss ------------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy_with_ignore_index() -> None:
    model = tiny()
    x = ids(length=10)
    labels = x.clone()
    labels[0, 3] = -100
    labels[1, -1] = -100
    out = model(x, labels=labels)
    logits = model(x).logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, rtol=0, atol=1e-6)
    unshifted = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), ignore_index=-100)
    assert (out.loss - unshifted).abs() > 1e-4


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_loss_implementation_config_and_attribute() -> None:
    assert APTConfig().loss_implementation == "logits"
    assert tiny().loss_implementation == "logits"
    config = APTConfig.from_preset("tiny", loss_implementation="fused")
    assert config.loss_implementation == "fused"
    assert APTModel(config).loss_implementation == "fused"
    assert APTModel(APTConfig.from_preset("tiny"), loss_implementation="fused").loss_implementation == "fused"
    with pytest.raises(VBConfigError, match="chunked"):
        APTConfig.from_preset("tiny", loss_implementation="chunked")
    model = tiny()
    model.loss_implementation = "chunked"  # a plain attribute, checked at forward
    with pytest.raises(VBConfigError, match="chunked"):
        model(ids(), labels=ids())
    # The switch changes no parameter.
    assert tiny(loss_implementation="fused").num_parameters() == tiny().config.num_parameters()


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_matches_logits_loss_and_grads(tie: bool) -> None:
    x = ids(length=12)
    labels = x.clone()
    labels[0, 4] = -100
    labels[1, -1] = -100
    results = {}
    for impl in ("logits", "fused"):
        model = tiny(tie_embeddings=tie)
        model.loss_implementation = impl  # read at every forward
        out = model(x, labels=labels)
        out.loss.backward()
        results[impl] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
        assert model.lm_head.weight.grad.abs().max() > 0
    (plain, plain_grads), (fused, fused_grads) = results["logits"], results["fused"]
    assert plain.logits is not None and fused.logits is None
    assert abs(fused.loss.item() - plain.loss.item()) <= 1e-5 * plain.loss.item()
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        assert rel(fused_grads[name], grad) <= 1e-5, name


def test_fused_loss_uses_the_chunked_op_and_not_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = apt_module.linear_cross_entropy

    def spy(hidden, weight, targets, **kwargs):
        calls.append((hidden.shape, weight, targets.shape))
        return real(hidden, weight, targets, **kwargs)

    monkeypatch.setattr(apt_module, "linear_cross_entropy", spy)
    model = tiny(loss_implementation="fused")
    model.lm_head.forward = None  # calling the head would fail: the logits are never built
    x = ids(batch=2, length=10)
    assert model(x, labels=x).logits is None
    assert len(calls) == 1
    hidden_shape, weight, targets_shape = calls[0]
    assert hidden_shape == (2, 9, 128) and targets_shape == (2, 9)
    assert weight is model.lm_head.weight


def test_fused_mode_without_labels_and_generate_are_unchanged() -> None:
    plain, fused = tiny(), tiny(loss_implementation="fused")
    x = ids(length=10)
    torch.testing.assert_close(fused(x).logits, plain(x).logits, rtol=0, atol=0)
    prompt = ids(batch=2, length=4)
    assert torch.equal(fused.eval().generate(prompt, 8, do_sample=False),
                       plain.eval().generate(prompt, 8, do_sample=False))


def test_fused_loss_under_bf16_autocast_is_close() -> None:
    x = ids(length=16)
    losses = {}
    for impl in ("logits", "fused"):
        model = tiny(n_layers=2, loss_implementation=impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[impl] = model(x, labels=x).loss
        assert losses[impl].dtype == torch.float32
        losses[impl].backward()
        assert model.embed.weight.grad.dtype == torch.float32
    assert abs(losses["fused"].item() - losses["logits"].item()) <= 1e-3 * losses["logits"].item()


def test_too_long_input_raises() -> None:
    model = tiny(max_seq_len=32)
    model(ids(length=32))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(length=33))
    cache = model(ids(length=30), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(length=3), past_key_values=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids(length=30), max_new_tokens=3)


# ---- generation -------------------------------------------------------------------------------


def greedy_without_cache(model: APTModel, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_with_cache_matches_uncached_greedy(impl: str) -> None:
    model = tiny(attn_implementation=impl).eval()
    prompt = ids(batch=3, length=5)
    got = model.generate(prompt, max_new_tokens=15, do_sample=False)
    assert got.shape == (3, 20)
    assert torch.equal(got, greedy_without_cache(model, prompt, 15))
    assert torch.equal(model.generate(prompt, 15, temperature=0.0), got)
    assert torch.equal(model.generate(prompt, 15, top_k=1), got)


def test_generate_goes_through_self_call_and_uses_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    seen: list[tuple[tuple[int, ...], int]] = []
    real_forward = model.forward

    def wrapped(input_ids, labels=None, past_key_values=None, use_cache=False):
        seen.append((tuple(input_ids.shape), 0 if past_key_values is None else past_key_values.length))
        return real_forward(input_ids, labels, past_key_values, use_cache)

    monkeypatch.setattr(model, "forward", wrapped)  # replaced on the instance, as the optimizer does
    calls_through_module_call: list[int] = []  # hooks fire only via nn.Module.__call__
    model.register_forward_pre_hook(lambda m, a: calls_through_module_call.append(1))
    model.generate(ids(batch=2, length=6), max_new_tokens=5, do_sample=False)
    assert seen == [((2, 6), 0), ((2, 1), 6), ((2, 1), 7), ((2, 1), 8), ((2, 1), 9)]
    assert len(calls_through_module_call) == len(seen)


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_training_mode(training: bool) -> None:
    model = tiny(dropout=0.1)
    model.train(training)
    modes: list[bool] = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: modes.append(m.training))
    model.generate(ids(length=4), max_new_tokens=3)
    assert modes and not any(modes)  # eval during generation (no dropout)
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_sampling_is_reproducible_and_respects_top_k() -> None:
    model = tiny()
    prompt = ids(length=4)
    a = model.generate(prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 12, do_sample=False)
    assert not torch.equal(a, greedy)  # with 256 choices at T=1.5, sampling differs


def test_generate_stops_and_pads_at_eos() -> None:
    model = tiny()
    prompt = ids(batch=2, length=4)
    greedy = model.generate(prompt, 8, do_sample=False)
    eos = int(greedy[0, 5])  # row 0 emits this as its second new token
    out = model.generate(prompt, 8, do_sample=False, eos_token_id=eos)
    assert out[0, 5] == eos
    assert (out[0, 6:] == eos).all()
    row1 = greedy[1, 4:].tolist()
    if eos in row1:  # row 1 may hit it too; then everything stops at its first eos
        assert out.shape[1] == 4 + max(2, row1.index(eos) + 1)
    else:
        assert torch.equal(out[1], greedy[1])


# ---- static cache and fixed-shape decoding ---------------------------------------------------


def static_for(model: APTModel, batch: int = 2, max_len: int = 32,
               dtype: torch.dtype = torch.float32) -> StaticKVCache:
    c = model.config
    return StaticKVCache(c.n_layers, batch, c.n_heads, max_len, c.head_dim, dtype, "cpu")


def cache_at(model: APTModel, length: int) -> StaticKVCache:
    """A static cache with more room than the model's max_seq_len (256), at ``length``."""
    cache = static_for(model, max_len=300)
    cache.seek(length)
    return cache


def greedy(model: APTModel, prompt: torch.Tensor, steps: int, **kw) -> torch.Tensor:
    return model.generate(prompt, steps, do_sample=False, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_static_generate_matches_cat_cache_generate(impl: str) -> None:
    model = tiny(attn_implementation=impl).eval()
    for batch, length, steps in [(3, 5, 30), (1, 17, 40), (2, 1, 9)]:
        prompt = ids(batch=batch, length=length, seed=length)
        expected = greedy(model, prompt, steps)
        assert torch.equal(greedy(model, prompt, steps, static_cache=True), expected)
        assert torch.equal(greedy(model, prompt, steps, static_cache=True), expected)  # reused
    short = tiny(attn_implementation=impl, max_seq_len=72).eval()
    prompt = ids(batch=1, length=40)  # room 70 rounds up to 72 = max_seq_len, not to 128
    assert torch.equal(greedy(short, prompt, 32, static_cache=True), greedy(short, prompt, 32))
    assert decoding.cached_decoders(short)[0].cache.max_len == 72


def test_cuda_graph_on_cpu_warns_and_runs_the_static_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VB_LANG", "en")
    model = tiny(attn_implementation="sdpa").eval()
    prompt = ids(batch=2, length=6)
    with pytest.warns(RuntimeWarning, match="CUDA"):
        got = greedy(model, prompt, 20, cuda_graph=True)  # implies static_cache
    assert torch.equal(got, greedy(model, prompt, 20))
    (decoder,) = decoding.cached_decoders(model)
    assert not decoder.cuda_graph and decoder.graph is None
    assert decoder.cache.max_len == 64  # 6 + 20 rounded up to 64


def test_static_generate_sampling_and_eos_match_default_path() -> None:
    model = tiny()
    prompt = ids(batch=2, length=4)
    kw = dict(temperature=1.5, top_k=50)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7), static_cache=True, **kw)
    assert torch.equal(a, b)
    eos = int(greedy(model, prompt, 8)[0, 5])
    assert torch.equal(greedy(model, prompt, 8, eos_token_id=eos, static_cache=True),
                       greedy(model, prompt, 8, eos_token_id=eos))


def test_static_generate_goes_through_self_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    seen: list[tuple[tuple[int, ...], str, int]] = []
    real_forward = model.forward

    def wrapped(input_ids, labels=None, past_key_values=None, use_cache=False):
        seen.append((tuple(input_ids.shape), type(past_key_values).__name__,
                     0 if past_key_values is None else past_key_values.length))
        return real_forward(input_ids, labels, past_key_values, use_cache)

    monkeypatch.setattr(model, "forward", wrapped)
    hooks: list[int] = []
    model.register_forward_pre_hook(lambda m, a: hooks.append(1))
    model.generate(ids(batch=2, length=6), max_new_tokens=4, do_sample=False, static_cache=True)
    assert seen == [((2, 6), "NoneType", 0), ((2, 1), "StaticKVCache", 6),
                    ((2, 1), "StaticKVCache", 7), ((2, 1), "StaticKVCache", 8)]
    assert len(hooks) == len(seen)


@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_static_cache_chunks_match_full_forward(impl: str) -> None:
    model = tiny(attn_implementation=impl).eval()
    x = ids(length=12)
    full = model(x).logits
    cache = static_for(model, max_len=16)
    parts = []
    for lo, hi in [(0, 5), (5, 11), (11, 12)]:  # prefill, a multi-token chunk, one decode step
        out = model(x[:, lo:hi], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        assert cache.length == hi and int(cache.position) == hi
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    cache.seek(5)  # rewind: later slots are stale but masked out
    again = model(x[:, 5:11], past_key_values=cache).logits
    torch.testing.assert_close(again, parts[1], rtol=0, atol=1e-6)


@torch.no_grad()
def test_static_cache_loads_a_cat_cache_and_writes_by_position() -> None:
    model = tiny().eval()
    x = ids(length=9)
    grown = model(x, use_cache=True).past_key_values
    static = StaticKVCache.from_kv_cache(grown, max_len=16)
    assert (static.batch, static.max_len, static.dtype, static.length) == (2, 16, torch.float32, 9)
    assert int(static.position) == 9
    for i, layer in enumerate(grown.layers):
        assert torch.equal(static.k[i, :, :, :9], layer.k) and torch.equal(static.v[i, :, :, :9], layer.v)
        assert not static.k[i, :, :, 9:].any()
        assert isinstance(static[i], StaticLayerKVCache) and static[i].k.data_ptr() == static.k[i].data_ptr()
    step = model(x[:, :1], past_key_values=static).logits
    assert torch.isfinite(step).all()
    assert static.k[:, :, :, 9].abs().sum() > 0 and not static.k[:, :, :, 10:].any()


def test_static_cache_mask_and_positions() -> None:
    cache = StaticKVCache(n_layers=2, batch=1, n_heads=2, max_len=8, head_dim=4)
    cache.seek(2)
    positions = cache.begin(3)
    assert positions.tolist() == [2, 3, 4] and cache.write_index is positions
    expected = torch.arange(8)[None, :] <= torch.tensor([2, 3, 4])[:, None]
    assert cache.mask.dtype == torch.bool and torch.equal(cache.mask, expected)
    assert cache[0].mask is cache.mask
    cache.advance(3)
    assert cache.length == 5 and int(cache.position) == 5
    assert cache.begin(1).tolist() == [5]
    assert cache.mask.tolist() == [[True] * 6 + [False] * 2]


def test_rope_is_gathered_by_a_position_tensor() -> None:
    model = tiny()
    cos, sin = model._rope_at(torch.tensor([3, 4, 5]))
    cos_ref, sin_ref = model._rope(3, 3, torch.device("cpu"))
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    cos, _ = model._rope_at(torch.tensor([7]))
    assert torch.equal(cos, model._rope(7, 1, torch.device("cpu"))[0])


def test_static_sdpa_decode_uses_the_position_mask(sdpa_spy: SDPASpy) -> None:
    model = tiny(attn_implementation="sdpa").eval()
    greedy(model, ids(batch=1, length=5), 3, static_cache=True)
    n = model.config.n_layers
    prefill, steps = sdpa_spy.calls[:n], sdpa_spy.calls[n:]
    assert all(c["is_causal"] and c["attn_mask"] is None for c in prefill)  # flash-eligible
    assert len(steps) == 2 * n
    for c in steps:
        assert c["k"].shape[2] == 64 and c["attn_mask"].shape == (1, 64)
        assert not c["is_causal"] and c["attn_mask"].dtype == torch.bool


def test_static_cache_is_inference_only() -> None:
    model = tiny()
    cache = static_for(model)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(ids(length=2), past_key_values=cache)
    with torch.no_grad():
        model(ids(length=2), past_key_values=cache)
    assert cache.length == 2


@torch.no_grad()
def test_static_cache_length_and_shape_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VB_LANG", "en")
    model = tiny().eval()
    cache = static_for(model, batch=2, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        model(ids(length=9), past_key_values=cache)
    assert cache.length == 0
    model(ids(length=8), past_key_values=cache)
    with pytest.raises(ValueError, match="max_len=8"):
        model(ids(length=1), past_key_values=cache)
    with pytest.raises(ValueError, match="batch"):
        model(ids(batch=3, length=1), past_key_values=static_for(model, batch=2))
    with pytest.raises(ValueError, match="bfloat16"):
        model(ids(length=2), past_key_values=static_for(model, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="position 9"):
        cache.seek(9)
    with pytest.raises(ValueError, match="max_seq_len"):  # the model's own limit still holds
        model(ids(length=1), past_key_values=cache_at(model, 256))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids(length=250), max_new_tokens=7, static_cache=True)
    decoder = decoding.StaticDecoder(cache, cuda_graph=False)
    with pytest.raises(ValueError, match="full"):
        decoder.step(model, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot load"):
        static_for(model, max_len=4).load(model(ids(length=5), use_cache=True).past_key_values)


def test_decoders_are_kept_per_shape_and_freed() -> None:
    model = tiny().eval()
    greedy(model, ids(batch=1, length=8), 4, static_cache=True)
    (first,) = decoding.cached_decoders(model)
    prompt = ids(batch=1, length=20, seed=5)
    got = greedy(model, prompt, 4, static_cache=True)  # room 64 again: same cache, reloaded
    assert decoding.cached_decoders(model) == [first]
    assert torch.equal(got, greedy(model, prompt, 4))
    greedy(model, ids(batch=1, length=70), 2, static_cache=True)  # room 128: a second decoder
    assert [d.cache.max_len for d in decoding.cached_decoders(model)] == [64, 128]
    for length in (130, 200, 8):
        greedy(model, ids(batch=2, length=length), 2, static_cache=True)
    kept = decoding.cached_decoders(model)
    assert len(kept) == decoding.MAX_DECODERS_PER_MODEL
    assert [(d.cache.batch, d.cache.max_len) for d in kept] == [(1, 128), (2, 192), (2, 256), (2, 64)]
    model.clear_decode_cache()
    assert decoding.cached_decoders(model) == []


def test_graph_fingerprint_sees_what_a_replay_would_miss() -> None:
    model = tiny()
    stamp = decoding.fingerprint(model)
    assert decoding.fingerprint(model) == stamp
    with torch.no_grad():
        model.blocks[0].mlp.w_up.weight.mul_(2)  # in place: a packed FP4 copy would be stale
    assert decoding.fingerprint(model) != stamp
    stamp = decoding.fingerprint(model)
    model.set_attn_implementation("sdpa")
    assert decoding.fingerprint(model) != stamp
    stamp = decoding.fingerprint(model)
    model.to(torch.float64)  # new tensors
    assert decoding.fingerprint(model) != stamp


def test_static_generate_after_weights_change_and_with_vb_modes(native_bf16: None) -> None:
    import apt_model.optimization.vb_global as vb
    from apt_model.fp4 import layer as fp4_linear

    model = tiny().eval()
    prompt = ids(batch=2, length=6)
    greedy(model, prompt, 12, static_cache=True)
    with torch.no_grad():
        model.blocks[1].attn.q_proj.weight.mul_(-1.5)
    assert torch.equal(greedy(model, prompt, 12, static_cache=True), greedy(model, prompt, 12))
    for mode, dtype in [("speed", torch.float32), ("balanced", torch.bfloat16)]:
        model = vb.optimize(tiny(), mode=mode, verbose=False).eval()
        got = greedy(model, prompt, 20, static_cache=True)
        assert torch.equal(got, greedy(model, prompt, 20)), mode
        assert decoding.cached_decoders(model)[0].cache.dtype == dtype
    freeze = getattr(fp4_linear, "freeze_fp4", None)  # FP4 serving form, where it exists
    if freeze is not None:
        assert freeze(model := vb.optimize(tiny(), mode="speed", verbose=False)) > 0
        assert torch.equal(greedy(model, prompt, 20, static_cache=True), greedy(model, prompt, 20))


# ---- weights ---------------------------------------------------------------------------------


def test_tied_weights_survive_load_state_dict() -> None:
    a, b = tiny(seed=0), tiny(seed=1)
    assert a.lm_head.weight is a.embed.weight
    assert not torch.equal(a.embed.weight, b.embed.weight)
    a.load_state_dict(b.state_dict())
    assert a.lm_head.weight is a.embed.weight
    assert torch.equal(a.embed.weight, b.embed.weight)
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


def test_state_dict_keys_are_stable() -> None:
    model = tiny(n_layers=1)
    expected = [
        "embed.weight",
        "blocks.0.attn_norm.weight",
        "blocks.0.attn.ap_gate",
        "blocks.0.attn.q_proj.weight",
        "blocks.0.attn.k_proj.weight",
        "blocks.0.attn.v_proj.weight",
        "blocks.0.attn.o_proj.weight",
        "blocks.0.attn.ap_down.weight",
        "blocks.0.attn.ap_up.weight",
        "blocks.0.mlp_norm.weight",
        "blocks.0.mlp.w_gate.weight",
        "blocks.0.mlp.w_up.weight",
        "blocks.0.mlp.w_down.weight",
        "norm.weight",
        "lm_head.weight",
    ]
    assert list(model.state_dict()) == expected


def test_initialisation() -> None:
    torch.manual_seed(0)
    model = APTModel(APTConfig.from_preset("tiny"))
    std = model.config.init_std
    residual_std = std / math.sqrt(2 * model.config.n_layers)
    for block in model.blocks:
        assert torch.equal(block.attn.ap_gate, torch.zeros_like(block.attn.ap_gate))
        assert torch.equal(block.attn_norm.weight, torch.ones_like(block.attn_norm.weight))
        assert abs(block.attn.q_proj.weight.std().item() - std) < 0.1 * std
        assert abs(block.attn.o_proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert abs(block.mlp.w_down.weight.std().item() - residual_std) < 0.1 * residual_std
    assert abs(model.embed.weight.std().item() - std) < 0.1 * std


def test_adamw_learns_a_repeated_sequence() -> None:
    model = tiny(randomize_gates=False, n_layers=1)
    pattern = torch.tensor([5, 17, 99, 200, 3, 42, 8, 150])
    x = pattern.repeat(4)[None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at start
    assert losses[-1] < 0.3 * losses[0]
    assert any(b.attn.ap_gate.abs().max() > 0 for b in model.blocks)  # the gate left zero


def test_compile_step_without_a_graph_warns_and_decodes_as_plain():
    torch.manual_seed(0)
    model = APTModel(APTConfig.from_preset("tiny", n_layers=2)).eval()
    prompt = torch.randint(0, 256, (1, 10))
    reference = model.generate(prompt, 8, do_sample=False)
    with pytest.warns(RuntimeWarning, match="CUDA"):
        out = model.generate(prompt, 8, do_sample=False, compile_step=True)
    assert torch.equal(out, reference)
    decoder = decoding.cached_decoders(model)[-1]
    assert decoder.run_step.__name__ == "_decode_step"  # not compiled: no graph to hold it
