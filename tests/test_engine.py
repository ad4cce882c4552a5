"""Each mode's effect, checked by behaviour against the plain model (CPU)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.fp4.format import fake_quantize_fp4, fp4_nbytes
from apt_model.fp4.layer import FP4Linear
from apt_model.modeling.apt_model import APTConfig, APTLargeModel, APTModel
from apt_model.optimization.wrapping import wrapped_tags

CFG = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64)


def batch(seed: int = 0, b: int = 2, t: int = 32) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def build(**vb_options) -> APTModel:
    """A model built while VB is on with ``vb_options`` (or a plain one when none are given)."""
    torch.manual_seed(0)
    if vb_options:
        vb.enable(verbose=False, **vb_options)
    model = APTModel(CFG)
    vb.disable()
    return model


def plain_model() -> APTModel:
    torch.manual_seed(0)
    return APTModel(CFG)


class Probe:
    """Records, for each call of a block's first MLP projection, whether autocast was on and
    which dtype it produced (a projection, not the whole MLP: checkpoint recomputation stops
    as soon as the last saved tensor is rebuilt, before the MLP's own forward hook)."""

    def __init__(self, model: APTModel) -> None:
        self.calls: list[tuple[bool, torch.dtype]] = []
        model.blocks[0].mlp.w_gate.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        self.calls.append((torch.is_autocast_enabled("cpu"), out.dtype))


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    return loss


@pytest.mark.parametrize(
    ("mode", "fp4", "sdpa", "autocast", "recompute"),
    [
        ("balanced", False, True, True, False),
        ("memory", False, True, True, True),
        ("speed", True, False, False, False),
        ("full", True, True, True, True),
    ],
)
def test_each_mode_changes_execution(mode, fp4, sdpa, autocast, recompute, sdpa_calls, native_bf16):
    model = build(mode=mode)
    probe = Probe(model)
    train_step(model, batch())
    assert any(isinstance(m, FP4Linear) for m in model.modules()) == fp4
    assert bool(sdpa_calls) == sdpa
    if sdpa and autocast:
        assert set(sdpa_calls) == {torch.bfloat16}  # q/k/v reach the fused kernel in bf16
    assert probe.calls[0] == (autocast, torch.bfloat16 if autocast else torch.float32)
    # with checkpointing the block's MLP runs again during backward
    assert len(probe.calls) == (2 if recompute else 1)
    report = model._vb_report
    assert report.mode == mode


def test_plain_model_untouched_when_disabled(sdpa_calls):
    model = build()
    probe = Probe(model)
    train_step(model, batch())
    assert not sdpa_calls and probe.calls == [(False, torch.float32)]
    assert not hasattr(model, "_vb_report") and type(model) is APTModel


def test_disable_restores_plain_behaviour_for_new_models():
    vb.enable_full_optimization(verbose=False)
    optimized = APTModel(CFG)
    vb.disable()
    plain = APTModel(CFG)
    assert wrapped_tags(optimized) == ["autocast"] and any(isinstance(m, FP4Linear) for m in optimized.modules())
    assert wrapped_tags(plain) == [] and not any(isinstance(m, FP4Linear) for m in plain.modules())


def test_fused_attention_and_checkpointing_are_exact_in_fp32():
    x = batch(1)
    ref = plain_model()
    loss_ref = train_step(ref, x)
    for options in ({"fused_attention": True}, {"gradient_checkpointing": True}):
        model = build(mode="balanced", mixed_precision=False, fused_loss=False, **options)
        assert torch.equal(model.state_dict()["embed.weight"], ref.state_dict()["embed.weight"])
        loss = train_step(model, x)
        if "gradient_checkpointing" in options:  # the same forward ops: the same loss, bit for bit
            assert torch.equal(loss, loss_ref)
        assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
        # gradients: the tied embedding sums its two contributions in another order
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_fused_loss_matches_the_plain_loss_without_materializing_logits():
    x = batch(6)
    ref = plain_model()
    loss_ref = train_step(ref, x)
    model = build(mode="balanced", mixed_precision=False)
    assert model.loss_implementation == "fused" and model._vb_report.fused_losses == 1
    out = model(x, labels=x)
    assert out.logits is None
    out.loss.backward()
    assert abs(out.loss.item() - loss_ref.item()) <= 1e-5 * loss_ref.item()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    assert model(x).logits.shape == (*x.shape, CFG.vocab_size)  # no labels: logits as usual


def test_bf16_autocast_loss_and_gradients_within_tolerance(native_bf16):
    x = batch(2)
    ref = plain_model()
    loss_ref = train_step(ref, x)
    model = build(mode="balanced")
    loss = train_step(model, x)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 1e-2
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        # bf16 operands: relative gradient error of a few 1e-3, bounded here at 5e-2
        err = torch.linalg.norm(p.grad - q.grad) / (torch.linalg.norm(q.grad) + 1e-12)
        assert err < 5e-2 or torch.count_nonzero(q.grad) == torch.count_nonzero(p.grad) == 0, (name, err)


def test_outputs_come_back_in_fp32_under_autocast(native_bf16):
    model = build(mode="balanced")
    out = model(batch())
    assert out.logits.dtype == torch.float32


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_training_uses_quantized_weights_with_straight_through_gradients(fmt):
    x = batch(3)
    model = build(mode="speed", fp4_format=fmt)
    fp4 = {n: m for n, m in model.named_modules() if isinstance(m, FP4Linear)}
    assert fp4 and all(m.fmt == fmt for m in fp4.values())
    # reference: the plain model whose linear weights are replaced by their FP4 round trip
    ref = plain_model()
    with torch.no_grad():
        for name in fp4:
            lin = ref.get_submodule(name)
            lin.weight.copy_(fake_quantize_fp4(lin.weight, fmt))
    loss = train_step(model, x)
    loss_ref = train_step(ref, x)
    assert torch.equal(loss, loss_ref)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_fused_training_path_gives_the_fake_quantized_gradients(fmt, monkeypatch):
    """The few-rows path (packed weight, fused kernels on CUDA; the reference ops here) gives
    the same loss and gradients as the fake-quantized path."""
    import apt_model.fp4.layer as fl

    x = batch(5, b=2, t=8)  # 16 rows: within FUSED_TRAIN_MAX_ROWS
    assert x.numel() <= fl.FUSED_TRAIN_MAX_ROWS
    plain = build(mode="speed", fp4_format=fmt)
    loss_ref = train_step(plain, x)
    fused = build(mode="speed", fp4_format=fmt)
    calls = []
    real = fl.fused_training_linear
    monkeypatch.setattr(fl, "triton_available", lambda device: True)
    monkeypatch.setattr(fl, "FUSED_TRAIN_MIN_WEIGHTS", 0)
    monkeypatch.setattr(fl, "fused_training_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    loss = train_step(fused, x)
    n_fp4 = sum(isinstance(m, FP4Linear) for m in fused.modules())
    assert len(calls) == n_fp4 > 0
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fp4_master_weights_are_the_optimizers_parameters_and_learn():
    model = build(mode="speed")
    layer = next(m for m in model.modules() if isinstance(m, FP4Linear))
    assert isinstance(layer.weight, nn.Parameter)
    assert any(p is layer.weight for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = batch(4, b=4, t=32)
    before = layer.weight.detach().clone()
    losses = []
    for _ in range(30):
        loss = train_step(model, x)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert not torch.equal(before, layer.weight)
    assert losses[-1] < 0.6 * losses[0]


def test_fp4_inference_uses_the_packed_weight_and_repacks_after_updates(monkeypatch):
    import apt_model.fp4.layer as fl

    model = build(mode="speed").eval()
    layer = next(m for m in model.modules() if isinstance(m, FP4Linear))
    packs = []
    real = fl.fp4_quantize
    monkeypatch.setattr(fl, "fp4_quantize", lambda w, fmt: packs.append(w.shape) or real(w, fmt))
    n_fp4 = sum(isinstance(m, FP4Linear) for m in model.modules())
    with torch.no_grad():
        out1 = model(batch()).logits
        model(batch())
    assert len(packs) == n_fp4  # packed once, then reused
    packed = layer.packed_weight()
    assert packed.packed.dtype == torch.uint8
    assert packed.packed.numel() == layer.weight.numel() // 2
    assert packed.nbytes() == fp4_nbytes(tuple(layer.weight.shape), "nvfp4")
    assert packed.nbytes() * 8 / layer.weight.numel() < 4.6
    with torch.no_grad():
        layer.weight.mul_(2)
        out2 = model(batch()).logits
    assert len(packs) == n_fp4 + 1 and not torch.equal(out1, out2)


def test_fp4_skips_tied_head_tiny_layers_and_skip_list():
    torch.manual_seed(0)
    vb.enable(mode="speed", verbose=False, fp4_skip=["blocks.0.*"])
    model = APTModel(CFG)
    assert model.lm_head.weight is model.embed.weight and type(model.lm_head) is nn.Linear
    names = {n for n, m in model.named_modules() if isinstance(m, FP4Linear)}
    assert names and not any(n.startswith("blocks.0.") for n in names)
    small = [n for n, m in model.named_modules() if type(m) is nn.Linear and min(m.in_features, m.out_features) < 64]
    assert all(not n.startswith("blocks.1.") or n in small for n, m in model.named_modules() if type(m) is nn.Linear)


@pytest.mark.parametrize("mode", ["balanced", "memory", "speed", "full"])
def test_state_dict_compatible_with_plain_model(mode):
    plain = plain_model()
    model = build(mode=mode)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert model.lm_head.weight is model.embed.weight
    # a plain checkpoint loads into the optimized model and back
    torch.manual_seed(5)
    donor = APTModel(CFG)
    model.load_state_dict(donor.state_dict())
    assert model.lm_head.weight is model.embed.weight
    restored = APTModel(CFG)
    restored.load_state_dict(copy.deepcopy(model.state_dict()))
    for key, value in donor.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)


def test_autopatch_message_and_counts(capsys):
    import apt_model.optimization.vb_autopatch  # noqa: F401

    vb.enable_balanced_mode()
    model = APTLargeModel(CFG)
    out = capsys.readouterr().out
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert f"✓ 自动优化模型: {n_linear} 个线性层" in out
    assert model._vb_report.linears_optimized == n_linear


def test_stats_count_real_things(monkeypatch, capsys):
    monkeypatch.setenv("VB_LANG", "en")
    vb.enable(mode="full", verbose=False)
    model = APTModel(CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    for _ in range(3):
        train_step(model, batch())
        opt.step()
        opt.zero_grad()
        other.step()  # an optimizer of something else: not counted
    stats = vb.get_stats()
    fp4 = [m for m in model.modules() if isinstance(m, FP4Linear)]
    assert stats["steps"] == 3 and stats["models"] == 1 and stats["mode"] == "full"
    assert stats["layers"]["fp4"] == len(fp4)
    assert stats["layers"]["checkpointed_blocks"] == CFG.n_layers
    assert stats["layers"]["attention_fused"] == CFG.n_layers
    plain_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    saved = sum(m.weight.numel() * 4 - fp4_nbytes(tuple(m.weight.shape), m.fmt) for m in fp4)
    assert stats["param_bytes_before"] == plain_bytes
    assert stats["param_bytes_after"] == plain_bytes - saved
    assert stats["vgpu"]["active"] is False
    vb.print_stats()
    text = capsys.readouterr().out
    assert "optimizer steps: 3" in text and "no tiering active" in text


def test_stats_chinese_and_vgpu_levels(capsys):
    vb.enable(verbose=False, vgpu_config={"levels": [{"capacity_mb": 100, "device": "cpu", "speed_gbps": 50}]})
    model = APTModel(CFG)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    vb.print_stats()
    text = capsys.readouterr().out
    assert "虚拟Blackwell统计" in text and "VGPU堆叠统计" in text and "未启用分层" not in text
    # every block fits in Level 0: each use of one is a hit
    assert f"Level 0命中率: 100.0%  (命中 {CFG.n_layers} / 未命中 0)" in text


def test_optimize_any_module_and_register_class():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = vb.optimize(Tiny(), mode="full", verbose=False)
    assert sum(isinstance(m, FP4Linear) for m in model.modules()) == 3
    assert model._vb_report.checkpointed_blocks == 3
    x = torch.randn(4, 64, requires_grad=True)
    y = model(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None

    vb.register_model_class(Tiny)
    vb.enable_memory_mode(verbose=False)
    assert wrapped_tags(Tiny()) == ["autocast"]
    vb.disable()
    assert wrapped_tags(Tiny()) == []


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True),
                                                             (False, True, True)])
def test_a_cpu_has_native_bf16_only_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    """AVX2 (and AVX-512 without BF16) CPUs emulate bf16 products, 10-15x slower than fp32:
    VB's autocast keeps fp32 there."""
    from apt_model.accelerator import supports_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert supports_bf16(torch.device("cpu")) is native


def test_device_without_bf16_keeps_fp32_and_warns_once(monkeypatch):
    import apt_model.optimization.precision as precision

    monkeypatch.setattr(precision, "supports_bf16", lambda device: False)
    monkeypatch.setattr(precision, "_WARNED", set())
    model = build(mode="balanced")
    probe = Probe(model)
    with pytest.warns(RuntimeWarning, match="bf16"):
        train_step(model, batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second step does not warn again
        train_step(model, batch())
    assert probe.calls == [(False, torch.float32), (False, torch.float32)]
    assert precision._WARNED == {"cpu"}
