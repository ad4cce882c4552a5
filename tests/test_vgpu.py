"""The VGPU stack on the CPU: blocks streamed from host RAM and SSD swap files give the resident
model's outputs bit for bit, Level 0 stays within its capacity, the counters count what
happened, faults are clear one-line errors, and restore gives the plain model back."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model import vgpu
from apt_model.errors import VBConfigError, VBDataError
from apt_model.fp4.layer import FP4Linear
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization.config import VGPULevel as Level
from apt_model.vgpu import levels as vgpu_levels
from apt_model.vgpu.layout import Layout, tensor_slots
from apt_model.vgpu.placement import make_plan

MIB = 1 << 20
CFG = APTConfig.from_preset("tiny", n_layers=6)


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def apt() -> APTModel:
    torch.manual_seed(0)
    return APTModel(CFG).eval()


def block_bytes(block: nn.Module) -> int:
    return Layout(tensor_slots(block.modules())).nbytes


def rest_bytes(model: nn.Module, blocks: list[nn.Module]) -> int:
    inside = {id(m) for b in blocks for m in b.modules()}
    return Layout(tensor_slots(m for m in model.modules() if id(m) not in inside)).nbytes


def mb(nbytes: int) -> float:
    return nbytes / MIB


def stack_levels(model: APTModel, tmp_path: Path, resident: int = 1, depth: int = 1,
                 in_host: int = 3) -> list[Level]:
    """Level 0 for the rest, ``resident`` blocks and ``depth + 1`` slots; host RAM for
    ``in_host`` blocks; the SSD (under ``tmp_path``) for the others."""
    blocks = list(model.blocks)
    size = block_bytes(blocks[0])
    level0 = rest_bytes(model, blocks) + (resident + depth + 1) * size
    return [Level(mb(level0) + 0.01, "cpu", 100), Level(mb(in_host * size) + 0.01, "cpu", 50),
            Level(64, "ssd", 5, str(tmp_path))]


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


X = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def test_streamed_apt_model_equals_resident_and_counts_every_event(tmp_path):
    plain = apt()
    model = copy.deepcopy(plain)
    stack = vgpu.attach(model, list(model.blocks), stack_levels(model, tmp_path), depth=1)
    stack.place()
    assert stack.plan.homes == (0, 1, 1, 1, 2, 2)  # most blocks in host RAM, some on the SSD
    assert len(list(tmp_path.glob("vgpu-*/block*.bin"))) == 2

    forwards = 3
    for _ in range(forwards):
        assert torch.equal(logits(model, X), logits(plain, X))
    s = stack.stats()
    l0, l1, l2 = s["levels"]
    size = block_bytes(model.blocks[0])
    # Block 0 is resident; 1..5 stream through 2 slots, one block ahead. The first forward
    # fetches 1 and 2 when block 0 starts, then one block after each of 1..5 (cyclically:
    # 3, 4, 5, 1, 2); every later forward fetches after each of 1..5 again.
    promotions = 7 + 5 * (forwards - 1)
    assert (l0["hits"], l0["misses"]) == (6 * forwards, 0)
    assert (l0["promotions"], l0["prefetches"], l0["demotions"]) == (promotions, promotions, promotions - 2)
    assert l0["bytes_in"] == promotions * size
    assert l1["bytes_out"] == (5 + 3 * (forwards - 1)) * size  # fetches of blocks 1, 2, 3
    assert l2["bytes_out"] == 2 * forwards * size  # fetches of blocks 4, 5
    assert (l1["bytes_in"], l2["bytes_in"]) == (3 * size, 2 * size)
    assert l0["stall_s"] > 0 and l1["achieved_gbps"] > 0 and l2["achieved_gbps"] > 0
    # Level 0 held the rest, the resident block and two slots, measured from the buffers
    held = rest_storage(model) + size + 2 * size
    assert l0["peak_bytes"] == l0["resident_bytes"] == held <= l0["capacity_bytes"]


def rest_storage(model: APTModel) -> int:
    inside = {id(m) for b in model.blocks for m in b.modules()}
    return Layout(tensor_slots(m for m in model.modules() if id(m) not in inside)).storage_bytes()


def test_greedy_generate_is_the_same_token_for_token(tmp_path):
    plain = apt()
    model = copy.deepcopy(plain)
    stack = vgpu.attach(model, list(model.blocks), stack_levels(model, tmp_path, resident=0, depth=0, in_host=4))
    prompt = X[:1, :5]
    expected = plain.generate(prompt, 10, do_sample=False)
    assert torch.equal(model.generate(prompt, 10, do_sample=False), expected)
    l0 = stack.stats()["levels"][0]
    # one slot: every block is fetched after the previous one ends, never on demand but the first
    assert (l0["hits"] + l0["misses"], l0["misses"]) == (6 * 10, 1)


def test_blocks_used_out_of_registration_order_are_learned(tmp_path):
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in reversed(self.blocks):
                x = block(x)
            return x

    plain = Reversed()
    model = copy.deepcopy(plain)
    size = block_bytes(model.blocks[0])
    levels = [Level(mb(3 * size), "cpu", 100), Level(64, "cpu", 50)]
    stack = vgpu.attach(model, list(model.blocks), levels, depth=2)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        first = stack.stats()["levels"][0]["misses"]
        for _ in range(3):
            assert torch.equal(model(x), plain(x))
    assert first > 0  # the guessed order was wrong: demand fetches
    assert stack.stats()["levels"][0]["misses"] == first  # the learned one is right


def test_hf_llama_streamed_equals_resident():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(plain)
    layers = list(model.model.layers)
    size = block_bytes(layers[0])
    level0 = rest_bytes(model, layers) + 2 * size
    stack = vgpu.attach(model, layers, [Level(mb(level0) + 0.01, "cpu", 100), Level(64, "cpu", 50)])
    stack.place()
    assert stack.plan.streamed == [0, 1, 2, 3] and stack.plan.slots == 2
    x = X[:, :8]
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x[:1], **kwargs), plain.generate(x[:1], **kwargs))
    assert stack.stats()["levels"][0]["misses"] == 1  # only the very first fetch was not ahead


def test_speed_mode_streams_packed_fp4_through_vb(tmp_path, capsys):
    plain = apt()
    model = copy.deepcopy(plain)
    vb.optimize(plain, mode="speed", verbose=False)
    vb.freeze_fp4(plain)
    config = {"levels": [{"capacity_mb": 0.5, "device": "cpu", "speed_gbps": 100},
                         {"capacity_mb": 0.3, "device": "cpu", "speed_gbps": 50},
                         {"capacity_mb": 64, "device": "ssd", "speed_gbps": 5, "path": str(tmp_path)}],
              "prefetch_depth": 1}
    vb.enable(mode="speed", verbose=False, vgpu_config=config)
    vb.optimize(model)
    vb.freeze_fp4(model)
    assert vgpu.stack_of(model).placed  # by freeze_fp4, for the packed weights
    homes = vgpu.stack_of(model).plan.homes
    assert 1 in homes and 2 in homes  # streamed from host RAM and from the SSD
    assert torch.equal(logits(model, X), logits(plain, X))
    assert torch.equal(model.generate(X[:1, :4], 6, do_sample=False), plain.generate(X[:1, :4], 6, do_sample=False))
    l0 = vb.get_stats()["vgpu"]["stacks"][0]["levels"][0]
    assert l0["peak_bytes"] <= l0["capacity_bytes"]
    vb.print_stats()
    text = capsys.readouterr().out
    assert "Level 0 hit rate:" in text and "promotions:" in text and "no tiering" not in text


def test_fp4_layers_with_master_weights_stream_them_quantized_at_each_use():
    """Speed mode, not frozen: the streamed blocks carry the master weights, which each use
    quantizes and no layer keeps (a resident model's layers keep their packed weight); the
    outputs equal the resident model's. Frozen, the next forward streams packed FP4."""
    reference = apt()
    vb.optimize(reference, mode="speed", verbose=False)
    model = apt()
    blocks = list(model.blocks)
    level0 = rest_bytes(model, blocks) + block_bytes(blocks[0])  # one slot
    config = {"levels": [{"capacity_mb": mb(level0) + 0.01, "device": "cpu", "speed_gbps": 100},
                         {"capacity_mb": 64, "device": "cpu", "speed_gbps": 50}]}
    vb.optimize(model, mode="speed", verbose=False, vgpu_config=config)
    assert torch.equal(logits(model, X), logits(reference, X))
    stack = vgpu.stack_of(model)
    assert stack.stats()["streamed_blocks"] == CFG.n_layers
    layers = [m for m in model.modules() if isinstance(m, FP4Linear)]
    assert layers and all(m._packed is None for m in layers)
    assert all(m._packed is not None for m in reference.modules() if isinstance(m, FP4Linear))
    slot = stack.plan.slot_bytes
    vb.freeze_fp4(model)  # placed again, for the packed weights
    vb.freeze_fp4(reference)
    assert stack.plan.slot_bytes < slot / 4
    assert torch.equal(logits(model, X), logits(reference, X))
    l0 = stack.stats()["levels"][0]
    assert l0["hits"] == CFG.n_layers and l0["peak_bytes"] <= l0["capacity_bytes"]


def test_restore_gives_back_the_same_parameters_bit_for_bit(tmp_path):
    model = apt()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    vb.enable(mode="balanced", mixed_precision=False, fused_attention=False, fused_loss=False, verbose=False,
              vgpu_config={"levels": [{"capacity_mb": 2, "device": "cpu", "speed_gbps": 100},
                                      {"capacity_mb": 1, "device": "cpu", "speed_gbps": 50},
                                      {"capacity_mb": 64, "device": "ssd", "speed_gbps": 5, "path": str(tmp_path)}]})
    vb.optimize(model)
    logits(model, X)
    folder = vgpu.stack_of(model).lower[1].folder
    assert folder.is_dir()
    state = model.state_dict()  # between uses the tensors show their homes' bytes
    assert all(torch.equal(state[name], value) for name, (_, value) in before.items())
    vb.restore(model)
    assert vgpu.stack_of(model) is None and not folder.exists()
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1]) and p.device.type == "cpu"
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)


@pytest.mark.parametrize("make", ["missing", "file"])
def test_unusable_ssd_directory_is_one_line_before_anything_moves(tmp_path, make):
    path = tmp_path / "swap"
    if make == "file":
        path.write_text("")
    model = apt()
    params = [p.data_ptr() for p in model.parameters()]
    levels = [Level(1, "cpu", 100), Level(0.5, "cpu", 50), Level(64, "ssd", 5, str(path))]
    with pytest.raises(VBDataError, match="does not exist|not writable") as err:
        vgpu.attach(model, list(model.blocks), levels)  # checked when attached, before any forward
    assert "\n" not in str(err.value)
    assert [p.data_ptr() for p in model.parameters()] == params and vgpu.stack_of(model) is None


def test_ssd_directory_too_small_for_the_plan(small_fs):
    model = apt()
    levels = [Level(1, "cpu", 100), Level(0.5, "cpu", 50), Level(64, "ssd", 5, str(small_fs))]
    stack = vgpu.attach(model, list(model.blocks), levels)
    with pytest.raises(VBDataError, match="free; the plan needs"):
        logits(model, X)
    assert not stack.placed


def test_disk_full_while_placing_loses_nothing(tmp_path, disk_fills):
    """The SSD fills up between the plan's free-space check and the second swap file's
    reservation: one clear line, the model untouched, no swap file left behind."""
    model = apt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = disk_fills(2)
    stack = vgpu.attach(model, list(model.blocks), stack_levels(model, tmp_path, in_host=0))
    with pytest.raises(VBDataError, match=f"VGPU SSD directory {tmp_path} is full") as err:
        stack.place()
    assert "\n" not in str(err.value) and len(calls) == 2 and not stack.placed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("vgpu-*/*")), "swap files left behind"


def test_truncated_swap_file_is_a_clear_error(tmp_path):
    model = apt()
    vgpu.attach(model, list(model.blocks), stack_levels(model, tmp_path, in_host=0)).place()
    swap = sorted(tmp_path.glob("vgpu-*/block*.bin"))[-1]
    os.truncate(swap, 100)
    with pytest.raises(VBDataError, match=f"swap file {swap} is truncated: 100 of"):
        logits(model, X)


OPEN_FILES_SCRIPT = """
import resource, sys
from pathlib import Path
soft, hard = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from apt_model.errors import VBConfigError
from apt_model.optimization.config import VGPULevel
from apt_model.vgpu.levels import DiskLevel
level = DiskLevel(2, VGPULevel(64, "ssd", 5, sys.argv[1]), Path(sys.argv[1]))
try:
    for key in range(int(sys.argv[4])):
        level.store(key, 4096)
except VBConfigError as exc:
    print("ERROR", exc)
print("STORED", len(level._files), "SOFT", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
level.close()
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX open-file limits")
def test_swap_files_past_the_soft_open_file_limit_raise_it_and_past_the_hard_one_say_so(tmp_path):
    """Each swap file keeps a descriptor open. The first one stored raises the soft limit to
    the hard one, so 200 files store under a soft limit of 64; with the hard limit at 64 too,
    the file that does not fit is a one-line error naming the limit, and nothing is left behind."""
    import resource
    import subprocess
    import sys

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"hard open-file limit {hard}")
    cap = 1024 if hard == resource.RLIM_INFINITY else min(hard, 1024)

    def run(soft: int, hard: int, files: int) -> str:
        proc = subprocess.run([sys.executable, "-c", OPEN_FILES_SCRIPT, str(tmp_path), str(soft), str(hard), str(files)],
                              capture_output=True, text=True, env={**os.environ, "VB_LANG": "en"}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert f"STORED 200 SOFT {cap}" in run(64, cap, 200)
    out = run(64, 64, 200)
    assert "ERROR VGPU SSD level: out of file descriptors (" in out and "raise the limit (ulimit -n)" in out
    assert "STORED 200" not in out and not list(tmp_path.glob("vgpu-*"))


def test_plan_names_the_shortfall():
    with pytest.raises(VBConfigError, match=r"Level 0 \(1000 B\) cannot hold .* short by 50 B"):
        make_plan([500] * 4, 50, [1000, 10_000], depth=1)  # rest + 2 slots = 1050
    with pytest.raises(VBConfigError, match=r"must place 2.0 KiB below Level 0 .* short by 1.0 KiB"):
        make_plan([512] * 4, 0, [600, 1000])  # Level 0 holds one slot only: all four blocks below
    # all five resident need 510 B; depth 2 (three slots) leaves room below for 3 blocks, not 4:
    # the automatic depth falls back to 1, two slots beside two resident blocks
    plan = make_plan([100] * 5, 10, [509, 200, 100])
    assert (plan.homes, plan.depth, plan.slots, plan.level_bytes) == ((0, 0, 1, 1, 2), 1, 2, (410, 200, 100))
    assert make_plan([100] * 5, 10, [510, 0]).homes == (0,) * 5


def test_level0_refuses_allocations_past_its_capacity():
    level = vgpu_levels.DeviceLevel(Level(1, "cpu", 1), torch.device("cpu"))
    level.allocate(MIB // 2)
    with pytest.raises(VBConfigError, match="cannot take"):
        level.allocate(MIB // 2 + 1)
    assert level.counters.resident_bytes == MIB // 2


def test_refused_pinning_falls_back_to_pageable_with_one_warning(monkeypatch):
    def refuse(nbytes: int) -> torch.Tensor:
        raise RuntimeError("cudaHostAlloc failed: out of memory")

    monkeypatch.setattr(vgpu_levels, "pinned_empty", refuse)
    memory = vgpu_levels.HostMemory(pin=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        buffers = [memory.empty(1024) for _ in range(3)]
    assert len(caught) == 1 and "using pageable memory" in str(caught[0].message)
    assert all(not b.is_pinned() and b.numel() == 1024 for b in buffers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_on_cuda_equals_resident(tmp_path):
    """On a GPU (side-stream copies from pinned host RAM and SSD files, events): logits and
    greedy tokens equal the resident model's, and every use of a block was counted."""
    plain = apt().to("cuda")
    model = copy.deepcopy(plain)
    levels = stack_levels(model, tmp_path)
    levels[0] = Level(levels[0].capacity_mb, "cuda:0", 1000)
    stack = vgpu.attach(model, list(model.blocks), levels, depth=1)
    stack.place()
    x = X.to("cuda")
    for _ in range(3):
        assert torch.equal(logits(model, x), logits(plain, x))
    with torch.no_grad():
        assert torch.equal(model.generate(x[:1], 8, do_sample=False),
                           plain.generate(x[:1], 8, do_sample=False))
    l0 = stack.stats()["levels"][0]
    assert l0["hits"] + l0["misses"] >= 6 * 3 and l0["peak_bytes"] <= l0["capacity_bytes"]
