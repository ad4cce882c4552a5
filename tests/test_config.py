"""Configuration: the precedence rule, `.vbrc` discovery and validation, environment variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import apt_model.optimization.vb_global as vb
from apt_model.accelerator import default_device
from apt_model.errors import VBConfigError
from apt_model.optimization import config

SEED_VBRC = {
    "enabled": True,
    "mode": "balanced",
    "auto_patch": True,
    "auto_estimate": True,
    "verbose": True,
    "vgpu_config": {
        "levels": [
            {"capacity_mb": 6400, "device": "cuda:0", "speed_gbps": 900},
            {"capacity_mb": 8000, "device": "cpu", "speed_gbps": 50},
            {"capacity_mb": 32000, "device": "ssd", "speed_gbps": 7},
        ]
    },
}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_defaults_and_mode_table():
    resolved = config.resolve()
    assert resolved.config.mode == "balanced" and not resolved.config.enabled
    assert all(src == "default" or src.startswith("mode:") for src in resolved.sources.values())
    # fp4, fused attention, fused loss, bf16 autocast, checkpointing, offloaded optimizer,
    # graphed decoding, one-token decode attention
    expected = {
        "full": (True, True, True, True, True, True, False, True),
        "speed": (True, False, False, False, False, False, True, True),
        "memory": (False, True, True, True, True, False, False, True),
        "balanced": (False, True, True, True, False, False, False, True),
    }
    for mode, flags in expected.items():
        cfg = config.VBConfig(mode=mode)
        assert tuple(cfg.switch(s) for s in config.SWITCHES) == flags


def machine_vbrc() -> dict:
    """The guide's `.vbrc` with level 0 on this machine's own accelerator (or the CPU)."""
    levels = [dict(level) for level in SEED_VBRC["vgpu_config"]["levels"]]
    levels[0]["device"] = str(default_device())
    return {**SEED_VBRC, "vgpu_config": {"levels": levels}}


def test_seed_vbrc_is_parsed_where_its_device_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    write(Path(".vbrc"), SEED_VBRC)
    if torch.cuda.is_available():
        assert [lv.device for lv in config.resolve().config.vgpu_config.levels] == ["cuda:0", "cpu", "ssd"]
    else:  # the guide's file names cuda:0: on a machine without it, one clear error
        with pytest.raises(VBConfigError, match=r"\.vbrc: vgpu_config\.levels\[0\]: device 'cuda:0'"):
            config.resolve()
    write(Path(".vbrc"), machine_vbrc())
    resolved = config.resolve()
    levels = resolved.config.vgpu_config.levels
    assert [lv.device for lv in levels] == [str(default_device()), "cpu", "ssd"]
    assert [lv.capacity_mb for lv in levels] == [6400, 8000, 32000]
    assert [lv.kind for lv in levels][1:] == ["cpu", "ssd"]
    assert resolved.sources["vgpu_config"].startswith(".vbrc:")
    assert resolved.config.enabled


@pytest.mark.parametrize("where", ["level", "device", "env"])
def test_devices_this_machine_lacks_are_refused_everywhere(where, monkeypatch):
    """A level, the `device` option and $VB_DEVICE get the check `vb info --device` makes."""
    monkeypatch.setenv("VB_LANG", "en")
    missing = "cuda:7" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    if where == "level":
        write(Path(".vbrc"), {"vgpu_config": {"levels": [{"capacity_mb": 10, "device": missing, "speed_gbps": 1}]}})
    elif where == "device":
        write(Path(".vbrc"), {"device": missing})
    else:
        monkeypatch.setenv("VB_DEVICE", missing)
    with pytest.raises(VBConfigError, match=missing) as info:
        config.resolve()
    assert ("$VB_DEVICE" if where == "env" else ".vbrc") in str(info.value)


def test_precedence_explicit_cli_env_vbrc_default(monkeypatch):
    write(Path(".vbrc"), {"mode": "memory", "fp4_format": "mxfp4", "verbose": False, "auto_patch": False})
    monkeypatch.setenv("VB_MODE", "speed")
    monkeypatch.setenv("VB_VERBOSE", "1")
    resolved = config.resolve(explicit={"mode": "full"}, cli={"mode": "balanced", "auto_patch": True})
    cfg, src = resolved.config, resolved.sources
    assert (cfg.mode, src["mode"]) == ("full", "argument")
    assert (cfg.auto_patch, src["auto_patch"]) == (True, "cli")
    assert (cfg.verbose, src["verbose"]) == (True, "env:VB_VERBOSE")
    assert cfg.fp4_format == "mxfp4" and src["fp4_format"].startswith(".vbrc:")
    assert (cfg.fp4_min_features, src["fp4_min_features"]) == (64, "default")
    # without the explicit argument the CLI layer wins over the environment
    assert config.resolve(cli={"mode": "balanced"}).config.mode == "balanced"
    assert config.resolve().config.mode == "speed"


def test_vbrc_search_order(monkeypatch, tmp_path):
    home = Path(tmp_path / "home")
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    write(home / ".vbrc", {"mode": "memory"})
    assert config.resolve().config.mode == "memory"  # home directory
    write(Path(".vbrc"), {"mode": "speed"})
    assert config.resolve().config.mode == "speed"  # working directory first
    named = write(tmp_path / "custom.json", {"mode": "full"})
    monkeypatch.setenv("VB_CONFIG", str(named))
    assert config.resolve().config.mode == "full"  # named by the environment
    monkeypatch.setenv("VB_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(VBConfigError, match="missing.json"):
        config.resolve()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "JSON"),
        ("[1, 2]", "JSON"),
        ({"mdoe": "balanced"}, "mdoe"),
        ({"mode": "turbo"}, "turbo"),
        ({"enabled": "maybe"}, "enabled"),
        ({"fp4_format": "int4"}, "int4"),
        ({"vgpu_config": {"levels": [{"capacity_mb": -1, "device": "cpu", "speed_gbps": 50}]}}, "capacity_mb"),
        ({"vgpu_config": {"levels": [{"capacity_mb": 10, "device": "warp9", "speed_gbps": 50}]}}, "warp9"),
        ({"vgpu_config": {"levels": [{"capacity_mb": 10, "device": "cpu"}]}}, "speed_gbps"),
        ({"vgpu_config": {"levels": [{"capacity_mb": 10, "device": "cpu", "speed_gbps": 1, "x": 1}]}}, "'x'"),
        ({"vgpu_config": {"levels": []}}, "levels"),
        ({"vgpu_config": [1]}, "vgpu_config"),
    ],
)
def test_bad_vbrc_names_the_problem(content, needle, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    write(Path(".vbrc"), content)
    with pytest.raises(VBConfigError) as info:
        config.resolve()
    message = str(info.value)
    assert needle in message and ".vbrc" in message and "\n" not in message


def test_bad_environment_and_arguments(monkeypatch):
    monkeypatch.setenv("VB_AUTO_PATCH", "sometimes")
    with pytest.raises(VBConfigError, match="VB_AUTO_PATCH"):
        config.resolve()
    monkeypatch.delenv("VB_AUTO_PATCH")
    with pytest.raises(VBConfigError, match="turbo"):
        vb.enable(mode="turbo")
    with pytest.raises(VBConfigError, match="colour"):
        vb.enable(colour="blue")
    assert not vb.is_enabled()


def test_messages_follow_vb_lang(monkeypatch):
    with pytest.raises(VBConfigError, match="未知模式"):
        vb.enable(mode="turbo")
    monkeypatch.setenv("VB_LANG", "en")
    with pytest.raises(VBConfigError, match="unknown mode"):
        vb.enable(mode="turbo")


def test_enable_disable_get_config(monkeypatch):
    monkeypatch.setenv("VB_MODE", "memory")
    assert vb.get_config()["mode"] == "memory" and not vb.get_config()["enabled"]
    cfg = vb.enable(verbose=False)
    assert vb.is_enabled() and cfg["mode"] == "memory"
    assert cfg["effective"] == {"fp4": False, "fused_attention": True, "fused_loss": True,
                                "mixed_precision": True, "gradient_checkpointing": True, "offload_optimizer": False,
                                "graphed_decode": False, "decode_attention": True}
    assert vb.explain_config()["mode"] == ("memory", "env:VB_MODE")
    vb.enable_speed_mode(verbose=False)
    assert vb.get_config()["mode"] == "speed" and vb.explain_config()["mode"][1] == "argument"
    vb.disable()
    assert not vb.is_enabled()


def test_cli_layer_ranks_between_arguments_and_environment(monkeypatch):
    monkeypatch.setenv("VB_MODE", "memory")
    vb.set_cli_options(mode="speed")
    assert vb.enable(verbose=False)["mode"] == "speed"
    assert vb.enable(mode="full", verbose=False)["mode"] == "full"
    with pytest.raises(VBConfigError):
        vb.set_cli_options(mode="nope")


def test_fp4_modes_say_once_where_fp4_saves_memory_not_time(monkeypatch, capsys):
    from apt_model.fp4.ops import triton_available

    monkeypatch.setenv("VB_LANG", "en")
    monkeypatch.setattr(vb, "_fp4_noted", False)
    vb.enable_balanced_mode()
    assert "no fused FP4 kernels" not in capsys.readouterr().out
    vb.enable_speed_mode()
    vb.enable_full_optimization()
    out = capsys.readouterr().out
    fused = triton_available(default_device())
    assert out.count("no fused FP4 kernels: FP4 weights save memory there, not time") == (0 if fused else 1)
    monkeypatch.setattr(vb, "_fp4_noted", False)
    vb.disable()
    vb.enable(mode="speed", verbose=False)
    assert capsys.readouterr().out == ""
