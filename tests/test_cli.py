"""``vb info`` and one-line errors from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from apt_model.optimization import config as vb_config


def vb(*args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in vb_config.ENV_VARS}
    return subprocess.run([sys.executable, "-m", "apt_model.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**clean, **env}, timeout=120)


def test_info_reports_device_capabilities_memory_and_sources(tmp_path):
    (tmp_path / ".vbrc").write_text('{"mode": "memory"}')
    proc = vb("info", cwd=tmp_path, VB_LANG="en", VB_FP4_FORMAT="mxfp4", HOME=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    expected = "accelerator: cuda" if torch.cuda.is_available() else "accelerator: cpu"
    assert expected in out and "bf16:" in out and "flash SDPA:" in out and "Triton:" in out
    assert "pinned memory:" in out and "free memory per level" in out and "cpu:" in out
    assert "mode = 'memory'  ← .vbrc:" in out
    assert "fp4_format = 'mxfp4'  ← env:VB_FP4_FORMAT" in out
    assert "gradient_checkpointing = None  ← mode:memory" in out


def test_info_shows_the_vgpu_plan_of_a_model(tmp_path):
    """``vb info --preset``: the configured levels' plan for that model (what each level
    holds, what streams), or that no levels are configured."""
    levels = [{"capacity_mb": 1.0, "device": "cpu", "speed_gbps": 100}, {"capacity_mb": 64, "device": "cpu", "speed_gbps": 50}]
    (tmp_path / ".vbrc").write_text(json.dumps({"mode": "memory", "vgpu_config": {"levels": levels}}))
    proc = vb("info", "--preset", "tiny", cwd=tmp_path, VB_LANG="en", HOME=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout.split("VGPU plan (a training step, batch 1):")[1]
    assert "mode memory" in plan and "L0 cpu" in plan and "L1 cpu" in plan and "streamed" in plan
    (tmp_path / ".vbrc").write_text('{"mode": "memory"}')
    proc = vb("info", "--preset", "tiny", cwd=tmp_path, VB_LANG="en", HOME=str(tmp_path))
    assert proc.returncode == 0 and "VGPU plan: no vgpu_config configured" in proc.stdout, proc.stderr


def test_info_in_chinese_by_default(tmp_path):
    proc = vb("info", cwd=tmp_path, HOME=str(tmp_path))
    assert proc.returncode == 0 and "加速器" in proc.stdout and "生效配置" in proc.stdout


@pytest.mark.parametrize(
    ("vbrc", "env", "args", "needle"),
    [
        ("{bad json", {}, ["info"], "JSON"),
        ('{"mode": "turbo"}', {}, ["info"], "turbo"),
        ('{"colour": 1}', {}, ["info"], "colour"),
        ('{"vgpu_config": {"levels": [{"capacity_mb": -5, "device": "cpu", "speed_gbps": 1}]}}', {}, ["info"],
         "capacity_mb"),
        (None, {"VB_MODE": "warp"}, ["info"], "warp"),
        (None, {}, ["info", "--device", "cuda:7"], "cuda:7"),
        (None, {}, ["info", "--device", "quantum"], "quantum"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, vbrc, env, args, needle):
    if vbrc is not None:
        (tmp_path / ".vbrc").write_text(vbrc)
    proc = vb(*args, cwd=tmp_path, HOME=str(tmp_path), VB_LANG="en", **env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
