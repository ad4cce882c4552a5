"""A second ``vb.optimize`` of an optimized model: the same settings are a no-op, other
settings are an error (never silently ignored)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.errors import VBConfigError
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization.engine import report_of

CFG = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))


@pytest.mark.parametrize("mode", ["balanced", "memory", "speed", "full"])
def test_same_mode_returns_the_stored_report_without_a_second_banner(mode, capsys):
    model = vb.optimize(mlp(), mode=mode)
    report = report_of(model)
    assert "✓" in capsys.readouterr().out
    assert vb.optimize(model, mode=mode) is model
    assert report_of(model) is report
    assert "✓" not in capsys.readouterr().out


def test_a_model_built_while_vb_is_on_can_be_handed_to_optimize_again():
    vb.enable(mode="memory", verbose=False)
    model = APTModel(CFG)
    report = report_of(model)
    assert report is not None and report.mode == "memory"
    vb.optimize(model)  # what a trainer does with the model it is given
    assert report_of(model) is report


@pytest.mark.parametrize("lang", ["zh", "en"])
@pytest.mark.parametrize(("first", "second"), [("balanced", "memory"), ("memory", "speed"),
                                               ("speed", "full")])
def test_another_mode_is_an_error_naming_both_modes(first, second, lang, monkeypatch):
    monkeypatch.setenv("VB_LANG", lang)
    model = vb.optimize(mlp(), mode=first, verbose=False)
    report = report_of(model)
    with pytest.raises(VBConfigError) as err:
        vb.optimize(model, mode=second, verbose=False)
    message = str(err.value)
    assert f"'{first}'" in message and f"'{second}'" in message and "\n" not in message
    assert ("build the model again" in message) == (lang == "en")
    assert ("重新构建模型" in message) == (lang == "zh")
    assert report_of(model) is report and report.mode == first


def test_other_effective_switches_in_the_same_mode_are_an_error(monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    model = vb.optimize(mlp(), mode="balanced", verbose=False)
    vb.optimize(model, mode="balanced", gradient_checkpointing=False, verbose=False)  # as the mode says
    with pytest.raises(VBConfigError, match=r"gradient_checkpointing: False → True"):
        vb.optimize(model, mode="balanced", gradient_checkpointing=True, verbose=False)
    fp4 = vb.optimize(mlp(), mode="speed", fp4_format="nvfp4", verbose=False)
    with pytest.raises(VBConfigError, match=r"'speed' .*fp4_format: nvfp4 → mxfp4"):
        vb.optimize(fp4, mode="speed", fp4_format="mxfp4", verbose=False)
    # the FP4 format only counts where FP4 is on
    plain = vb.optimize(mlp(), mode="memory", verbose=False)
    assert vb.optimize(plain, mode="memory", fp4_format="mxfp4", verbose=False) is plain


def test_a_model_built_in_one_mode_refuses_the_active_mode_when_it_changed():
    vb.enable(mode="balanced", verbose=False)
    model = APTModel(CFG)
    vb.enable(mode="speed", verbose=False)
    with pytest.raises(VBConfigError, match="'balanced'.*'speed'|'speed'.*'balanced'"):
        vb.optimize(model)
