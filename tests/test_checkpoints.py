"""Tests of the training checkpoints: atomic saves, checksums, falling back to the newest
intact checkpoint, the keep rule, and a full disk reported as such."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

import apt_model.training.checkpoint as ckpt_module
from apt_model.errors import VBDataError
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.storage import human_bytes
from apt_model.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def tiny_state(step: int) -> dict:
    torch.manual_seed(step)
    model = APTModel(APTConfig.from_preset("tiny"))
    return {"model": model.state_dict(), "step": step, "note": f"step {step}"}


def plain_state(step: int, weight_bytes: int, optimizer_bytes: int) -> dict:
    """A checkpoint of chosen size: ``weight_bytes`` in model.safetensors, about
    ``optimizer_bytes`` in trainer.pt."""
    return {"model": {"w": torch.full((weight_bytes // 4,), float(step))}, "step": step,
            "optimizer": {"exp_avg": torch.ones(optimizer_bytes // 4)}}


def flip_byte(path: Path) -> None:
    """Flip one bit in the middle of a file (tensor data), keeping its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def fake_disk_usage(free: int) -> SimpleNamespace:
    return SimpleNamespace(total=100 * MiB, used=100 * MiB - free, free=free)


# ---- saving and loading --------------------------------------------------------------------


def test_checkpoint_roundtrip_keeps_tied_weights_and_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    states = [tiny_state(s) for s in (1, 2, 3)]
    for state in states:
        save_checkpoint(root, state, keep=2)
    assert names(root) == ["ckpt-00000002", "ckpt-00000003", "latest"]
    loaded = load_checkpoint(root)
    assert loaded["step"] == 3 and loaded["note"] == "step 3" and loaded["skipped"] == []
    assert loaded["path"] == str(root / "ckpt-00000003")
    assert loaded["model"]["lm_head.weight"] is loaded["model"]["embed.weight"]
    for name, tensor in states[-1]["model"].items():
        assert torch.equal(loaded["model"][name], tensor), name
    model = APTModel(APTConfig.from_preset("tiny"))
    model.load_state_dict(loaded["model"])
    assert model.lm_head.weight is model.embed.weight
    # the same step saved again replaces the folder in place
    save_checkpoint(root, {**states[-1], "note": "again"})
    assert load_checkpoint(root)["note"] == "again"


def test_meta_records_size_and_sha256_of_every_file(tmp_path):
    folder = save_checkpoint(tmp_path, tiny_state(1))
    files = json.loads((folder / "meta.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "trainer.pt"}
    for name, record in files.items():
        data = (folder / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt"])
def test_flipped_bit_is_reported_as_corrupt(tmp_path, name):
    folder = save_checkpoint(tmp_path, tiny_state(1))
    flip_byte(folder / name)
    with pytest.raises(VBDataError, match=rf"checkpoint {re.escape(str(folder))}: {name} is corrupt \(SHA-256"):
        load_checkpoint(folder)


def test_truncated_or_missing_file_is_reported(tmp_path):
    folder = save_checkpoint(tmp_path, tiny_state(1))
    size = (folder / "trainer.pt").stat().st_size
    with open(folder / "trainer.pt", "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(VBDataError, match=rf"trainer.pt is truncated \({size // 2} of {size} bytes\)"):
        load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(VBDataError, match="model.safetensors is missing"):
        load_checkpoint(folder)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Folders written before checksums were recorded: ``"files"`` is a plain list."""
    folder = save_checkpoint(tmp_path, tiny_state(4))
    (folder / "meta.json").write_text(json.dumps({"step": 4, "files": ["model.safetensors", "trainer.pt"]}))
    state = load_checkpoint(tmp_path)
    assert state["step"] == 4 and state["skipped"] == []


def test_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    folders = [save_checkpoint(root, tiny_state(s), keep=5) for s in (1, 2, 3)]
    flip_byte(folders[2] / "model.safetensors")
    with open(folders[1] / "trainer.pt", "r+b") as fh:
        fh.truncate(100)
    state = load_checkpoint(root)
    assert state["step"] == 1 and state["path"] == str(folders[0])
    assert [path for path, _ in state["skipped"]] == [str(folders[2]), str(folders[1])]
    assert "model.safetensors is corrupt" in state["skipped"][0][1]
    assert "trainer.pt is truncated" in state["skipped"][1][1]
    # a folder given directly is verified, never replaced by an older one
    with pytest.raises(VBDataError, match="model.safetensors is corrupt"):
        load_checkpoint(folders[2])
    (folders[0] / "meta.json").write_text("{not json")
    with pytest.raises(VBDataError, match=r"none of the 3 checkpoints .* is intact; the newest, "
                                          r".*ckpt-00000003: model.safetensors is corrupt"):
        load_checkpoint(root)


def test_checkpoints_newer_than_latest_are_not_used(tmp_path):
    """``latest`` is the commit point: a newer folder (a run resumed from an older checkpoint)
    is neither loaded nor a fallback."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(root, tiny_state(step), keep=5)
    (root / "latest").write_text("ckpt-00000002\n")
    assert latest_checkpoint(root).name == "ckpt-00000002"
    flip_byte(root / "ckpt-00000002" / "trainer.pt")
    state = load_checkpoint(root)
    assert state["step"] == 1 and [Path(p).name for p, _ in state["skipped"]] == ["ckpt-00000002"]


def test_half_written_or_dangling_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, tiny_state(1))
    crashed = root / "ckpt-00000005.tmp"  # a save killed mid-way
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(root).name == "ckpt-00000001"
    (root / "latest").write_text("ckpt-00000007\n")  # crash between the two renames
    assert load_checkpoint(root)["step"] == 1
    with pytest.raises(VBDataError, match="checkpoint"):
        load_checkpoint(tmp_path / "nothing-here")


def test_only_intact_checkpoint_survives_newer_corrupt_ones(tmp_path, monkeypatch):
    """Nothing is pruned by a failed save; a successful one counts only checkpoints up to its
    own step, so corrupt newer ones never push an intact older one out."""
    root = tmp_path / "checkpoints"
    for step in (1, 5, 6):
        save_checkpoint(root, plain_state(step, 4096, 4096), keep=5)
    for step in (5, 6):
        flip_byte(root / f"ckpt-{step:08d}" / "model.safetensors")
    assert load_checkpoint(root)["step"] == 1  # resumed from the only intact one
    with monkeypatch.context() as patch, pytest.raises(VBDataError):
        patch.setattr(shutil, "disk_usage", lambda _path: fake_disk_usage(1024))
        save_checkpoint(root, plain_state(2, 4096, 4096), keep=1)
    assert names(root) == ["ckpt-00000001", "ckpt-00000005", "ckpt-00000006", "latest"]
    save_checkpoint(root, plain_state(2, 4096, 4096), keep=2)
    assert names(root) == ["ckpt-00000001", "ckpt-00000002", "ckpt-00000005", "ckpt-00000006", "latest"]
    state = load_checkpoint(root)
    assert state["step"] == 2 and state["skipped"] == []
    save_checkpoint(root, plain_state(5, 4096, 4096), keep=2)  # the run reaches step 5 again
    assert names(root) == ["ckpt-00000002", "ckpt-00000005", "ckpt-00000006", "latest"]
    assert load_checkpoint(root)["step"] == 5


# ---- failed saves and a full disk ----------------------------------------------------------


@pytest.mark.parametrize("failing", ["weights", "trainer_state"])
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, failing):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, tiny_state(1))

    def disk_full(_obj, target, *args, **kwargs):
        Path(target if isinstance(target, (str, Path)) else target.name).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    if failing == "weights":
        monkeypatch.setattr(ckpt_module, "save_file", disk_full)
    else:
        monkeypatch.setattr(ckpt_module.torch, "save", disk_full)
    with pytest.raises(VBDataError, match="ckpt-00000002") as info:
        save_checkpoint(root, tiny_state(2))
    assert re.search(r"no space left on device \(needs \d+\.\d MiB, .* free\)", str(info.value))
    assert names(root) == ["ckpt-00000001", "latest"]
    assert latest_checkpoint(root).name == "ckpt-00000001"
    assert load_checkpoint(root)["step"] == 1


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch, lang):
    monkeypatch.setenv("VB_LANG", lang)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, plain_state(1, 2 * MiB, 4096))
    seen = []

    def little_free(path):
        seen.append(Path(path))
        return fake_disk_usage(MiB)

    monkeypatch.setattr(shutil, "disk_usage", little_free)
    with pytest.raises(VBDataError) as info:
        save_checkpoint(root, plain_state(2, 2 * MiB, 4096))
    message = str(info.value)
    assert str(root / "ckpt-00000002") in message
    if lang == "en":
        assert "not enough disk space (needs 2.1 MiB, 1.0 MiB free)" in message
    else:
        assert "磁盘空间不足 (需要 2.1 MiB, 可用 1.0 MiB)" in message
    assert seen and all(root.is_relative_to(p) for p in seen)  # measured where root lives
    assert names(root) == ["ckpt-00000001", "latest"]
    assert load_checkpoint(root)["step"] == 1


@pytest.mark.parametrize("failing", ["weights", "trainer_state"])
@pytest.mark.parametrize("disk_full", [True, False])
def test_write_error_on_a_full_disk_says_no_space(tmp_path, monkeypatch, failing, disk_full):
    """torch.save's zip writer reports a full disk as "unexpected pos"; safetensors as its own
    error. When the space is gone afterwards, the message says so; otherwise it is kept."""
    root = tmp_path / "checkpoints"
    save_checkpoint(root, plain_state(1, 4096, 4096))
    free = [100 * MiB]
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: fake_disk_usage(free[0]))

    def fails(*_args, **_kwargs):
        if disk_full:
            free[0] = 1000
        if failing == "weights":
            raise SafetensorError("Error while serializing: I/O error")
        raise RuntimeError("unexpected pos 2213568 vs 2213456")

    if failing == "weights":
        monkeypatch.setattr(ckpt_module, "save_file", fails)
    else:
        monkeypatch.setattr(ckpt_module.torch, "save", fails)
    with pytest.raises(VBDataError, match="cannot write checkpoint .*ckpt-00000002") as info:
        save_checkpoint(root, plain_state(2, 4096, 4096))
    message = str(info.value)
    if disk_full:
        assert re.search(r"no space left on device \(needs \d+\.\d KiB, 1000 B free\)", message), message
        assert "unexpected pos" not in message and "serializing" not in message
    else:
        assert "no space" not in message
        assert ("serializing" if failing == "weights" else "unexpected pos") in message
    assert names(root) == ["ckpt-00000001", "latest"]


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, int(2.1 * MiB), 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "2.1 MiB", "3.0 GiB"]


# ---- a real small file system (needs root to mount; CI runs as root) -----------------------


def test_real_small_disk_refuses_a_checkpoint_that_cannot_fit(small_fs):
    root = small_fs / "checkpoints"
    save_checkpoint(root, plain_state(1, 256 << 10, 4096))
    with pytest.raises(VBDataError, match=r"not enough disk space \(needs 1\.\d MiB, \d+\.\d KiB free\)"):
        save_checkpoint(root, plain_state(2, MiB, 4096))
    assert names(root) == ["ckpt-00000001", "latest"]
    assert load_checkpoint(root)["step"] == 1


@pytest.mark.parametrize("failing", ["weights", "trainer_state"])
def test_real_disk_filling_up_during_a_save_says_no_space(small_fs, monkeypatch, failing):
    """Another writer takes the space between the free-space check and the write: the real
    ENOSPC from safetensors or torch.save becomes "no space left on device"."""
    root = small_fs / "checkpoints"
    save_checkpoint(root, plain_state(1, 64 << 10, 4096))
    real_free_bytes = ckpt_module.free_bytes

    def free_then_filled(path):
        free = real_free_bytes(path)
        filler = small_fs / "filler"
        if not filler.exists():
            filler.write_bytes(bytes(free - (200 << 10)))  # leave 200 KiB
        return free

    monkeypatch.setattr(ckpt_module, "free_bytes", free_then_filled)
    big, small = 400 << 10, 16 << 10
    weight_bytes, optimizer_bytes = (big, small) if failing == "weights" else (small, big)
    with pytest.raises(VBDataError, match=r"ckpt-00000002: no space left on device \(needs \d+\.\d KiB"):
        save_checkpoint(root, plain_state(2, weight_bytes, optimizer_bytes))
    assert names(root) == ["ckpt-00000001", "latest"]
    state = load_checkpoint(root)
    assert state["step"] == 1 and state["skipped"] == []
