"""Training through the VGPU stack: blocks streamed from host RAM and SSD swap files, under
activation checkpointing, with the offloaded AdamW, train bit for bit like the resident model
(CPU: the same kernels, recomputation included). Backward fetches are counted as uses,
gradients leave as each block's backward ends, accumulation sums on the host, checkpoints
resume exactly, and what cannot be trained is refused in one line."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import apt_model.optimization.vb_global as vb
from apt_model import vgpu
from apt_model.errors import VBUnsupportedError
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization.checkpointing import apply_checkpointing
from apt_model.optimization.config import VGPULevel as Level
from apt_model.vgpu.layout import Layout, tensor_slots

MIB = 1 << 20
CFG = APTConfig.from_preset("tiny", n_layers=6)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def apt(device: str = "cpu") -> APTModel:
    torch.manual_seed(0)
    return APTModel(CFG).to(device).train()


def layout_bytes(modules: list[nn.Module]) -> int:
    return Layout(tensor_slots(modules)).nbytes


def levels_for(model: nn.Module, blocks: list[nn.Module], tmp_path: Path | None, resident: int = 1, slots: int = 2,
               in_host: int = 3, device: str = "cpu") -> list[Level]:
    """Level 0 for the rest, ``resident`` blocks and ``slots`` slots; host RAM for ``in_host``
    blocks; the SSD (under ``tmp_path``) for the others."""
    size = layout_bytes(list(blocks[0].modules()))
    inside = {id(m) for b in blocks for m in b.modules()}
    rest = layout_bytes([m for m in model.modules() if id(m) not in inside])
    levels = [Level((rest + (resident + slots) * size) / MIB + 0.01, device, 100),
              Level(in_host * size / MIB + 0.01, "cpu", 50)]
    if tmp_path is not None:
        levels.append(Level(64, "ssd", 5, str(tmp_path)))
    return levels


def streamed_apt(tmp_path: Path, device: str = "cpu", **kwargs) -> tuple[APTModel, vgpu.VGPUStack]:
    """The same init as ``apt()``, checkpointed, block 0 resident, blocks 1-3 in host RAM and
    4-5 on the SSD, two Level 0 slots (one block fetched ahead)."""
    model = apply_checkpointed(apt(device))
    stack = vgpu.attach(model, list(model.blocks), levels_for(model, list(model.blocks), tmp_path, device=device),
                        depth=1, **kwargs)
    return model, stack


def apply_checkpointed(model: APTModel) -> APTModel:
    apply_checkpointing(model)
    return model


def batches(n: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (2, 16), generator=g).to(device) for _ in range(n)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, xs: list[torch.Tensor], clip: float | None = None,
          per_step: int = 1) -> list[float]:
    """The user's loop, unchanged: ``per_step`` backwards per step (accumulation, each loss
    scaled by 1 / per_step), device clipping when ``clip``."""
    losses = []
    for k, x in enumerate(xs):
        loss = model(x, labels=x).loss
        (loss / per_step).backward()
        losses.append(loss.item())
        if (k + 1) % per_step == 0:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
    return losses


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Equal state dicts (compared on the CPU: a streamed block's tensors show their home)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_streamed_training_equals_resident_bit_for_bit_and_counts_backward_fetches(tmp_path):
    reference = apt()
    ref_opt = torch.optim.AdamW(reference.parameters(), fused=True, **HYPER)
    model, stack = streamed_apt(tmp_path)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER))
    assert stack.plan.homes == (0, 1, 1, 1, 2, 2) and stack.plan.slots == 2
    steps = 4
    xs = batches(steps)
    assert train(model, optimizer, xs) == train(reference, ref_opt, xs)
    assert same_weights(model, reference)
    ours, theirs = optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    assert all(torch.equal(ours[i][k], v) for i in theirs for k, v in theirs[i].items())
    assert all(p.grad is None for p in model.parameters())  # every gradient left the device

    l0, l1, l2 = stack.stats()["levels"]
    size = layout_bytes(list(model.blocks[0].modules()))
    # Uses per step: 6 forwards and 5 backwards (blocks 1-5 stream; block 0 is resident), all
    # fetched ahead. Copies: the first forward fetches 1, 2 at block 0, then 3, 4, 5 after 1,
    # 2, 3; the backward holds 5, 4 from the forward and fetches 3, 2, 1 after 5, 4, 3 end;
    # the step writes 1-5 home, and refetches 1, 2 for the next forward, which fetches 3, 4, 5.
    assert (l0["hits"], l0["misses"]) == (11 * steps, 0)
    promotions = 10 + 8 * (steps - 1)
    assert (l0["promotions"], l0["prefetches"]) == (promotions, promotions)
    assert l0["bytes_in"] == promotions * size
    assert l1["bytes_out"] == (8 + 6 * (steps - 1)) * size  # blocks 1-3: forward, backward, after the step
    assert l2["bytes_out"] == 2 * steps * size  # blocks 4, 5: in the forward only
    # the step writes each streamed block's parameters into its home, every step
    per_block = sum(p.nbytes for p in model.blocks[1].parameters())
    assert (l1["bytes_in"], l2["bytes_in"]) == ((3 * size + 3 * per_block * steps), 2 * size + 2 * per_block * steps)
    assert l0["peak_bytes"] <= l0["capacity_bytes"]
    s = optimizer.stats()
    assert s["weight_bytes_home"] == steps * 5 * per_block
    assert s["weight_bytes_back"] == steps * (s["param_bytes"] - 5 * per_block)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_accumulated_gradients_equal_the_device_sums(tmp_path, clip):
    """Two backwards per step: the host sums equal the resident model's ``.grad`` (after the
    first backward; with clipping, whose steps start in step(), after the second too), and
    the weights equal after each step."""
    reference = apt()
    ref_opt = torch.optim.AdamW(reference.parameters(), fused=True, **HYPER)
    model, _ = streamed_apt(tmp_path)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER), accumulate=2,
                                     max_grad_norm=clip)
    xs = batches(6)
    for k, x in enumerate(xs):
        (reference(x, labels=x).loss / 2).backward()
        (model(x, labels=x).loss / 2).backward()
        started = clip is None and k % 2 == 1  # the overlapped steps started in this backward
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert p.grad is None
            assert optimizer.host_grad(p) is None if started else torch.equal(optimizer.host_grad(p), q.grad)
        if k % 2 == 1:
            if clip:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
            ref_opt.step()
            ref_opt.zero_grad()
            optimizer.step()
            optimizer.zero_grad()
            assert same_weights(model, reference)
    assert optimizer.stats()["overlap"] is (clip is None)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_hf_llama_trains_streamed_under_its_own_checkpointing():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(cfg).train()
    model = copy.deepcopy(reference)
    # the layers call checkpoint(layer.__call__): the stack's hooks run again in the recomputation
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = list(model.model.layers)
    stack = vgpu.attach(model, layers, levels_for(model, layers, None, resident=0, in_host=4))
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER))
    ref_opt = torch.optim.AdamW(reference.parameters(), fused=True, **HYPER)
    assert stack.plan.streamed == [0, 1, 2, 3]
    xs = batches(3)
    assert train(model, optimizer, xs) == train(reference, ref_opt, xs)
    assert same_weights(model, reference)
    l0 = stack.stats()["levels"][0]
    # 4 forward and 4 backward uses a step; only the very first block was not fetched ahead
    assert (l0["hits"] + l0["misses"], l0["misses"]) == (8 * 3, 1)


def test_frozen_streamed_blocks_pass_gradients_to_the_rest(tmp_path):
    """Streamed blocks frozen, the embedding and head trained by a plain AdamW on Level 0:
    each block's slot is held until the gradient of its input is computed."""
    reference = apt()
    model, stack = streamed_apt(tmp_path)
    for m in (reference, model):
        for p in m.blocks.parameters():
            p.requires_grad_(False)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], fused=True, **HYPER)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True, **HYPER)
    xs = batches(3)
    assert train(model, optimizer, xs) == train(reference, ref_opt, xs)
    assert same_weights(model, reference)
    l0 = stack.stats()["levels"][0]
    assert (l0["hits"], l0["misses"]) == (11 * 3, 0)


def test_checkpoint_resumes_bit_for_bit_and_stale_slots_are_fetched_again(tmp_path):
    """Save after two steps, train on, then load the checkpoint into the same streamed model:
    ``load_state_dict`` writes the homes through the parameters, so the slots' copies (the
    next forward's first blocks, fetched after the last step) are out of date and are
    fetched again; the run repeats exactly."""
    xs = batches(4)
    model, stack = streamed_apt(tmp_path)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER))
    train(model, optimizer, xs[:2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = train(model, optimizer, xs[2:])
    after = copy.deepcopy(model.state_dict())
    buffer.seek(0)
    saved = torch.load(buffer)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    misses = stack.stats()["levels"][0]["misses"]
    assert train(model, optimizer, xs[2:]) == expected
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())
    assert stack.stats()["levels"][0]["misses"] == misses + 2  # the two stale slots

    resumed, _ = streamed_apt(tmp_path)  # and a fresh streamed model resumes from it
    resumed_opt = vb.offload_optimizer(resumed, torch.optim.AdamW(resumed.parameters(), **HYPER))
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    assert train(resumed, resumed_opt, xs[2:]) == expected and same_weights(resumed, model)


def test_vb_trainer_streams_blocks_in_memory_mode_and_resumes_bit_for_bit(tmp_path):
    """VB's trainer, zero added lines: memory mode (bf16 autocast, checkpointed blocks, fused
    loss) with Level 0 holding one slot, every block streamed from the SSD, the optimizer's
    masters and moments there too; evaluation and sampling between steps; a resumed run
    equals the uninterrupted one."""
    import shutil

    from apt_model.training.trainer import TrainConfig, Trainer

    cfg4 = APTConfig.from_preset("tiny", n_layers=4)
    vb.enable(mode="memory", verbose=False,
              vgpu_config={"levels": [{"capacity_mb": 1.3, "device": "cpu", "speed_gbps": 100},
                                      {"capacity_mb": 64, "device": "ssd", "speed_gbps": 5, "path": str(tmp_path)}]})
    cfg = TrainConfig(max_steps=4, save_interval=2, eval_interval=2, out_dir=str(tmp_path / "run"), batch_size=4,
                      seq_len=16, eval_batches=1, sample_tokens=4, progress=False, warmup=2)
    full = Trainer(cfg, lambda: APTModel(cfg4)).run()
    stack = vb.get_stats()["vgpu"]["stacks"][-1]
    assert stack["streamed_blocks"] == 4 and stack["slots"] == 1
    optimizer = vb.get_stats()["vgpu"]["optimizers"][-1]
    assert optimizer["weight_bytes_home"] > 0
    assert optimizer["disk_bytes"] > 0  # no host RAM level: masters and moments in swap files on the SSD
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "ckpt-00000004")
    cfg.resume = True
    resumed = Trainer(cfg, lambda: APTModel(cfg4)).run()
    assert resumed.losses == full.losses


def test_training_without_checkpointing_is_refused_in_one_line(tmp_path, monkeypatch):
    model = apt()
    vgpu.attach(model, list(model.blocks), levels_for(model, list(model.blocks), tmp_path), depth=1)
    vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))
    x = batches(1)[0]
    with pytest.raises(VBUnsupportedError, match=r"training streamed block 1 \(APTBlock\) needs activation "
                                                  r"checkpointing \(non-reentrant") as err:
        model(x, labels=x)
    assert "\n" not in str(err.value)
    monkeypatch.delenv("VB_LANG")
    with pytest.raises(VBUnsupportedError, match="需要激活检查点"):
        model(x, labels=x)
    with torch.no_grad():  # inference is unaffected, and nothing stayed bound to a slot
        assert torch.equal(model(x).logits, apt()(x).logits)


def test_streamed_weights_need_the_offloaded_optimizer(tmp_path):
    model, _ = streamed_apt(tmp_path)
    torch.optim.AdamW(model.parameters())
    x = batches(1)[0]
    with pytest.raises(VBUnsupportedError, match=r"block 1 \(APTBlock\) streams from a lower level; training its "
                                                  r"weights needs optimizer = vb.offload_optimizer") as err:
        model(x, labels=x)
    assert "\n" not in str(err.value)


def test_reentrant_checkpointing_is_refused():
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=True)
            return x

    model = Stack()
    size = layout_bytes(list(model.blocks[0].modules()))
    vgpu.attach(model, list(model.blocks), [Level(2 * size / MIB + 0.01, "cpu", 100), Level(64, "cpu", 50)])
    vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(VBUnsupportedError, match="reentrant checkpointing is not supported; use "
                                                 r"torch.utils.checkpoint\(..., use_reentrant=False\)"):
        model(torch.randn(3, 64, requires_grad=True)).sum().backward()


def test_a_forward_before_the_step_of_an_overlapped_backward_is_refused(tmp_path):
    model, _ = streamed_apt(tmp_path)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER))
    x = batches(1)[0]
    model(x, labels=x).loss.backward()
    with pytest.raises(VBUnsupportedError, match=r"are being written home \(optimizer.step\(\) has not run yet\)"):
        model(x, labels=x)
    optimizer.step()
    model(x, labels=x).loss.backward()  # the failed forward left nothing behind
    optimizer.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per_step", [1, 2])
def test_streamed_training_on_cuda_equals_resident_offloaded(tmp_path, monkeypatch, per_step):
    """On a GPU (side-stream fetches from pinned host RAM and SSD swap files, in forward and
    in reverse in backward; gradients off and accumulated on the host): the same losses and
    weights as the resident model trained by the same offloaded AdamW, bit for bit with
    deterministic kernels (attention by the math kernel: the fused kernels' backward is not
    deterministic, and two runs are compared). Level 0 stays within its capacity; every use
    was counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            reference = apply_checkpointed(apt("cuda"))
            ref_opt = vb.offload_optimizer(reference, torch.optim.AdamW(reference.parameters(), **HYPER),
                                           accumulate=per_step)
            model, stack = streamed_apt(tmp_path, device="cuda")
            optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER), accumulate=per_step)
            xs = batches(4 * per_step, "cuda")
            expected = train(reference, ref_opt, xs, per_step=per_step)
            control = apply_checkpointed(apt("cuda"))  # the resident run again: the kernels are deterministic
            control_opt = vb.offload_optimizer(control, torch.optim.AdamW(control.parameters(), **HYPER),
                                               accumulate=per_step)
            assert train(control, control_opt, xs, per_step=per_step) == expected, "two resident runs differ"
            assert train(model, optimizer, xs, per_step=per_step) == expected
            assert same_weights(model, reference)
    finally:
        torch.use_deterministic_algorithms(False)
    l0 = stack.stats()["levels"][0]
    assert l0["hits"] + l0["misses"] == 11 * len(xs) and l0["peak_bytes"] <= l0["capacity_bytes"]
    assert l0["stall_s"] >= 0 and optimizer.stats()["pinned"]



@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_in_a_streamed_backward_leaves_a_resumable_run(tmp_path, signals):
    """Ctrl-C inside a streamed block's backward under VB's trainer. Once: the step in flight
    finishes (its host steps are not left half done), its checkpoint is saved, and the resumed
    run equals the uninterrupted one. Twice: the run stops at once, and the last checkpoint
    saved before it is intact and resumes to the same losses."""
    import signal

    from apt_model.errors import VBInterrupted
    from apt_model.training.checkpoint import load_checkpoint
    from apt_model.training.trainer import TrainConfig, Trainer

    cfg4 = APTConfig.from_preset("tiny", n_layers=4)
    vb.enable(mode="memory", verbose=False,
              vgpu_config={"levels": [{"capacity_mb": 1.3, "device": "cpu", "speed_gbps": 100},
                                      {"capacity_mb": 64, "device": "ssd", "speed_gbps": 5, "path": str(tmp_path)}]})

    def run(out: str, interrupt_at: int | None = None, resume: bool = False) -> list[float]:
        calls = {"backward": 0}

        def build() -> APTModel:
            model = APTModel(cfg4)
            if interrupt_at is not None:
                def hook(module: nn.Module, args: tuple) -> None:
                    if torch._C._current_graph_task_id() != -1:  # the recompute, in backward
                        calls["backward"] += 1
                        if calls["backward"] == interrupt_at:
                            for _ in range(signals):
                                signal.raise_signal(signal.SIGINT)
                list(model.blocks[1].modules())[1].register_forward_pre_hook(hook)
            return model

        cfg = TrainConfig(max_steps=5, save_interval=2, eval_interval=0, out_dir=out, batch_size=4, seq_len=16,
                          eval_batches=1, sample_tokens=0, progress=False, warmup=2, resume=resume)
        return Trainer(cfg, build).run().losses

    full = run(str(tmp_path / "full"))
    out = str(tmp_path / "cut")
    expected = (VBInterrupted,) if signals == 1 else (KeyboardInterrupt,)
    with pytest.raises(expected):
        run(out, interrupt_at=3)  # in the third step's backward
    saved = load_checkpoint(Path(out) / "checkpoints")
    assert saved["step"] == (3 if signals == 1 else 2)
    assert saved["losses"] == full[:saved["step"]]
    assert run(out, resume=True) == full
