"""Every test starts with VB off, no VB environment variables, no `.vbrc` in reach."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from apt_model import env
from apt_model.optimization import stats, vb_global

VB_ENV = env.ALL


@pytest.fixture(autouse=True)
def clean_vb(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    for var in VB_ENV:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(work)
    vb_global.disable()
    vb_global.set_cli_options()
    stats.REGISTRY.reset()
    yield
    vb_global.disable()
    vb_global.set_cli_options()
    stats.REGISTRY.reset()


@pytest.fixture
def english(monkeypatch: pytest.MonkeyPatch) -> None:
    """User-facing messages in English (``VB_LANG=en``) for tests that match their text."""
    monkeypatch.setenv("VB_LANG", "en")


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU counts as having native bf16 (AVX512-BF16 / AMX), so bf16 autocast runs here
    whatever the machine: for tests of what the autocast pass does."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """The dtype of the query of every ``F.scaled_dot_product_attention`` call."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a small tmpfs (CI runs this test as root)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here ({proc.stderr.strip()}); CI runs this test as root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def disk_fills(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[int]]:
    """``disk_fills(n)``: from then on the ``n``-th space reservation (``os.posix_fallocate``)
    fails with ENOSPC, the others succeed; returns the lengths asked so far (a live list)."""

    def install(n: int) -> list[int]:
        reserve, calls = os.posix_fallocate, []

        def fill_up(fd: int, offset: int, length: int) -> None:
            calls.append(length)
            if len(calls) == n:
                raise OSError(errno.ENOSPC, "No space left on device")
            reserve(fd, offset, length)

        monkeypatch.setattr(os, "posix_fallocate", fill_up)
        return calls

    return install
