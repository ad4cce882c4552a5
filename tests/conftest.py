"""Every test starts with VB off, no VB environment variables, no `.vbrc` in reach."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from apt_model.optimization import config, stats, vb_global

VB_ENV = (*config.ENV_VARS, config.VBRC_ENV, "VB_LANG", "APT_TRAIN_ARGS")


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
