"""``vb.estimate(..., levels=...)``: what the VGPU stack puts on each level, against the stack's
own counters once it really placed the same model on the CPU (to the byte), and the offloaded
optimizer's host bytes against its own."""

from __future__ import annotations

import json

import pytest
import torch
from offloaded_step import device_peak

import apt_model.optimization.vb_global as vb
from apt_model import vgpu
from apt_model.cli import main
from apt_model.errors import VBConfigError, run_cli
from apt_model.estimator import estimate
from apt_model.estimator.levels import parse_levels
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.storage import human_bytes
from apt_model.vgpu.layout import Layout, tensor_slots

MIB = 1 << 20
CFG = APTConfig.from_preset("tiny", n_layers=6, max_seq_len=64)
X = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def levels(tmp_path, model: APTModel) -> list[dict]:
    """Level 0 for the rest, one resident block and two slots; host RAM for three blocks; the
    SSD for the others: every kind of level in use."""
    blocks = list(model.blocks)
    size = Layout(tensor_slots(blocks[0].modules())).nbytes
    inside = {id(m) for b in blocks for m in b.modules()}
    rest = Layout(tensor_slots(m for m in model.modules() if id(m) not in inside)).nbytes
    return [{"capacity_mb": (rest + 3 * size) / MIB + 0.01, "device": "cpu", "speed_gbps": 100},
            {"capacity_mb": 3 * size / MIB + 0.01, "device": "cpu", "speed_gbps": 50},
            {"capacity_mb": 64, "device": "ssd", "speed_gbps": 5, "path": str(tmp_path)}]


def held(stats: dict) -> list[tuple[int, int]]:
    return [(lv["resident_bytes"], lv["peak_bytes"]) for lv in stats["levels"]]


def test_decode_placement_is_what_the_stack_holds_on_every_level(tmp_path):
    torch.manual_seed(0)
    model = APTModel(CFG).eval()
    config = levels(tmp_path, model)
    est = estimate(CFG, mode="off", batch=2, seq=12, training=False, levels={"levels": config, "prefetch_depth": 1})
    stack = vgpu.attach(model, list(model.blocks), parse_levels(config).levels, depth=1)
    with torch.no_grad():
        model(X)
    stats = stack.stats()
    placement = est.placement
    assert [(lv.held, lv.held) for lv in placement.levels] == held(stats)
    assert [lv.capacity for lv in placement.levels] == [lv["capacity_bytes"] for lv in stats["levels"]]
    assert (placement.blocks, placement.streamed, placement.depth, placement.slots) == (
        stats["blocks"], stats["streamed_blocks"], stats["depth"], stats["slots"]) == (6, 5, 1, 2)
    assert placement.slot_bytes == stack.plan.slot_bytes
    assert placement.host_bytes == stats["levels"][1]["resident_bytes"] > 0  # no staging on the CPU
    assert placement.disk_bytes == stats["levels"][2]["resident_bytes"] > 0
    # the device holds Level 0 instead of every weight; the step's other tensors are the same
    assert est.peak_bytes == est.traced_peak - est.parameter_bytes - est.buffers + 2 * 12 * 8 + placement.levels[0].held
    vgpu.detach(model)


def test_speed_mode_serving_streams_packed_fp4_as_estimated(tmp_path):
    torch.manual_seed(0)
    model = APTModel(CFG).eval()
    config = {"levels": levels(tmp_path, model), "prefetch_depth": 2}
    config["levels"][0]["capacity_mb"] = 1024
    everything = estimate(CFG, mode="speed", seq=12, training=False, levels=config).placement.levels[0].held
    config["levels"][0]["capacity_mb"] = 0.7 * everything / MIB  # packed FP4 blocks are smaller: some stream
    vb.enable(mode="speed", verbose=False, vgpu_config=config)
    vb.optimize(model)
    vb.freeze_fp4(model)
    with torch.no_grad():
        model(X)
    stack = vb.get_stats()["vgpu"]["stacks"][0]
    est = estimate(CFG, mode="speed", batch=2, seq=12, training=False, levels=config)
    assert "nvfp4 packed" in est.parameters
    assert [(lv.held, lv.held) for lv in est.placement.levels] == held(stack)
    assert est.placement.streamed == stack["streamed_blocks"] > 0 and est.placement.depth == stack["depth"]


HOST_LEVELS = [{"capacity_mb": 64, "device": "cpu", "speed_gbps": 100},
               {"capacity_mb": 256, "device": "cpu", "speed_gbps": 50}]


def offloaded_balanced() -> tuple[APTModel, torch.optim.Optimizer]:
    """A seeded APT model in balanced mode over two host RAM levels (every block in Level 0),
    its AdamW offloaded."""
    torch.manual_seed(0)
    model = APTModel(CFG).train()
    vb.enable(mode="balanced", verbose=False, vgpu_config={"levels": HOST_LEVELS})
    vb.optimize(model)
    return model, vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))


def test_training_offloads_masters_and_adamw_state_to_the_host_as_estimated():
    model, optimizer = offloaded_balanced()
    model(X, labels=X).loss.backward()
    optimizer.step()
    stack = vb.get_stats()["vgpu"]["stacks"][0]
    host = optimizer.stats()
    est = estimate(CFG, mode="balanced", batch=2, seq=12, levels=HOST_LEVELS)
    placement = est.placement
    assert [(lv.held, lv.held) for lv in placement.levels] == held(stack)
    assert placement.streamed == 0 and placement.levels[0].held == est.parameter_bytes + est.buffers - 2 * 12 * 8
    assert placement.offloaded == host["host_bytes"] and placement.offload_steps == 4 * host["params"]
    assert host["param_bytes"] == est.parameter_bytes
    # on the device: no optimizer state, no gradient left after the step
    assert est.optimizer_state == 0 and est.gradients == 0
    resident = estimate(CFG, mode="balanced", batch=2, seq=12, device="cpu")
    assert est.peak_bytes < resident.peak_bytes - resident.optimizer_state
    public = vb.estimate(CFG, mode="balanced", batch=2, seq=12, levels=HOST_LEVELS)  # the public verb
    assert public.peak_bytes == est.peak_bytes and public.placement.levels == placement.levels
    optimizer.release()


def test_optimizer_state_past_the_host_ram_level_goes_to_the_ssd_as_estimated(tmp_path):
    """Every block resident, a host RAM level with room for part of the optimizer's state:
    the rest in SSD swap files, host and disk bytes the optimizer's own."""
    torch.manual_seed(0)
    model = APTModel(CFG).train()
    config = [{"capacity_mb": 64, "device": "cpu", "speed_gbps": 100},
              {"capacity_mb": 8, "device": "cpu", "speed_gbps": 50},
              {"capacity_mb": 64, "device": "ssd", "speed_gbps": 5, "path": str(tmp_path)}]
    vb.enable(mode="balanced", verbose=False, vgpu_config={"levels": config})
    vb.optimize(model)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))
    host = optimizer.stats()
    optimizer.release()
    placement = estimate(CFG, mode="balanced", batch=2, seq=12, levels=config).placement
    assert (placement.offloaded, placement.offload_disk) == (host["host_bytes"], host["disk_bytes"])
    assert host["host_bytes"] > 0 and host["disk_bytes"] > 0 and placement.disk_bytes == host["disk_bytes"]
    assert "offloaded optimizer (SSD)" in "\n".join(placement.lines())


def test_levels_that_cannot_hold_the_model_name_the_shortfall():
    small = [{"capacity_mb": 0.1, "device": "cuda:0", "speed_gbps": 100}, {"capacity_mb": 1, "device": "cpu",
                                                                          "speed_gbps": 50}]
    with pytest.raises(VBConfigError, match="short by"):
        estimate(CFG, mode="off", training=False, seq=12, levels=small)  # no CUDA needed here
    with pytest.raises(VBConfigError, match="is not the estimate's device"):
        estimate(CFG, mode="off", seq=12, levels=small, device="cpu")


def vb_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = run_cli(main, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_levels_print_what_each_level_holds_and_the_device_peak_fits(capsys, tmp_path):
    config = json.dumps([{"capacity_mb": 0.6, "device": "cpu", "speed_gbps": 100},
                         {"capacity_mb": 16, "device": "cpu", "speed_gbps": 50}])
    code, out, err = vb_cli(capsys, "estimate", "--preset", "tiny", "--seq", "8", "--decode", "--mode", "speed",
                            "--levels", config, "--memory", "1GiB")
    assert code == 0, err
    est = estimate("tiny", mode="speed", seq=8, training=False, levels=json.loads(config))
    assert est.placement.streamed > 0
    assert f"L1 {'cpu':<10}{human_bytes(est.placement.levels[1].held):>12} / 16.0 MiB" in out
    assert out.rstrip().endswith("fits (--memory 1.0 GiB)")
    # a file works too; --mode all places each mode: a training step streams its blocks only
    # where the stack trains them (checkpointed, AdamW offloaded)
    (tmp_path / "levels.json").write_text(config.replace("0.6", "1.2"))
    code, out, err = vb_cli(capsys, "estimate", "--preset", "tiny", "--seq", "8", "--levels",
                            str(tmp_path / "levels.json"), "--mode", "all")
    assert code == 0 and out.count("  VGPU: 4 blocks, 0 resident, 4 streamed") == 2, err
    assert "mode memory · training (adamw)" in out and "mode full · training (adamw)" in out
    assert "offloaded optimizer (host)" in out
    for mode in ("off", "balanced", "speed"):
        assert (f"mode {mode}: the levels of --levels cannot hold it: training 4 streamed blocks needs activation "
                "checkpointing (mode memory or full" in out)
    code, out, err = vb_cli(capsys, "estimate", "--preset", "tiny", "--seq", "8", "--levels",
                            str(tmp_path / "levels.json"), "--mode", "memory", "--optimizer", "sgd")
    assert code == 2 and "needs the offloaded AdamW (vb.offload_optimizer)" in err


def test_cli_takes_the_configured_levels_and_names_them_when_they_cannot_hold_the_model(capsys, monkeypatch,
                                                                                          tmp_path):
    vbrc = tmp_path / ".vbrc"
    vbrc.write_text(json.dumps({"vgpu_config": {"levels": [{"capacity_mb": 0.01, "device": "cpu", "speed_gbps": 1},
                                                           {"capacity_mb": 0.01, "device": "cpu",
                                                            "speed_gbps": 1}]}}))
    monkeypatch.setenv("VB_CONFIG", str(vbrc))
    code, out, err = vb_cli(capsys, "estimate", "--preset", "tiny", "--seq", "8", "--mode", "all")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert f"the levels of .vbrc:{vbrc} cannot hold it" in lines[0] and "short by" in lines[0]


def test_an_offloaded_training_step_on_the_device_is_a_real_one_to_the_byte():
    """The step's own tensors with AdamW offloaded (no state on the device, each gradient gone
    once final), against the same tracker on a real CPU step with ``vb.offload_optimizer``: its
    host steps run in a worker thread, which the tracker does not see, and its host buffers
    (which the main thread copies gradients into) are counted from the start and taken off."""
    model, optimizer = offloaded_balanced()
    ids = torch.randint(0, CFG.vocab_size, (2, 32))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    measured = device_peak(model, optimizer, step, [ids])
    optimizer.release()
    est = estimate(CFG, mode="balanced", batch=2, seq=32, levels=HOST_LEVELS)
    assert est.traced_peak == measured  # to the byte
    assert est.peak_bytes == est.traced_peak  # every block in Level 0, on the model's own device


def test_a_streamed_training_step_is_estimated_as_the_stack_runs_it(tmp_path, native_bf16):
    """Memory mode (checkpointed, bf16 autocast), one block resident, three in host RAM, two on
    the SSD, AdamW offloaded: each level's bytes are the stack's own counters and the offloaded
    optimizer's host bytes its own; the device peak is the same tracker's on a real CPU step, to
    the byte (the stack's Level 0 buffers counted from the start, its host homes, the
    optimizer's arena and step counters taken off). Without releasing the streamed blocks'
    weight casts, as the stack does, the trace would be the bf16 copies of every weight over."""
    torch.manual_seed(0)
    model = APTModel(CFG).train()
    config = {"levels": levels(tmp_path, model), "prefetch_depth": 1}
    vb.enable(mode="memory", verbose=False, vgpu_config=config)
    vb.optimize(model)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))
    stack = vgpu.stack_of(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 32))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    measured = device_peak(model, optimizer, step, [ids], stack)
    stats, host = stack.stats(), optimizer.stats()
    optimizer.release()

    est = estimate(CFG, mode="memory", batch=2, seq=32, levels=config)
    placement = est.placement
    assert (placement.streamed, placement.slots, placement.depth) == (stats["streamed_blocks"], stats["slots"],
                                                                      stats["depth"]) == (5, 2, 1)
    assert [(lv.held, lv.held) for lv in placement.levels] == held(stats)
    assert placement.slot_bytes == stack.plan.slot_bytes
    assert placement.offloaded == host["host_bytes"] and placement.offload_steps == 4 * host["params"]
    # the host RAM level is full of blocks: the masters and moments live in swap files on the SSD
    assert placement.offload_disk == host["disk_bytes"] > 0
    assert placement.disk_bytes == stats["levels"][2]["resident_bytes"] + host["disk_bytes"]
    assert est.peak_bytes == measured  # to the byte
    assert est.peak_bytes < estimate(CFG, mode="memory", batch=2, seq=32).peak_bytes  # streaming is the point
    # the step's own tensors with every block resident hold the bf16 casts of every weight
    resident = estimate(CFG, mode="memory", batch=2, seq=32,
                        levels=[{**config["levels"][0], "capacity_mb": 64}, config["levels"][1]])
    own, own_streamed = (resident.peak_bytes - resident.placement.levels[0].held,
                         est.peak_bytes - placement.levels[0].held)
    assert own > own_streamed


def test_full_mode_on_an_accelerator_is_traced_with_the_optimizer_offloaded():
    """Mode full offloads AdamW on an accelerator (``offload_optimizer``), so its estimate
    holds no optimizer state and no gradient after the step there; on the CPU, with the
    switch off, or in another mode, the state stays on the device."""
    from apt_model.optimization.config import VBConfig

    offloaded = estimate(CFG, mode="full", batch=2, seq=12, device="cuda:0")
    assert offloaded.optimizer_state == 0 and offloaded.gradients == 0
    on_cpu = estimate(CFG, mode="full", batch=2, seq=12, device="cpu")
    kept = estimate(CFG, mode="full", batch=2, seq=12, device="cuda:0", base=VBConfig(offload_optimizer=False))
    memory = estimate(CFG, mode="memory", batch=2, seq=12, device="cuda:0")
    assert min(on_cpu.optimizer_state, kept.optimizer_state, memory.optimizer_state) > 0
    assert offloaded.peak_bytes < kept.peak_bytes
