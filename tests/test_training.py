"""Tests of the training stack: corpus, the trainer, resume, launchers, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apt_model.errors import VBDataError, run_cli
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization import vb_global
from apt_model.training import launcher
from apt_model.training.checkpoint import load_checkpoint
from apt_model.training.data import ByteCorpus, decode, default_corpus_text, encode, load_text
from apt_model.training.gpt_trainer import GPTTrainer
from apt_model.training.run_log import LOG_NAME, PLOT_NAME, read_log
from apt_model.training.trainer import TrainConfig, Trainer, lr_at

REPO = Path(__file__).resolve().parents[1]
# Small enough for a 2-core CPU, large enough that the byte loss visibly falls.
FAST = dict(batch_size=8, seq_len=32, eval_batches=2, sample_tokens=16, progress=False, warmup=5)
FAST_FLAGS = ["--batch-size", "8", "--seq-len", "32", "--sample-tokens", "16", "--warmup", "5", "--no-progress"]


def script_env() -> dict[str, str]:
    """The scripts' environment: this checkout importable, no VB switched on from outside,
    one CPU thread (see ``one_thread``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ENABLE_VIRTUAL_BLACKWELL", "VB_MODE", "VB_CONFIG")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models gain nothing from threads, and on a busy 2-core machine spinning
    OpenMP threads make each step several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def vb_off_english(monkeypatch):
    """English messages to match on; VB switched on by a test must not leak into the next."""
    monkeypatch.setenv("VB_LANG", "en")
    vb_global.disable()
    yield
    vb_global.disable()


# ---- data --------------------------------------------------------------------------------


def test_default_corpus_is_real_pydoc_text_and_deterministic():
    from pydoc_data.topics import topics

    text = default_corpus_text()
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 400_000 and 'The "assert" statement' in text
    a, b = ByteCorpus.load(), ByteCorpus.load()
    total = len(a.train) + len(a.val)
    assert total == len(text.encode("utf-8"))
    assert len(a.val) == int(total * 0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert torch.equal(torch.cat([a.train, a.val]), encode(text))
    assert decode(a.val[:0]) == "" and decode(encode("héllo ✓")) == "héllo ✓"
    assert decode([0xE2, 0x9C]) == "\ufffd"  # cut mid-character: replaced, not an error


def test_batches_are_seeded_windows_of_the_split():
    corpus = ByteCorpus.load()
    x = corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(3))
    y = corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(3))
    assert x.shape == (4, 17) and x.dtype == torch.long and torch.equal(x, y)
    text = bytes(corpus.train.tolist())
    assert all(bytes(row.tolist()) in text for row in x)
    assert corpus.steps_per_epoch(4, 16) == len(corpus.train) // 64


def test_data_from_files_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "sub" / "b.md").write_text("# beta ✓\n")
    (tmp_path / "sub" / "c.py").write_text("print('gamma')\n")
    (tmp_path / "sub" / "noise.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    text = load_text([tmp_path])
    assert text == "alpha text\n\n\n# beta ✓\n\n\nprint('gamma')\n"
    assert load_text([tmp_path / "a.txt", tmp_path / "sub" / "b.md"]) == "alpha text\n\n\n# beta ✓\n"
    corpus = ByteCorpus.from_text("x" * 1000, source="t")
    assert (len(corpus.train), len(corpus.val)) == (900, 100)


@pytest.mark.parametrize("case", ["missing", "empty_folder", "binary_only", "empty_file", "binary_file"])
def test_bad_data_paths_are_clear_errors(tmp_path, case):
    target = tmp_path / "data"
    if case == "empty_folder":
        target.mkdir()
    elif case == "binary_only":
        target.mkdir()
        (target / "blob.bin").write_bytes(b"\x00" * 10)
        (target / "fake.txt").write_bytes(b"\xff\xfe\x00x")
    elif case == "empty_file":
        target.write_text("")
    elif case == "binary_file":
        target.write_bytes(b"\x00\x01\x02")
    with pytest.raises(VBDataError, match="data (path|folder|file)"):
        load_text([target])


def test_too_little_data_for_the_window_is_a_clear_error():
    with pytest.raises(VBDataError, match="seq-len"):
        ByteCorpus.from_text("short text " * 5, source="t").check_fits(64)


# ---- trainer -----------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and lrs[-1] >= 0.1


def test_resume_is_bit_identical(tmp_path):
    """2N steps in one go == N steps, a crash, and --resume; dropout on, so RNG restore counts."""
    n = 6
    cfg = TrainConfig(max_steps=2 * n, save_interval=n, eval_interval=n, out_dir=str(tmp_path / "run"), **FAST)

    def factory() -> APTModel:
        return APTModel(APTConfig.from_preset("tiny", dropout=0.1))

    full = Trainer(cfg, factory).run()
    assert len(full.losses) == 2 * n
    shutil.rmtree(tmp_path / "run" / "checkpoints" / f"ckpt-{2 * n:08d}")  # "crashed" before saving it
    cfg.resume = True
    resumed = Trainer(cfg, factory).run()
    assert resumed.losses == full.losses  # exact float equality, step by step
    assert resumed.val_loss == full.val_loss and resumed.sample == full.sample


def test_launcher_run_learns_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_cli(launcher.main, ["--max-steps", "20", "--eval-interval", "0", "--out", str(out), *FAST_FLAGS])
    assert rc == 0
    stdout = capsys.readouterr().out
    state = load_checkpoint(out / "checkpoints")
    losses = state["losses"]
    assert state["step"] == 20 and len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    assert state["train_config"]["preset"] == "tiny" and state["vb_config"] is None
    assert "ckpt-00000020" in stdout
    # the run's log beside its checkpoints: one record per step, then the final validation
    records = read_log(out / LOG_NAME)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))
    assert [r["loss"] for r in records if "loss" in r] == losses
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert records[-1] == {"step": 20, "val_loss": pytest.approx(records[-1]["val_loss"])}
    plot = out / PLOT_NAME
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(plot) in stdout
    # a second fresh run in the same folder never takes over the first one's checkpoints
    assert run_cli(launcher.main, ["--max-steps", "2", "--out", str(out), *FAST_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert load_checkpoint(out / "checkpoints")["step"] == 20
    assert run_cli(launcher.main, ["--max-steps", "2", "--overwrite", "--out", str(out), *FAST_FLAGS]) == 0
    assert "checkpoints.prev" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoints")["step"] == 2
    assert load_checkpoint(out / "checkpoints.prev")["step"] == 20
    assert len(read_log(out / LOG_NAME)) == 3 and len(read_log(out / "train_log.prev.jsonl")) == 21


def test_gpt_trainer_on_tiny_hf_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")

    def factory():
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=128)
        return transformers.GPT2LMHeadModel(config)

    cfg = TrainConfig(max_steps=12, lr=3e-3, out_dir=str(tmp_path / "gpt"), **FAST)
    result = GPTTrainer(cfg, factory).run()
    assert result.steps == 12 and result.losses[-1] < result.losses[0]
    assert result.sample.startswith(decode(ByteCorpus.load().val[:32]))
    state = load_checkpoint(tmp_path / "gpt" / "checkpoints")
    assert state["model_class"] == "GPT2LMHeadModel"
    fresh = factory()
    fresh.load_state_dict(state["model"])


# ---- launchers and bad input ---------------------------------------------------------------


BAD_INPUTS = {
    "unknown preset": ["--config", "gigantic"],
    "zero batch": ["--batch-size", "0"],
    "negative steps": ["--max-steps", "-5"],
    "missing data": ["--data", "/no/such/corpus"],
    "unknown device": ["--device", "quantum:0"],
    "unavailable device": ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:999"],
    "unknown backend": ["--backend", "deepspeed"],
    "not an int": ["--seq-len", "long"],
    "nothing to resume": ["--resume"],
    "window too long": ["--seq-len", "256"],
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, capsys):
    rc = run_cli(launcher.main, ["--max-steps", "1", "--out", str(tmp_path / "o"), *BAD_INPUTS[name]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_unwritable_out_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_cli(launcher.main, ["--out", str(blocker / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker / "run") in err


def test_train_script_bad_input_exits_2_with_one_line():
    proc = run_script("training/train.py", "--vb-mode", "turbo")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "turbo" in proc.stderr


def test_train_script_with_vb_learns_and_reports(tmp_path):
    out = tmp_path / "vb"
    proc = run_script("training/train.py", "--backend", "playground", "--enable-vb", "--vb-mode", "balanced",
                      "--config", "tiny", "--max-steps", "20", "--eval-interval", "0", "--out", str(out), *FAST_FLAGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Virtual Blackwell stats" in proc.stdout and "ckpt-00000020" in proc.stdout
    state = load_checkpoint(out / "checkpoints")
    assert state["vb_config"]["enabled"] and state["vb_config"]["mode"] == "balanced"
    assert sum(state["losses"][-5:]) / 5 < 0.75 * state["losses"][0]


def test_env_auto_enable_honours_vb_mode(tmp_path):
    env = {**script_env(), "ENABLE_VIRTUAL_BLACKWELL": "1", "VB_MODE": "memory"}
    proc = run_script("training/train.py", "--max-steps", "2", "--out", str(tmp_path / "env"), *FAST_FLAGS, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Virtual Blackwell stats" in proc.stdout
    assert load_checkpoint(tmp_path / "env" / "checkpoints")["vb_config"]["mode"] == "memory"


def test_train_vb_apt_script_enables_vb_and_takes_env_args(tmp_path):
    """The guide's ``--config ... --epochs 20``, kept short by $VB_TRAIN_ARGS (which the
    command line overrides: the --seq-len 16 given there wins over FAST_FLAGS' 32)."""
    env = {**script_env(), "VB_TRAIN_ARGS": " ".join(["--max-steps", "2", "--out", str(tmp_path / "apt"), *FAST_FLAGS])}
    proc = run_script("training/train_vb_apt.py", "--config", "tiny", "--epochs", "20", "--seq-len", "16", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = load_checkpoint(tmp_path / "apt" / "checkpoints")
    assert state["vb_config"]["mode"] == "balanced" and state["step"] == 2
    assert state["train_config"]["seq_len"] == 16 and state["train_config"]["epochs"] == 20
