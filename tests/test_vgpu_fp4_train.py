"""Full mode (FP4 layers holding master weights, fused attention, bf16 autocast, checkpointed
blocks) trains through the VGPU stack: the streamed blocks carry the master weights, which
each use quantizes from the slot and which no FP4 layer keeps a packed copy of; training and
the evaluations between steps equal the resident model's with the same offloaded AdamW, bit
for bit on the CPU (the FP4 reference path is deterministic), within Level 0's capacity, and
VB's trainer streams full mode and resumes exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_vgpu_train import same_weights
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model import vgpu
from apt_model.fp4.layer import FP4Linear
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.vgpu.layout import Layout, tensor_slots

MIB = 1 << 20
CFG = APTConfig.from_preset("tiny", n_layers=4)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def full_apt(dtype: torch.dtype, vgpu_config: dict | None = None, device: str = "cpu") -> APTModel:
    """The tiny APT model with 4 blocks in ``dtype`` on ``device``, optimized in full mode
    (over ``vgpu_config``'s levels where given)."""
    torch.manual_seed(0)
    model = APTModel(CFG).to(device=device, dtype=dtype).train()
    vb.optimize(model, mode="full", verbose=False, vgpu_config=vgpu_config)
    return model


def layout_bytes(modules: list[nn.Module]) -> int:
    return Layout(tensor_slots(modules)).nbytes


def fp4_layers(module: nn.Module) -> list[FP4Linear]:
    return [m for m in module.modules() if isinstance(m, FP4Linear)]


def levels_for(model: APTModel, tmp_path: Path, device: str = "cpu") -> dict:
    """Level 0 for the rest of the model, block 0 and two slots (one block fetched ahead);
    host RAM for block 1, the SSD (under ``tmp_path``) for blocks 2 and 3."""
    blocks = list(model.blocks)
    size = layout_bytes(list(blocks[0].modules()))
    inside = {id(m) for b in blocks for m in b.modules()}
    rest = layout_bytes([m for m in model.modules() if id(m) not in inside])
    return {"levels": [{"capacity_mb": (rest + 3 * size) / MIB + 0.01, "device": device, "speed_gbps": 100},
                       {"capacity_mb": size / MIB + 0.01, "device": "cpu", "speed_gbps": 50},
                       {"capacity_mb": 64, "device": "ssd", "speed_gbps": 5, "path": str(tmp_path)}],
            "prefetch_depth": 1}


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (2, 16), generator=g) for _ in range(n)]


@torch.no_grad()
def evaluate(model: APTModel, x: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode under ``no_grad`` (FP4 layers multiply by the packed weight)."""
    model.eval()
    logits = model(x).logits
    model.train()
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_mode_trains_streamed_master_weights_bit_for_bit_like_resident(tmp_path, dtype):
    """Four steps of the user's loop with an evaluation before each: the same logits, losses,
    weights and optimizer state as the resident full-mode model with the offloaded AdamW.
    The streamed blocks' FP4 layers keep no packed weight (the resident ones do), the master
    weights travel in the model's dtype, and Level 0 stays within its capacity. Detached, the
    layers keep their packed weight again."""
    reference = full_apt(dtype)
    ref_opt = vb.offload_optimizer(reference, torch.optim.AdamW(reference.parameters(), **HYPER))
    model = full_apt(dtype, levels_for(reference, tmp_path))
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER))
    stack = vgpu.stack_of(model)
    assert stack.plan.homes == (0, 1, 2, 2) and stack.plan.slots == 2
    streamed = [layer for block in model.blocks[1:] for layer in fp4_layers(block)]
    assert streamed and not any(layer.frozen for layer in streamed)
    assert all(layer.weight.dtype == dtype for layer in streamed)
    steps = 4
    for x in batches(steps):
        assert torch.equal(evaluate(model, x), evaluate(reference, x))
        assert all(layer._packed is None for layer in streamed)  # quantized at the use, not kept
        assert all(layer._packed is not None for layer in fp4_layers(reference))
        losses = []
        for m, opt in ((model, optimizer), (reference, ref_opt)):
            loss = m(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == losses[1]
    assert same_weights(model, reference)
    ours, theirs = optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    assert all(torch.equal(ours[i][k], v) for i in theirs for k, v in theirs[i].items())

    l0, l1, l2 = stack.stats()["levels"]
    # uses per step: 4 blocks in the evaluation, 4 forwards and 3 backwards (block 0 is resident)
    assert l0["hits"] + l0["misses"] == 11 * steps and l0["peak_bytes"] <= l0["capacity_bytes"]
    per_block = sum(p.nbytes for p in model.blocks[1].parameters())  # the masters, in the model's dtype
    size = layout_bytes(list(model.blocks[1].modules()))
    assert (l1["bytes_in"], l2["bytes_in"]) == (size + per_block * steps, 2 * size + 2 * per_block * steps)
    assert optimizer.stats()["weight_bytes_home"] == 3 * per_block * steps

    vgpu.detach(model)
    x = batches(1)[0]
    assert torch.equal(evaluate(model, x), evaluate(reference, x))
    assert all(layer._packed is not None for layer in streamed)


def test_frozen_after_training_streams_packed_fp4(tmp_path):
    """Trained streamed in full mode, then frozen for serving: what streams is packed FP4 (a
    smaller slot), and the outputs equal the frozen resident model's."""
    reference = full_apt(torch.float32)
    ref_opt = vb.offload_optimizer(reference, torch.optim.AdamW(reference.parameters(), **HYPER))
    model = full_apt(torch.float32, levels_for(reference, tmp_path))
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER))
    for x in batches(2):
        for m, opt in ((model, optimizer), (reference, ref_opt)):
            m(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    master_slot = vgpu.stack_of(model).plan.slot_bytes
    vb.freeze_fp4(model)
    vb.freeze_fp4(reference)
    stack = vgpu.stack_of(model)
    assert stack.placed and stack.plan.slot_bytes < master_slot / 4
    x = batches(3)[2]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    l0 = stack.stats()["levels"][0]
    assert l0["peak_bytes"] <= l0["capacity_bytes"]


def test_vb_trainer_streams_blocks_in_full_mode_and_resumes_bit_for_bit(tmp_path):
    """VB's trainer, zero added lines: full mode with Level 0 holding one slot and every block
    streamed from host RAM, evaluation and sampling between steps. The losses and validation
    loss equal a run whose Level 0 holds the whole model (the same offloaded AdamW), and a
    resumed run equals the uninterrupted one."""
    from apt_model.training.trainer import TrainConfig, Trainer

    def run(name: str, level0_mb: float, resume: bool = False):
        vb.enable(mode="full", verbose=False,
                  vgpu_config={"levels": [{"capacity_mb": level0_mb, "device": "cpu", "speed_gbps": 100},
                                          {"capacity_mb": 64, "device": "cpu", "speed_gbps": 50}]})
        cfg = TrainConfig(max_steps=4, save_interval=2, eval_interval=2, out_dir=str(tmp_path / name),
                          batch_size=4, seq_len=16, eval_batches=1, sample_tokens=4, progress=False, warmup=2,
                          resume=resume)
        return Trainer(cfg, lambda: APTModel(CFG)).run()

    resident = run("resident", 64)
    stats = vb.get_stats()
    assert stats["vgpu"]["stacks"][-1]["streamed_blocks"] == 0 and stats["layers"]["fp4"] > 0
    full = run("full", 1.3)
    stacks = vb.get_stats()["vgpu"]["stacks"]  # both runs' models, in no set order
    assert sorted(s["streamed_blocks"] for s in stacks) == [0, CFG.n_layers]
    stack = max(stacks, key=lambda s: s["streamed_blocks"])
    assert stack["slots"] == 1
    l0 = stack["levels"][0]
    assert l0["peak_bytes"] <= l0["capacity_bytes"]
    # the streamed run's optimizer writes the new weights home, the resident run's does not
    assert sorted(o["weight_bytes_home"] > 0 for o in vb.get_stats()["vgpu"]["optimizers"]) == [False, True]
    assert (full.losses, full.val_loss) == (resident.losses, resident.val_loss)
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "ckpt-00000004")
    resumed = run("full", 1.3, resume=True)
    assert (resumed.losses, resumed.val_loss) == (full.losses, full.val_loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_mode_streamed_on_cuda_equals_resident_offloaded(tmp_path, monkeypatch):
    """On a GPU (the slot's bf16 master weights quantized by the Triton kernels at each use,
    side-stream fetches from pinned host RAM and SSD swap files): the same losses and weights
    as the resident full-mode model under the same offloaded AdamW, bit for bit with
    deterministic kernels (attention by the math kernel); the resident run twice first, so a
    mismatch tells nondeterministic kernels from streaming. Level 0 stays within its capacity."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    xs = [x.cuda() for x in batches(4)]
    config = levels_for(full_apt(torch.bfloat16), tmp_path, "cuda")

    def run(vgpu_config: dict | None) -> tuple[APTModel, list[float]]:
        model = full_apt(torch.bfloat16, vgpu_config, "cuda")
        optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER))
        losses = []
        for x in xs:
            loss = model(x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return model, losses

    try:
        with sdpa_kernel(SDPBackend.MATH):
            reference, expected = run(None)
            assert run(None)[1] == expected, "two resident runs differ"
            model, losses = run(config)
    finally:
        torch.use_deterministic_algorithms(False)
    assert losses == expected and same_weights(model, reference)
    stack = vgpu.stack_of(model)
    assert stack.plan.homes == (0, 1, 2, 2)
    l0 = stack.stats()["levels"][0]
    assert l0["peak_bytes"] <= l0["capacity_bytes"] and l0["hits"] + l0["misses"] == 7 * len(xs)
