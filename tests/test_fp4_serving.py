"""Serving in FP4: frozen packed layers, packed checkpoints, their statistics and quality (CPU)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import apt_model.fp4.packed_checkpoint as ckpt
import apt_model.optimization.vb_global as vb
from apt_model.errors import VBConfigError, VBDataError
from apt_model.fp4.format import fp4_nbytes, quantize_fp4
from apt_model.fp4.layer import FP4Linear, freeze_fp4
from apt_model.fp4.packed_checkpoint import load_fp4_checkpoint, save_fp4_checkpoint
from apt_model.modeling.apt_model import APTConfig, APTLargeModel, APTModel
from apt_model.optimization import config as vb_config
from apt_model.optimization import stats as vb_stats

CFG = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64)
APT = (APTModel, APTLargeModel)  # the classes a checkpoint without a model is built from
FORMATS = ("nvfp4", "mxfp4")
BITS = {"nvfp4": 4.5, "mxfp4": 4.25}  # per weight: 4-bit codes + one 8-bit scale per 16 / 32


def batch(seed: int = 0, b: int = 2, t: int = 32) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def plain_model(seed: int = 0, config: APTConfig = CFG) -> APTModel:
    torch.manual_seed(seed)
    return APTModel(config)


def fp4_model(fmt: str = "nvfp4", seed: int = 0) -> APTModel:
    """A plain model converted to FP4 weights only (the trained-then-served path)."""
    return vb.optimize(plain_model(seed), mode="speed", fp4_format=fmt, verbose=False)


def fp4_layers(model: nn.Module) -> dict[str, FP4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP4Linear)}


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    return model.eval()(batch() if x is None else x).logits


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and persistent buffers, a tied one once). The
    fused groups' non-persistent buffers are left out: the members' packed tensors are views
    of them, and their per-row tensor scales (4 bytes a row) are the only extra."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- frozen layers


@pytest.mark.parametrize("fmt", FORMATS)
def test_freeze_keeps_the_eval_output_bit_exact_and_drops_master_weights(fmt):
    model = fp4_model(fmt)
    before = logits(model)
    layers = fp4_layers(model)
    assert freeze_fp4(model) == len(layers) > 0
    assert freeze_fp4(model) == 0  # already frozen
    assert not model.training
    assert torch.equal(logits(model), before)
    keys = set(model.state_dict())
    for name, layer in layers.items():
        assert layer.frozen and layer.weight is None
        assert f"{name}.weight" not in keys
        assert {f"{name}.weight_packed", f"{name}.weight_scales"} <= keys
        assert (f"{name}.weight_tensor_scale" in keys) == (fmt == "nvfp4")
        assert layer.weight_packed.dtype == torch.uint8
        assert "frozen=True" in repr(layer)
    assert not any(n.rpartition(".")[0] in layers for n, _ in model.named_parameters())


@pytest.mark.parametrize("fmt", FORMATS)
def test_frozen_layers_hold_only_packed_bytes(fmt):
    model = fp4_model(fmt)
    fp32_bytes = state_bytes(model)
    layers = fp4_layers(model).values()
    weight_elems = sum(m.in_features * m.out_features for m in layers)
    freeze_fp4(model)
    packed = sum(state_bytes(m) for m in layers)
    assert packed == sum(fp4_nbytes((m.out_features, m.in_features), fmt) for m in layers)
    assert packed / (weight_elems * 4) == pytest.approx(BITS[fmt] / 32, rel=1e-3)
    assert state_bytes(model) == fp32_bytes - weight_elems * 4 + packed


def test_to_moves_packed_buffers_and_never_casts_them():
    model = fp4_model("nvfp4")
    freeze_fp4(model)
    layer = model.blocks[0].mlp.w_up
    packed = layer.packed_weight()
    dtypes = {name: buf.dtype for name, buf in layer.named_buffers()}
    model.to(torch.bfloat16)  # float8 scales and the fp32 tensor scale must not be cast
    assert {name: buf.dtype for name, buf in layer.named_buffers()} == dtypes
    assert layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer.packed_weight().packed, packed.packed)
    x = torch.randn(2, 5, CFG.d_model).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, packed.dequantize(torch.bfloat16)))
    model.to("meta")  # a device move: every packed buffer follows, dtypes intact
    for name, buf in layer.named_buffers():
        assert buf.is_meta and buf.dtype == dtypes[name]


def test_training_a_frozen_layer_raises_a_clear_error(monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    model = fp4_model()
    freeze_fp4(model)
    model.train()
    with pytest.raises(RuntimeError, match="frozen to packed FP4.*cannot be trained"):
        model(batch(), labels=batch())
    with torch.no_grad():  # serving works in either mode
        model(batch())


def test_from_packed_builds_a_frozen_layer():
    torch.manual_seed(3)
    w, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(5, 64)
    for fmt in FORMATS:
        packed = quantize_fp4(w, fmt)
        layer = FP4Linear.from_packed(packed, bias)
        assert layer.frozen and layer.fmt == fmt and (layer.out_features, layer.in_features) == (96, 64)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, packed.dequantize(), bias))
    with pytest.raises(ValueError, match="bias"):
        FP4Linear.from_packed(quantize_fp4(w, "nvfp4"), torch.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        FP4Linear.from_packed(quantize_fp4(torch.randn(2, 4, 32), "nvfp4"))


def test_non_frozen_layers_still_train_and_repack():
    model = fp4_model()
    layer = model.blocks[0].attn.q_proj
    loss = model.train()(batch(), labels=batch()).loss
    loss.backward()
    assert layer.weight.grad is not None and not layer.frozen


# ----------------------------------------------------------------------------- checkpoints


def _packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".weight_" in k}


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_round_trip_is_bit_exact(fmt, tmp_path):
    model = fp4_model(fmt)  # not frozen: the checkpoint quantizes from the master weights
    ref = logits(model)
    path = save_fp4_checkpoint(model, tmp_path / "m.safetensors")
    assert not fp4_layers(model)["blocks.0.attn.q_proj"].frozen
    frozen = fp4_model(fmt)
    freeze_fp4(frozen)
    packed_bytes = state_bytes(frozen)
    # the file is the frozen model's state: its tensors plus a small header
    assert 0 < path.stat().st_size - packed_bytes < 16 * 1024
    assert path.stat().st_size < 0.3 * state_bytes(plain_model())
    stored = load_file(path)
    for key, value in frozen.state_dict().items():
        if key != "lm_head.weight":  # tied: stored once, under embed.weight
            assert torch.equal(stored[key], value), key
    loaded = load_fp4_checkpoint(path, classes=APT)
    assert type(loaded) is APTModel and loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.embed.weight
    assert set(fp4_layers(loaded)) == set(fp4_layers(model))
    assert all(m.frozen and m.fmt == fmt for m in fp4_layers(loaded).values())
    for key, value in _packed_state(frozen).items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(logits(loaded), ref)
    # saving the frozen model gives the same tensors
    again = load_file(save_fp4_checkpoint(frozen, tmp_path / "frozen.safetensors"))
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


def test_metadata_records_format_layers_aliases_and_config(tmp_path):
    model = fp4_model("mxfp4")
    path = save_fp4_checkpoint(model, tmp_path / "m.safetensors")
    meta = ckpt.read_fp4_metadata(path)
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert meta["aliases"] == {"lm_head.weight": "embed.weight"}
    assert meta["model_class"] == "APTModel" and APTConfig(**meta["config"]) == CFG
    assert meta["fp4_layers"]["blocks.1.mlp.w_down"] == {
        "fmt": "mxfp4", "shape": [CFG.d_model, CFG.d_ff], "dtype": "float32", "bias": False}


def test_load_builds_the_recorded_class_from_the_classes_given(tmp_path, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    model = fp4_model("nvfp4")
    path = save_fp4_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_fp4_checkpoint(path, classes=(APTLargeModel, APTModel))
    assert type(loaded) is APTModel and loaded.config == model.config
    assert torch.equal(logits(loaded), logits(model))
    for classes in ((APTLargeModel,), None):  # the loader knows no model family by itself
        with pytest.raises(VBConfigError, match="model class APTModel.*pass model=") as exc:
            load_fp4_checkpoint(path, classes=classes)
        _one_line(exc)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_load_into_a_given_plain_model(device, tmp_path):
    model = fp4_model("nvfp4")
    ref = logits(model)
    path = save_fp4_checkpoint(model, tmp_path / "m.safetensors")
    with torch.device(device):
        target = APTModel(CFG)  # another init: everything must come from the file
    loaded = load_fp4_checkpoint(path, target)
    assert loaded is target and loaded.lm_head.weight is loaded.embed.weight
    assert all(not t.is_meta for t in loaded.state_dict().values())
    assert len(fp4_layers(loaded)) == len(fp4_layers(model))
    assert torch.equal(logits(loaded), ref)


def test_load_into_an_fp4_model_of_another_format(tmp_path):
    path = save_fp4_checkpoint(fp4_model("nvfp4"), tmp_path / "m.safetensors")
    target = fp4_model("mxfp4", seed=9)
    load_fp4_checkpoint(path, target)
    assert all(m.frozen and m.fmt == "nvfp4" for m in fp4_layers(target).values())
    assert torch.equal(logits(target), logits(load_fp4_checkpoint(path, classes=APT)))


def test_bf16_model_round_trip(tmp_path):
    model = fp4_model("nvfp4").to(torch.bfloat16)
    ref = logits(model)
    loaded = load_fp4_checkpoint(save_fp4_checkpoint(model, tmp_path / "m.safetensors"), classes=APT)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert all(m.compute_dtype == torch.bfloat16 for m in fp4_layers(loaded).values())
    assert torch.equal(logits(loaded), ref)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_fp4_checkpoint(fp4_model(seed=1), path)
    old = path.read_bytes()

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", half_written)
    with pytest.raises(VBDataError, match="No space left on device"):
        save_fp4_checkpoint(fp4_model(seed=2), path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()

    def no_rename(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(ckpt.os, "replace", no_rename)
    with pytest.raises(VBDataError, match="Permission denied"):
        save_fp4_checkpoint(fp4_model(seed=2), path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == [path.name]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_bad_files_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    with pytest.raises(VBDataError, match="no such file") as exc:
        load_fp4_checkpoint(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in _one_line(exc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x07not a safetensors file at all")
    with pytest.raises(VBDataError, match="not a readable safetensors file") as exc:
        load_fp4_checkpoint(junk)
    _one_line(exc)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(VBDataError, match="not an FP4 checkpoint") as exc:
        load_fp4_checkpoint(plain)
    _one_line(exc)
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(2)}, newer, metadata={"format": ckpt.FORMAT, "format_version": "99"})
    with pytest.raises(VBDataError, match="unsupported FP4 checkpoint version") as exc:
        load_fp4_checkpoint(newer)
    _one_line(exc)


def test_model_mismatches_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    path = save_fp4_checkpoint(fp4_model(), tmp_path / "m.safetensors")
    wider = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64, d_ff=512)
    with pytest.raises(VBConfigError, match=r"blocks\.0\.mlp\.w_gate has shape \[512, 128\]") as exc:
        load_fp4_checkpoint(path, plain_model(config=wider))
    _one_line(exc)
    shallower = APTConfig.from_preset("tiny", n_layers=1, max_seq_len=64)
    with pytest.raises(VBConfigError, match=r"has no layer blocks\.1\.") as exc:
        load_fp4_checkpoint(path, plain_model(config=shallower))
    _one_line(exc)
    longer = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64, vocab_size=300)
    with pytest.raises(VBConfigError, match="embed.weight") as exc:
        load_fp4_checkpoint(path, plain_model(config=longer))
    _one_line(exc)
    # no config recorded and no model given
    bare = nn.Sequential(nn.Linear(64, 64))
    vb.optimize(bare, mode="speed", verbose=False)
    bare_path = save_fp4_checkpoint(bare, tmp_path / "bare.safetensors")
    with pytest.raises(VBConfigError, match="pass model=") as exc:
        load_fp4_checkpoint(bare_path, classes=APT)
    _one_line(exc)
    loaded = load_fp4_checkpoint(bare_path, nn.Sequential(nn.Linear(64, 64)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), bare.eval()(x))


# ----------------------------------------------------------------------------- vb and stats


def test_vb_wrappers(tmp_path):
    model = fp4_model("mxfp4")
    ref = logits(model)
    path = vb.save_fp4(model, tmp_path / "sub" / "m.safetensors")
    assert path.is_file() and path.parent.name == "sub"
    assert vb.freeze_fp4(model) == len(fp4_layers(model))
    loaded = vb.load_fp4(path)
    assert torch.equal(logits(loaded), ref) and torch.equal(logits(model), ref)
    into = vb.load_fp4(path, plain_model(5))
    assert torch.equal(logits(into), ref)
    stats = vb.get_stats()
    assert stats["models"] == 3  # the optimized model and both loaded ones
    assert stats["layers"]["fp4"] == 3 * len(fp4_layers(model))


def test_stats_count_frozen_layers_as_before_freezing():
    model = fp4_model("nvfp4")
    fp4 = list(fp4_layers(model).values())
    before = vb.get_stats()
    plain_bytes = state_bytes(plain_model())
    saved = sum(m.weight.numel() * 4 - fp4_nbytes(tuple(m.weight.shape), "nvfp4") for m in fp4)
    assert before["param_bytes_before"] == plain_bytes
    assert before["param_bytes_after"] == plain_bytes - saved
    freeze_fp4(model)
    after = vb.get_stats()
    assert after["param_bytes_before"] == plain_bytes
    assert after["param_bytes_after"] == plain_bytes - saved == state_bytes(model)
    assert after["layers"] == before["layers"]


def test_stats_of_a_loaded_checkpoint(tmp_path):
    path = vb.save_fp4(fp4_model("mxfp4"), tmp_path / "m.safetensors")
    vb_stats.REGISTRY.reset()
    loaded = vb.load_fp4(path)
    stats = vb.get_stats()
    assert stats["models"] == 1 and stats["layers"]["fp4"] == len(fp4_layers(loaded))
    assert stats["layers"]["linear_total"] == len(fp4_layers(loaded)) + CFG.n_layers + 1  # ap_up, head
    assert stats["param_bytes_before"] == state_bytes(plain_model())
    assert stats["param_bytes_after"] == state_bytes(loaded)
    # a loaded model can still be optimized (VB left no report on it)
    report = vb.optimize(loaded, mode="balanced", verbose=False)._vb_report
    assert report.attention_fused == CFG.n_layers
    with torch.no_grad():
        assert loaded(batch()).logits.shape == (2, 32, CFG.vocab_size)


# ----------------------------------------------------------------------------- quality


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "fp4_quality.py"
    spec = importlib.util.spec_from_file_location("fp4_quality_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny APT model trained once for the quality tests (~150 steps: no longer random)."""
    bench = _bench()
    with pytest.MonkeyPatch.context() as mp:
        for var in (*vb_config.ENV_VARS, vb_config.VBRC_ENV):
            mp.delenv(var, raising=False)
        mp.chdir(tmp_path_factory.mktemp("quality"))
        model, cfg, result = bench.train_model("tiny", steps=150, batch_size=8, seq_len=64,
                                               out_dir=str(tmp_path_factory.mktemp("run")))
    return bench, model, cfg, result


def test_fp4_serving_quality_within_five_percent(trained):
    bench, model, cfg, result = trained
    assert result.val_loss < 2.6  # trained: uniform bytes would be ln(256) = 5.55
    rows = {r["variant"]: r for r in bench.measure(model, cfg, eval_batches=8)}
    assert rows["fp32"]["val_loss"] == pytest.approx(result.val_loss, rel=1e-6)
    for fmt in FORMATS:
        assert abs(rows[fmt]["rel_change"]) <= bench.TARGET_REL, rows[fmt]
        assert rows[fmt]["checkpoint_exact"] is True
        assert rows[fmt]["fp4_layers"] == 4 * 8  # q k v ap_down o, gate up down
        assert rows[fmt]["model_bytes"] < 0.25 * rows["fp32"]["model_bytes"]
    assert all(not isinstance(m, FP4Linear) for m in model.modules())  # the fp32 model untouched


@pytest.mark.parametrize("fmt", FORMATS)
def test_trained_model_decodes_the_same_with_fused_projections(trained, fmt):
    """Greedy tokens of the trained model in speed mode: the fused q/k/v and gate/up products
    against every FP4 layer run alone (the unfused reference path)."""
    import copy

    from apt_model.fp4.fused import FusedFP4Projections

    _, model, _, _ = trained
    served = []
    for fused in (True, False):
        fp4 = vb.optimize(copy.deepcopy(model), mode="speed", fp4_format=fmt, verbose=False)
        vb.freeze_fp4(fp4)
        groups = [m for m in fp4.modules() if isinstance(m, FusedFP4Projections)]
        assert groups and all(g.packed is not None for g in groups)
        for group in groups:
            group.active = fused
        prompt = torch.tensor([list(b"def main():\n    return ")], device=fp4.embed.weight.device)
        with torch.no_grad():
            served.append(fp4.generate(prompt, 48, do_sample=False))
    assert torch.equal(served[0], served[1])
