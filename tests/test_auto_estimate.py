"""``auto_estimate``: VB picks the least aggressive mode that fits before it optimizes a model,
says which and why in the user's language, and ``explain_config`` names "auto" as the source."""

from __future__ import annotations

import json

import pytest

import apt_model.optimization.vb_global as vb
from apt_model.errors import VBConfigError
from apt_model.estimator import estimate
from apt_model.estimator.fit import FIT_MARGIN
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization import engine

CONFIG = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64)
BATCH, SEQ = 4, 64


@pytest.fixture(scope="module")
def memory_fits() -> int:
    """Memory in which mode memory (checkpointing) fits this workload and balanced does not."""
    memory = estimate(CONFIG, mode="memory", batch=BATCH, seq=SEQ, device="cpu").peak_bytes
    balanced = estimate(CONFIG, mode="balanced", batch=BATCH, seq=SEQ, device="cpu").peak_bytes
    assert memory < balanced * (1 - FIT_MARGIN)
    return int(memory / (1 - FIT_MARGIN)) + 1


def test_enable_picks_the_least_aggressive_mode_that_fits_and_explains_it(capsys, monkeypatch, memory_fits):
    monkeypatch.setenv("VB_LANG", "en")
    vb.enable(auto_estimate=True, device="cpu")
    vb.set_workload(batch=BATCH, seq=SEQ, memory=memory_fits)
    model = APTModel(CONFIG)
    out = capsys.readouterr().out
    assert engine.report_of(model).mode == "memory"
    assert vb.explain_config()["mode"] == ("memory", "auto")
    assert "picked per model by auto_estimate ← argument" in out
    assert "✓ auto_estimate: mode memory, the least aggressive mode that fits (peak of a training step: balanced" in out


def test_nothing_fits_says_offloading_is_needed_in_chinese_by_default(capsys):
    vb.enable(auto_estimate=True, device="cpu")
    vb.set_workload(batch=BATCH, seq=SEQ, memory=1024)
    model = APTModel(CONFIG)
    out = capsys.readouterr().out
    assert engine.report_of(model).mode == "full"  # the most aggressive, meanwhile
    assert "任何模式都放不下" in out and "卸载" in out and "VGPU" in out
    assert vb.explain_config()["mode"] == ("full", "auto")


def test_env_var_and_vbrc_switch_it_on_and_a_mode_set_higher_wins(monkeypatch, tmp_path, memory_fits):
    vb.set_workload(batch=BATCH, seq=SEQ, memory=memory_fits)
    monkeypatch.setenv("VB_AUTO_ESTIMATE", "1")
    monkeypatch.setenv("VB_MODE", "speed")  # the same level: the automatic pick wins
    vb.enable(device="cpu", verbose=False)
    assert engine.report_of(APTModel(CONFIG)).mode == "memory"
    vb.enable(mode="speed", device="cpu", verbose=False)  # an argument outranks the environment
    assert engine.report_of(APTModel(CONFIG)).mode == "speed"
    assert vb.explain_config()["mode"] == ("speed", "argument")
    monkeypatch.delenv("VB_AUTO_ESTIMATE")
    monkeypatch.delenv("VB_MODE")
    vbrc = tmp_path / ".vbrc"
    vbrc.write_text(json.dumps({"enabled": True, "mode": "balanced", "auto_estimate": True, "verbose": False}))
    monkeypatch.setenv("VB_CONFIG", str(vbrc))
    vb.disable()
    vb.set_workload(batch=BATCH, seq=SEQ, memory=memory_fits)
    vb.configure()
    assert engine.report_of(APTModel(CONFIG)).mode == "memory"


def test_off_by_default_and_bad_workloads_are_refused():
    vb.enable(device="cpu", verbose=False)
    assert not vb.get_config()["auto_estimate"]
    vb.set_workload(memory=1024)
    assert engine.report_of(APTModel(CONFIG)).mode == "balanced"
    for bad in ({"batch": 0}, {"seq": -1}, {"memory": 0}):
        with pytest.raises(VBConfigError):
            vb.set_workload(**bad)
