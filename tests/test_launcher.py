"""The launchers as a newcomer meets them: the main job without numpy, bad settings from any
level stop the run, one precedence rule through the real launcher, resume restores the run,
signals save progress, one language and one banner."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from apt_model.errors import run_cli
from apt_model.optimization import vb_global
from apt_model.training import launcher
from apt_model.training.checkpoint import load_checkpoint
from apt_model.training.data import ByteCorpus, default_corpus_text
from apt_model.training.run_log import LOG_NAME, read_log
from apt_model.training.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--batch-size", "2", "--seq-len", "16", "--sample-tokens", "4", "--eval-batches", "1",
         "--eval-interval", "0", "--no-progress"]
CJK = re.compile(r"[\u4e00-\u9fff]")
MISSING_DEVICE = "cuda:7" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def train(*flags: str) -> int:
    return run_cli(launcher.main, [*QUICK, *flags])


# The fresh home folders of the scripts run (removed when the test process exits).
_HOMES: list[tempfile.TemporaryDirectory] = []


def script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, popen: bool = False,
           **pipes) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run (or, with ``popen``, start) a repository script with VB's variables cleared."""
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("VB_") or k in ("ENABLE_VIRTUAL_BLACKWELL", "VB_TRAIN_ARGS"))}
    if cwd is None:
        _HOMES.append(tempfile.TemporaryDirectory(prefix="vb-home-"))
    home = cwd or _HOMES[-1].name  # no ~/.vbrc in reach, caches kept out of the repo
    full_env = {**clean, "OMP_NUM_THREADS": "1", "VB_LANG": "en", "HOME": str(home),
                "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd or REPO, env=full_env, text=True, **pipes)
    return subprocess.run(command, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


# ---- a fresh machine: no numpy -------------------------------------------------------------


def test_corpus_fingerprint_needs_no_numpy():
    code = ("import sys; sys.modules['numpy'] = None\n"
            "from apt_model.training.data import ByteCorpus\n"
            "print(ByteCorpus.load().fingerprint())")
    proc = script("-c", code)
    assert proc.returncode == 0, proc.stderr
    expected = hashlib.sha256(default_corpus_text().encode("utf-8")).hexdigest()[:16]
    assert proc.stdout.strip() == expected == ByteCorpus.load().fingerprint()


def _requirement_closure(root: str) -> set[str]:
    """The distributions ``root`` needs at run time (no extras of its own), followed through
    each dependency's requirements and the extras named on the way."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    needed: set[str] = set()
    todo = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in needed:
            continue
        needed.add(key)
        for line in metadata.requires(name) or ():
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                with contextlib.suppress(metadata.PackageNotFoundError):
                    metadata.distribution(req.name)
                    todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in needed}


def test_main_job_runs_on_the_declared_dependencies_alone(tmp_path):
    """The main job, with every installed package that `pip install -e .` would not bring
    blocked from import (test extras, matplotlib, transformers...): it must still cross a
    checkpoint save and finish. (safetensors writes torch tensors through numpy, which the
    CPU torch wheel does not bring: the crash a fresh machine met at the first checkpoint.)"""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    closure = _requirement_closure("apt_model")
    baseline = set(script("-c", "import sys; print(' '.join(sys.modules))").stdout.split())
    blocked = sorted(module for module, dists in metadata.packages_distributions().items()
                     if module.isidentifier() and module not in baseline and module != "apt_model"
                     and not any(canonicalize_name(d) in closure for d in dists))
    assert "transformers" in blocked and "pytest" in blocked and "numpy" not in blocked
    flags = ["--enable-vb", "--vb-mode", "balanced", "--max-steps", "2", "--save-interval", "1",
             "--out", str(tmp_path / "run"), *QUICK]
    code = ("import sys, runpy\n"
            f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
            f"sys.argv = ['train.py', *{flags!r}]\n"
            "try:\n    runpy.run_path('training/train.py', run_name='__main__')\n"
            "finally:\n    print('numpy' in sys.modules)")
    proc = script("-c", code)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("True")  # the checkpoint went through numpy, a declared dependency
    assert load_checkpoint(tmp_path / "run" / "checkpoints")["step"] == 2
    assert "matplotlib is not installed" in proc.stdout


# ---- bad settings stop the run, whatever level they come from --------------------------------


BAD_SETTINGS = {
    "malformed .vbrc": ({".vbrc": '{"enabled": true, "mode": '}, {}, "JSON"),
    "unknown mode in .vbrc": ({".vbrc": '{"mode": "turbo"}'}, {}, "turbo"),
    "unknown key in .vbrc": ({".vbrc": '{"colour": 1}'}, {}, "colour"),
    "negative capacity": ({".vbrc": '{"vgpu_config": {"levels": [{"capacity_mb": -5, "device": "cpu", '
                                    '"speed_gbps": 1}]}}'}, {}, "capacity_mb"),
    "level on a missing device": ({".vbrc": json.dumps({"vgpu_config": {"levels": [
        {"capacity_mb": 64, "device": MISSING_DEVICE, "speed_gbps": 1}]}})}, {}, MISSING_DEVICE),
    "device in .vbrc": ({".vbrc": json.dumps({"device": MISSING_DEVICE})}, {}, MISSING_DEVICE),
    "bad VB_MODE": ({}, {"VB_MODE": "warp"}, "warp"),
    "bad VB_DEVICE": ({}, {"VB_DEVICE": MISSING_DEVICE}, MISSING_DEVICE),
    "bad ENABLE_VIRTUAL_BLACKWELL": ({}, {"ENABLE_VIRTUAL_BLACKWELL": "sometimes"}, "ENABLE_VIRTUAL_BLACKWELL"),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
@pytest.mark.parametrize("enable_flag", [False, True])
def test_bad_settings_stop_the_launcher_before_any_work(name, enable_flag, tmp_path, monkeypatch, capsys):
    files, env, needle = BAD_SETTINGS[name]
    for filename, text in files.items():
        Path(filename).write_text(text)  # the working directory is a fresh folder (conftest)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    rc = train("--max-steps", "1", "--out", str(out), *(["--enable-vb"] if enable_flag else []))
    captured = capsys.readouterr()
    assert rc == 2 and needle in one_error_line(captured.err)
    assert "training APTModel" not in captured.out and not out.exists()


def test_bad_settings_stop_the_script_at_import(tmp_path):
    """`import apt_model` with a broken .vbrc that asks for VB: one line, exit 2, no run."""
    (tmp_path / ".vbrc").write_text('{"enabled": true, "mode": "turbo"}')
    proc = script(str(REPO / "training" / "train.py"), "--max-steps", "1", "--out", str(tmp_path / "run"),
                  cwd=tmp_path)
    assert proc.returncode == 2 and "turbo" in one_error_line(proc.stderr)
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_training_runs_on_the_configured_device(tmp_path, monkeypatch):
    monkeypatch.setenv("VB_DEVICE", "cpu")
    assert train("--max-steps", "1", "--out", str(tmp_path / "a")) == 0
    assert vb_global.explain_config()["device"] == ("cpu", "env:VB_DEVICE")
    assert train("--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "b")) == 0
    assert vb_global.explain_config()["device"] == ("cpu", "cli")


def test_vb_info_names_the_true_source_of_enabled(tmp_path):
    (tmp_path / ".vbrc").write_text('{"enabled": true, "mode": "memory"}')
    proc = script("-m", "apt_model.cli", "info", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"enabled = True  ← \.vbrc:\S+\.vbrc", proc.stdout), proc.stdout
    assert re.search(r"mode = 'memory'  ← \.vbrc:", proc.stdout)


# ---- one precedence rule, through the real launcher -------------------------------------------

LEVELS = ("explicit", "cli", "env", ".vbrc", "default")
LEVEL_MODE = {"explicit": "full", "cli": "memory", "env": "speed", ".vbrc": "balanced", "default": "balanced"}
LEVEL_SOURCE = {"explicit": "argument", "cli": "cli", "env": "env:VB_MODE", ".vbrc": ".vbrc:", "default": "default"}


@pytest.mark.parametrize(("high", "low"), list(itertools.combinations(LEVELS, 2)))
def test_every_pair_of_levels_through_the_launcher(high, low, tmp_path, monkeypatch):
    """The mode set at two levels: the higher one trains, and is named as the source."""
    flags = ["--max-steps", "1", "--out", str(tmp_path / "run")]
    mode_at = {level: LEVEL_MODE[level] for level in (high, low)}
    if high == ".vbrc" and low == "default":
        mode_at[".vbrc"] = "memory"  # differ from the default
    for level, mode in mode_at.items():
        if level == "explicit":
            vb_global.enable(mode=mode, verbose=False)
        elif level == "cli":
            flags += ["--enable-vb", "--vb-mode", mode]
        elif level == "env":
            monkeypatch.setenv("VB_MODE", mode)
        elif level == ".vbrc":
            Path(".vbrc").write_text(json.dumps({"mode": mode}))
    if "explicit" not in mode_at and "cli" not in mode_at:
        monkeypatch.setenv("ENABLE_VIRTUAL_BLACKWELL", "1")
    assert train(*flags) == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["vb_config"]["mode"] == mode_at[high]
    assert vb_global.explain_config()["mode"][1].startswith(LEVEL_SOURCE[high])


def test_vb_mode_from_environment_is_not_beaten_by_a_flag_default(tmp_path, monkeypatch, capsys):
    """VB_MODE=memory train.py --enable-vb trains in memory mode (the flag's default is "not given")."""
    monkeypatch.setenv("VB_MODE", "memory")
    assert train("--enable-vb", "--max-steps", "1", "--out", str(tmp_path / "run")) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints")["vb_config"]["mode"] == "memory"
    assert "mode memory ← env:VB_MODE" in capsys.readouterr().out


# ---- resume ------------------------------------------------------------------------------------


def test_resume_restores_the_runs_flags_and_refuses_different_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--max-steps", "3", "--batch-size", "3", "--lr", "0.002", "--seed", "7", "--enable-vb",
                 "--vb-mode", "memory", "--out", str(out)) == 0
    assert run_cli(launcher.main, ["--resume", "--max-steps", "5", "--out", str(out)]) == 0
    state = load_checkpoint(out / "checkpoints")
    cfg = state["train_config"]
    assert state["step"] == 5 and (cfg["batch_size"], cfg["lr"], cfg["seed"]) == (3, 0.002, 7)
    assert state["vb_config"]["mode"] == "memory" and cfg["max_steps"] == 5
    capsys.readouterr()
    assert run_cli(launcher.main, ["--resume", "--batch-size", "8", "--config", "small", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--batch-size 8 (checkpoint: 3)" in line and "--config 'small' (checkpoint: 'tiny')" in line


def test_resume_with_other_vb_settings_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("ENABLE_VIRTUAL_BLACKWELL", "1")
    monkeypatch.setenv("VB_MODE", "memory")
    assert train("--max-steps", "2", "--out", str(out)) == 0
    monkeypatch.delenv("ENABLE_VIRTUAL_BLACKWELL")
    vb_global.disable()
    capsys.readouterr()
    assert run_cli(launcher.main, ["--resume", "--out", str(out)]) == 2
    assert "trained with Virtual Blackwell mode memory, now it is off" in one_error_line(capsys.readouterr().err)


def test_resume_from_a_chosen_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--max-steps", "6", "--save-interval", "2", "--keep-checkpoints", "5", "--out", str(out)) == 0
    chosen = out / "checkpoints" / "ckpt-00000002"
    capsys.readouterr()
    assert run_cli(launcher.main, ["--resume-from", str(chosen), "--max-steps", "3"]) == 0
    stdout = capsys.readouterr().out
    assert f"resuming from {chosen} (step 2)" in stdout and "steps 2→3" in stdout
    assert load_checkpoint(out / "checkpoints")["step"] == 3  # the resumed run is the latest now...
    assert load_checkpoint(out / "checkpoints" / "ckpt-00000006")["step"] == 6  # ...step 6 is kept
    assert run_cli(launcher.main, ["--resume-from", str(tmp_path / "nowhere")]) == 2


def test_resume_falls_back_from_a_damaged_latest_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--max-steps", "4", "--save-interval", "2", "--out", str(out)) == 0
    damaged = out / "checkpoints" / "ckpt-00000004" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0x01  # one flipped bit, same size
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli(launcher.main, ["--resume", "--max-steps", "5", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "skipping damaged checkpoint" in stdout and "ckpt-00000004" in stdout and "corrupt" in stdout
    assert "resuming from" in stdout and "ckpt-00000002 (step 2)" in stdout


def test_mismatched_checkpoint_names_both_presets(tmp_path):
    out = tmp_path / "run"
    assert train("--max-steps", "1", "--out", str(out)) == 0
    cfg = TrainConfig(preset="small", max_steps=2, batch_size=2, seq_len=16, out_dir=str(out), resume=True,
                      progress=False, sample_tokens=1, eval_batches=1)
    with pytest.raises(Exception, match=r"holds APTModel \(preset tiny\); this run builds APTModel "
                                        r"\(preset small\): .*shape differs: embed\.weight") as info:
        Trainer(cfg).run()
    assert "\n" not in str(info.value)


# ---- signals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_before_exiting(signum, code, tmp_path):
    out = tmp_path / "run"
    proc = script("training/train.py", "--max-steps", "100000", "--save-interval", "0", "--out", str(out), *QUICK,
                  popen=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / LOG_NAME
    deadline = time.monotonic() + 120
    while not (log.exists() and len(read_log(log)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"{signal.Signals(signum).name} received" in stderr and "--resume" in stderr
    state = load_checkpoint(out / "checkpoints")
    steps = [r["step"] for r in read_log(log) if "loss" in r]
    assert state["step"] == steps[-1] >= 3 and len(state["losses"]) == state["step"]
    assert run_cli(launcher.main, ["--resume", "--max-steps", str(state["step"] + 1), "--out", str(out)]) == 0


# ---- one language, one banner --------------------------------------------------------------------


def test_english_run_prints_no_chinese_and_one_banner(tmp_path):
    env = {"ENABLE_VIRTUAL_BLACKWELL": "1", "VB_MODE": "memory"}
    proc = script("training/train.py", "--enable-vb", "--vb-mode", "full", "--max-steps", "2",
                  "--out", str(tmp_path / "run"), *QUICK, env=env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert not CJK.search(text), CJK.search(text)
    banners = [line for line in text.splitlines() if "Virtual Blackwell enabled" in line]
    assert banners == ["✅ Virtual Blackwell enabled: mode full ← cli"]


def test_help_follows_the_language():
    english = script("training/train.py", "--help")
    assert english.returncode == 0 and not CJK.search(english.stdout) and "--enable-vb" in english.stdout
    chinese = script("training/train.py", "--help", env={"VB_LANG": "zh"})
    assert "用法" in chinese.stdout and "启用虚拟Blackwell优化" in chinese.stdout
    bad = script("training/train.py", "--batch-size", "many", env={"VB_LANG": "zh"})
    assert bad.returncode == 2 and "无效的 int 值" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_vb_verbose_0_silences_every_banner(tmp_path):
    env = {"ENABLE_VIRTUAL_BLACKWELL": "1", "VB_VERBOSE": "0"}
    proc = script("training/train.py", "--max-steps", "1", "--out", str(tmp_path / "run"), *QUICK, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "✅" not in proc.stdout and "✓" not in proc.stdout
    assert load_checkpoint(tmp_path / "run" / "checkpoints")["vb_config"]["mode"] == "balanced"


def test_a_full_disk_stops_the_run_with_the_space_needed(small_fs, capsys):
    """A run whose checkpoint does not fit: one line naming the path and the space, exit 2."""
    rc = train("--max-steps", "2", "--save-interval", "1", "--out", str(small_fs / "run"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(small_fs / "run" / "checkpoints" / "ckpt-00000001") in line
    assert re.search(r"not enough disk space \(needs \d+\.\d MiB, \d+\.\d KiB free\)", line), line


def test_a_run_that_cannot_fit_stops_before_it_allocates_with_the_largest_batch(tmp_path):
    out = tmp_path / "run"
    started = time.perf_counter()
    proc = script("training/train.py", "--batch-size", "100000", "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--batch-size 100000 × --seq-len 128 does not fit on cpu" in proc.stderr
    assert re.search(r"the largest batch that fits is --batch-size \d+$", proc.stderr.strip())
    assert not out.exists() and time.perf_counter() - started < 60


def test_the_fit_check_names_the_largest_batch_for_the_memory_given():
    from apt_model.errors import VBConfigError
    from apt_model.estimator import estimate
    from apt_model.estimator.fit import FIT_MARGIN

    def peak(batch: int) -> int:
        return estimate("tiny", mode="off", batch=batch, seq=17, device="cpu").peak_bytes

    memory = int((peak(5) + peak(6)) / 2 / (1 - FIT_MARGIN))
    with pytest.raises(VBConfigError, match=r"in mode off needs .*the largest batch that fits is --batch-size 5$"):
        launcher.check_fits(TrainConfig(preset="tiny", batch_size=40, seq_len=16), memory=memory)


def test_the_fit_check_counts_no_optimizer_state_when_the_trainer_offloads_it():
    """With host levels configured, VB's trainer keeps AdamW's state off the device, so a run
    that fits only without it passes the check; without the levels it is stopped."""
    import apt_model.optimization.vb_global as vb
    from apt_model.errors import VBConfigError
    from apt_model.estimator import estimate
    from apt_model.estimator.fit import FIT_MARGIN

    cfg = TrainConfig(preset="tiny", batch_size=4, seq_len=16, enable_vb=True, vb_mode="balanced")

    def peak(optimizer: str) -> int:
        return estimate("tiny", mode="balanced", batch=4, seq=17, device="cpu", optimizer=optimizer).peak_bytes

    memory = int((peak("sgd") + peak("adamw")) / 2 / (1 - FIT_MARGIN))
    with pytest.raises(VBConfigError, match="does not fit"):
        launcher.check_fits(cfg, memory=memory)
    vb.enable(vgpu_config={"levels": [{"capacity_mb": 1024, "device": "cpu", "speed_gbps": 10},
                                      {"capacity_mb": 1024, "device": "cpu", "speed_gbps": 5}]})
    launcher.check_fits(cfg, memory=memory)
