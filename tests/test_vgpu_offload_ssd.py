"""The offloaded AdamW's masters and moments on the SSD level: where the host RAM levels
(beside what the VGPU stack keeps there) cannot hold them, they live in memory-mapped swap
files, and training is the host RAM run's bit for bit (accumulation and clipping too);
checkpoints move between the two; the split is decided before anything moves, with one-line
errors for an SSD too small or full, and clear ones for a truncated or deleted swap file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from test_vgpu_train import train
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model import vgpu
from apt_model.errors import VBConfigError, VBDataError
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization.config import VGPULevel as Level
from apt_model.vgpu.levels import host_aligned
from apt_model.vgpu.offload import OffloadedAdamW

MIB = 1 << 20
CFG = APTConfig.from_preset("tiny", n_layers=2)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def apt() -> APTModel:
    torch.manual_seed(0)
    return APTModel(CFG).train()


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (2, 16), generator=g) for _ in range(n)]




def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def half_in_host(model: nn.Module) -> float:
    """A host RAM level (MiB) with room for the transfer buffers and about half the masters
    and moments."""
    params = list(model.parameters())
    buffers = sum(host_aligned(p.nbytes) for p in params)
    state = sum(3 * host_aligned(p.nbytes) for p in params)
    return (buffers + state // 2) / MIB


def levels(model: nn.Module, tmp_path: Path, ssd_mb: float = 64) -> list[Level]:
    """Level 0 holds the whole model (no block streams); host RAM for about half the
    optimizer's state; the SSD for the rest."""
    return [Level(64, "cpu", 100), Level(half_in_host(model), "cpu", 50), Level(ssd_mb, "ssd", 5, str(tmp_path))]


def on_ssd(model: nn.Module, tmp_path: Path, **kwargs) -> OffloadedAdamW:
    vgpu.attach(model, list(model.blocks), levels(model, tmp_path))
    return vgpu.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER), **kwargs)


def swap_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("vgpu-*/block*.bin"))


@pytest.mark.parametrize("per_step", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_state_on_the_ssd_trains_bit_for_bit_like_host_ram(tmp_path, per_step, clip):
    xs = batches(6)
    reference = apt()
    in_host = vgpu.offload_optimizer(reference, torch.optim.AdamW(reference.parameters(), **HYPER),
                                     max_grad_norm=clip, accumulate=per_step)
    expected = train(reference, in_host, xs, per_step=per_step)
    model = apt()
    optimizer = on_ssd(model, tmp_path, max_grad_norm=clip, accumulate=per_step)
    assert train(model, optimizer, xs, per_step=per_step) == expected
    assert same_params(model, reference)

    s, ref = optimizer.stats(), in_host.stats()
    files = swap_files(tmp_path)
    assert 0 < len(files) < len(list(model.parameters()))  # some parameters' state in host RAM, the others' on the SSD
    assert s["disk_bytes"] == sum(f.stat().st_size for f in files)
    assert ref["disk_bytes"] == 0 and s["host_bytes"] + s["disk_bytes"] == ref["host_bytes"]
    assert s["host_bytes"] <= levels(model, tmp_path)[1].capacity_mb * MIB
    assert f"SSD {s['disk_bytes'] / MIB:.2f} MiB" in vb._stats().render(
        {**vb.get_stats(), "vgpu": {**vb.get_stats()["vgpu"], "optimizers": [s]}})
    in_host.release()
    optimizer.release()


def test_checkpoints_move_between_host_ram_and_the_ssd_and_resume_bit_for_bit(tmp_path):
    xs = batches(4)
    model = apt()
    optimizer = on_ssd(model, tmp_path)
    train(model, optimizer, xs[:2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = train(model, optimizer, xs[2:])

    buffer.seek(0)
    saved = torch.load(buffer)
    in_host = apt()  # a checkpoint of state on the SSD, resumed in host RAM
    host_opt = vgpu.offload_optimizer(in_host, torch.optim.AdamW(in_host.parameters(), **HYPER))
    in_host.load_state_dict(saved["model"])
    host_opt.load_state_dict(saved["optimizer"])
    assert train(in_host, host_opt, xs[2:]) == expected and same_params(in_host, model)

    model.load_state_dict(saved["model"])  # and back into the swap files (the masters from the weights)
    optimizer.load_state_dict(saved["optimizer"])
    assert train(model, optimizer, xs[2:]) == expected and same_params(in_host, model)
    host_opt.release()
    optimizer.release()


def test_levels_without_a_stack_place_the_state_and_no_ssd_level_keeps_it_in_host_ram(tmp_path):
    model = apt()
    spill = vgpu.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER),
                                   levels=levels(model, tmp_path))
    assert spill.stats()["disk_bytes"] > 0 and swap_files(tmp_path)
    spill.release()
    host_only = vgpu.offload_optimizer(model, torch.optim.AdamW(model.parameters(), **HYPER),
                                       levels=levels(model, tmp_path)[:2])  # no SSD level: as before
    assert host_only.stats()["disk_bytes"] == 0
    host_only.release()


def warm(model: nn.Module) -> torch.optim.AdamW:
    """A plain AdamW with one step's state."""
    optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
    train(model, optimizer, batches(1))
    return optimizer


def untouched(optimizer: torch.optim.AdamW, before: dict) -> bool:
    after = optimizer.state_dict()["state"]
    return after.keys() == before.keys() and all(
        torch.equal(after[i][k], v) for i, s in before.items() for k, v in s.items())


def test_an_ssd_too_small_for_the_state_is_one_line_before_anything_moves(tmp_path):
    model = apt()
    vgpu.attach(model, list(model.blocks), levels(model, tmp_path, ssd_mb=0.5))
    plain = warm(model)
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in plain.state_dict()["state"].items()}
    with pytest.raises(VBConfigError, match="masters and AdamW state need .* more; .* short by") as err:
        vgpu.offload_optimizer(model, plain)
    assert "\n" not in str(err.value) and untouched(plain, before) and not swap_files(tmp_path)


def test_a_full_disk_while_reserving_loses_nothing(tmp_path, disk_fills):
    model = apt()
    vgpu.attach(model, list(model.blocks), levels(model, tmp_path))
    plain = warm(model)
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in plain.state_dict()["state"].items()}
    calls = disk_fills(2)
    with pytest.raises(VBDataError, match=f"VGPU SSD directory {tmp_path} is full") as err:
        vgpu.offload_optimizer(model, plain)
    assert "\n" not in str(err.value) and len(calls) == 2
    assert untouched(plain, before) and not swap_files(tmp_path), "swap files left behind"
    vgpu.offload_optimizer(model, plain).release()  # nothing half-taken: it can be offloaded now (disk free again)


def test_a_truncated_or_deleted_state_swap_file_is_a_clear_error(tmp_path):
    model = apt()
    optimizer = on_ssd(model, tmp_path)
    swap = swap_files(tmp_path)[-1]
    os.truncate(swap, 100)
    with pytest.raises(VBDataError, match=f"swap file {swap} is truncated: 100 of"):
        train(model, optimizer, batches(1))
    optimizer.release()

    model, second = apt(), tmp_path / "second"
    second.mkdir()
    optimizer = on_ssd(model, second)
    swap = swap_files(second)[0]
    os.remove(swap)
    with pytest.raises(VBDataError, match=f"swap file {swap} was deleted"):
        optimizer.state_dict()
    optimizer.release()
