"""Every test starts with VB off, no VB environment variables, no `.vbrc` in reach."""

from __future__ import annotations

import shutil
import subprocess

import pytest
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
