"""``auto_estimate``: VB picks the least aggressive mode that fits before it optimizes a model,
says which and why in the user's language, and ``explain_config`` names "auto" as the source."""

from __future__ import annotations

import json

import pytest
import torch
from offloaded_step import device_peak

import apt_model.optimization.vb_global as vb
from apt_model.errors import VBConfigError
from apt_model.estimator import estimate
from apt_model.estimator.fit import FIT_MARGIN, usable
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization import engine
from apt_model.optimization.config import MODES
from apt_model.vgpu.layout import Layout, tensor_slots

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
    assert "任何模式都放不下" in out and "卸载到主机内存 (VGPU) 也放不下" in out
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


HOST = [{"capacity_mb": 2**20, "device": "cpu", "speed_gbps": 1}] * 2  # room for everything


@pytest.fixture(scope="module")
def memory_with_vgpu() -> int:
    """Memory in which no mode fits a short training step on its own, but balanced does with
    its AdamW offloaded to host RAM (the VGPU plan)."""
    alone = min(estimate(CONFIG, mode=mode, batch=1, seq=8, device="cpu").peak_bytes for mode in MODES)
    offloaded = estimate(CONFIG, mode="balanced", batch=1, seq=8, device="cpu", levels=HOST).peak_bytes
    memory = int(offloaded / (1 - FIT_MARGIN)) + 1
    assert alone > memory
    return memory


def test_nothing_fits_on_the_card_alone_plans_vgpu_levels_and_the_plan_runs(capsys, monkeypatch, memory_with_vgpu):
    monkeypatch.setenv("VB_LANG", "en")
    vb.enable(auto_estimate=True, device="cpu")
    vb.set_workload(batch=1, seq=8, memory=memory_with_vgpu)
    model = APTModel(CONFIG)
    out = capsys.readouterr().out
    assert engine.report_of(model).mode == "balanced"
    assert vb.explain_config()["mode"] == ("balanced", "auto")
    levels, source = vb.explain_config()["vgpu_config"]
    assert source == "auto" and [lv["device"] for lv in levels["levels"]] == ["cpu", "cpu"]
    level0 = levels["levels"][0]["capacity_mb"] * 2**20
    assert level0 <= memory_with_vgpu * (1 - FIT_MARGIN)  # the step's activations have their room beside it
    assert "✓ auto_estimate: no mode fits on cpu alone" in out and "using a VGPU plan in mode balanced" in out
    assert "0/2 blocks streamed" in out and "optimizer state and fp32 masters on the host" in out

    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))  # as VB's trainer does
    ids = torch.randint(0, CONFIG.vocab_size, (1, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    planned = estimate(CONFIG, mode="balanced", batch=1, seq=8, levels=levels).placement
    stack = vb.get_stats()["vgpu"]["stacks"][0]
    assert stack["levels"][0]["peak_bytes"] == planned.levels[0].held <= level0
    assert optimizer.stats()["host_bytes"] == planned.offloaded
    optimizer.release()


def test_a_vgpu_plan_is_said_in_chinese_by_default_and_a_configured_ssd_level_is_kept(capsys, memory_with_vgpu,
                                                                                      tmp_path):
    ssd = {"capacity_mb": 64, "device": "ssd", "speed_gbps": 3, "path": str(tmp_path)}
    small = {"capacity_mb": 0.01, "device": "cpu", "speed_gbps": 1}  # cannot hold the model: replanned
    vb.enable(auto_estimate=True, device="cpu", vgpu_config={"levels": [small, ssd]})
    vb.set_workload(batch=1, seq=8, memory=memory_with_vgpu)
    model = APTModel(CONFIG)
    out = capsys.readouterr().out
    assert "上任何模式都放不下" in out and "用 VGPU 计划, 模式 balanced" in out
    levels, source = vb.explain_config()["vgpu_config"]
    assert source == "auto" and levels["levels"][2] == {**ssd, "capacity_mb": 64.0, "speed_gbps": 3.0}
    assert vb.get_stats()["vgpu"]["stacks"][0]["blocks"] == 2 and engine.report_of(model).mode == "balanced"


def test_configured_levels_are_estimated_as_they_will_run_and_left_alone_when_set_above(capsys, monkeypatch,
                                                                                         memory_with_vgpu):
    monkeypatch.setenv("VB_LANG", "en")
    monkeypatch.setenv("VB_AUTO_ESTIMATE", "1")
    vb.enable(device="cpu", vgpu_config={"levels": HOST})  # an argument outranks the environment
    vb.set_workload(batch=1, seq=8, memory=memory_with_vgpu)
    APTModel(CONFIG)  # AdamW offloaded over the configured levels: balanced fits
    assert vb.explain_config()["vgpu_config"][1] == "argument" and vb.explain_config()["mode"][0] == "balanced"
    assert "✓ auto_estimate: mode balanced, the least aggressive mode that fits" in capsys.readouterr().out
    small = [{"capacity_mb": 0.01, "device": "cpu", "speed_gbps": 1}, HOST[1]]  # cannot hold the model
    vb.enable(device="cpu", vgpu_config={"levels": small})
    APTModel(CONFIG)
    assert vb.explain_config()["vgpu_config"][1] == "argument"
    out = capsys.readouterr().out
    assert "no mode fits on cpu (the VGPU levels hold no mode's weights, or stream blocks that mode cannot train); the VGPU levels stay as configured" in out


def test_the_launchers_pick_is_carried_to_the_model_with_no_second_trace(monkeypatch, capsys):
    from apt_model.estimator import Traced
    from apt_model.training import launcher
    from apt_model.training.trainer import TrainConfig

    monkeypatch.setenv("VB_LANG", "en")
    monkeypatch.setenv("VB_AUTO_ESTIMATE", "1")
    steps: list[int] = []
    step = Traced.step
    monkeypatch.setattr(Traced, "step", lambda self, **kw: steps.append(kw["batch"]) or step(self, **kw))
    cfg = TrainConfig(preset="tiny", batch_size=2, seq_len=16, enable_vb=True)
    launcher.check_fits(cfg, memory=2**40)  # balanced fits: one trace
    assert steps == [2] and "✓ auto_estimate: mode balanced" in capsys.readouterr().out
    model = APTModel(APTConfig.from_preset("tiny"))  # what the trainer builds
    assert steps == [2] and engine.report_of(model).mode == "balanced"
    assert vb.explain_config()["mode"] == ("balanced", "auto")
    APTModel(APTConfig.from_preset("tiny", n_layers=1))  # another model: picked for itself
    assert len(steps) == 2


DEEP = APTConfig.from_preset("tiny", n_layers=6, max_seq_len=64)  # weights well over the step's activations


@pytest.fixture(scope="module")
def memory_streaming() -> int:
    """Memory in which no mode fits a short training step with every block in Level 0 (AdamW
    offloaded), but memory mode does with blocks streamed from host RAM: Level 0 holding the
    rest of the model and three blocks' bytes."""
    resident = min(estimate(DEEP, mode=mode, batch=1, seq=8, device="cpu", levels=HOST).peak_bytes for mode in MODES)
    model = APTModel(DEEP)
    blocks = list(model.blocks)
    size = Layout(tensor_slots(blocks[0].modules())).nbytes
    inside = {id(m) for b in blocks for m in b.modules()}
    rest = Layout(tensor_slots(m for m in model.modules() if id(m) not in inside)).nbytes
    streamed = estimate(DEEP, mode="memory", batch=1, seq=8,
                        levels=[{**HOST[0], "capacity_mb": (rest + 3 * size) / 2**20}, HOST[1]])
    assert streamed.placement.streamed > 0
    memory = int(streamed.peak_bytes / (1 - FIT_MARGIN)) + 1
    assert resident > usable(memory)
    return memory


def test_training_that_fits_only_streamed_plans_streamed_blocks_in_memory_mode_and_the_plan_runs(
        capsys, monkeypatch, memory_streaming):
    from apt_model import vgpu
    monkeypatch.setenv("VB_LANG", "en")
    vb.enable(auto_estimate=True, device="cpu")
    vb.set_workload(batch=1, seq=8, memory=memory_streaming)
    torch.manual_seed(0)
    model = APTModel(DEEP)
    out = capsys.readouterr().out
    assert model.training and engine.report_of(model).mode == "memory"  # the mode that trains blocks streamed
    assert vb.explain_config()["mode"] == ("memory", "auto")
    levels, source = vb.explain_config()["vgpu_config"]
    assert source == "auto" and [lv["device"] for lv in levels["levels"]] == ["cpu", "cpu"]
    stack = vgpu.stack_of(model)
    streamed = len(stack.plan.streamed)
    assert streamed > 0
    assert "✓ auto_estimate: no mode fits on cpu alone" in out and "using a VGPU plan in mode memory" in out
    assert f"{streamed}/6 blocks streamed" in out and "streamed blocks recomputed in backward" in out

    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))  # as VB's trainer does
    ids = torch.randint(0, DEEP.vocab_size, (1, 8))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    measured = device_peak(model, optimizer, step, [ids], stack)
    planned = estimate(DEEP, mode="memory", batch=1, seq=8, levels=levels)
    optimizer.release()
    assert measured == planned.peak_bytes <= usable(memory_streaming)  # the plan fits, as estimated
    assert stack.stats()["levels"][0]["peak_bytes"] == planned.placement.levels[0].held
    assert planned.placement.levels[0].held <= levels["levels"][0]["capacity_mb"] * 2**20


def test_a_streamed_training_plan_is_said_in_chinese_by_default(capsys, memory_streaming):
    vb.enable(auto_estimate=True, device="cpu")
    vb.set_workload(batch=1, seq=8, memory=memory_streaming)
    APTModel(DEEP)
    out = capsys.readouterr().out
    assert "用 VGPU 计划, 模式 memory" in out and "个块流式" in out and "流式的块在反向中重算 (激活检查点)" in out


def test_with_an_ssd_level_the_plan_puts_optimizer_state_past_host_ram_on_the_ssd_and_runs(memory_with_vgpu, tmp_path):
    """Host RAM too small for the offloaded AdamW's masters and moments: with a configured SSD
    level the plan still exists (Level 1 is the whole host room; what it cannot hold goes to
    swap files), its host bytes stay within the room, and the real step's counters match it."""
    from apt_model.estimator.fit import choose_vgpu
    from apt_model.optimization.config import VGPULevel

    ssd = VGPULevel(64, "ssd", 3, str(tmp_path))
    offloaded = estimate(CONFIG, mode="balanced", batch=1, seq=8, device="cpu", levels=HOST).placement.offloaded
    host_room = offloaded // 2  # beside Level 0, which on the CPU is host RAM too
    host_free = int((usable(memory_with_vgpu) + host_room) / (1 - FIT_MARGIN)) + 1
    args = dict(free=memory_with_vgpu, host_free=host_free, batch=1, seq=8, device=torch.device("cpu"))
    assert choose_vgpu(CONFIG, **args) is None  # host RAM alone cannot hold the optimizer state
    choice = choose_vgpu(CONFIG, **args, disk=(ssd,))
    assert choice is not None and choice.mode == "balanced"
    placement = choice.estimate.placement
    assert 0 < placement.offload_disk and placement.host_bytes <= host_room + usable(memory_with_vgpu)

    vb.enable(mode="balanced", device="cpu", vgpu_config=choice.levels, verbose=False)
    model = APTModel(CONFIG)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))
    ids = torch.randint(0, CONFIG.vocab_size, (1, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    stats = optimizer.stats()
    assert (stats["host_bytes"], stats["disk_bytes"]) == (placement.offloaded, placement.offload_disk)
    optimizer.release()
