"""``vb generate``: text from a saved APT checkpoint, and one-line errors for what it cannot use."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from apt_model.cli import main
from apt_model.errors import VBConfigError, VBDataError, VBDeviceError
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization import config as vb_config
from apt_model.training.checkpoint import save_checkpoint
from apt_model.training.data import decode, encode


def vb(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in vb_config.ENV_VARS}
    return subprocess.run([sys.executable, "-m", "apt_model.cli", *args], capture_output=True, text=True,
                          env={**clean, "VB_LANG": "en", **env}, timeout=120)


def save(root, model: torch.nn.Module, model_class: str, model_config: dict | None):
    return save_checkpoint(root, {"model": model.state_dict(), "step": 1, "train_config": {"preset": "tiny"},
                                  "model_config": model_config, "model_class": model_class})


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding one checkpoint of a tiny APT model, and that model."""
    torch.manual_seed(0)
    model = APTModel(APTConfig.from_preset("tiny"))
    folder = tmp_path_factory.mktemp("run")
    save(folder / "checkpoints", model, "APTModel", dataclasses.asdict(model.config))
    return folder, model


def expected(model: APTModel, prompt: str, n: int, **sampling) -> str:
    return decode(model.generate(encode(prompt).long()[None], max_new_tokens=n, **sampling)[0])


def test_greedy_output_matches_the_model(run):
    folder, model = run
    proc = vb("generate", str(folder), "--prompt", "Hello", "--max-new-tokens", "8", "--greedy")
    assert proc.returncode == 0, proc.stderr
    want = expected(model, "Hello", 8, do_sample=False)
    assert proc.stdout.startswith("Hello") and len(want.encode()) >= len("Hello") + 8
    assert proc.stdout == want + "\n"


@pytest.mark.parametrize("where", ["run", "root", "ckpt"])
def test_checkpoint_given_as_run_root_or_checkpoint_folder(run, capsys, where):
    folder, model = run
    path = {"run": folder, "root": folder / "checkpoints", "ckpt": folder / "checkpoints" / "ckpt-00000001"}[where]
    assert main(["generate", str(path), "--prompt", "ab", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out == expected(model, "ab", 5, do_sample=False) + "\n"


def test_sampling_is_seeded(run, capsys):
    folder, model = run
    args = ["generate", str(folder), "--prompt", "The ", "--max-new-tokens", "12", "--seed", "7", "--device", "cpu"]
    outputs = []
    for _ in range(2):
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    want = expected(model, "The ", 12, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(7))
    assert outputs == [want + "\n"] * 2


def test_generate_needs_neither_numpy_nor_transformers_and_leaves_vb_off(run):
    folder, _ = run
    script = ("import sys; sys.modules['numpy'] = None\n"
              "from apt_model.cli import main\n"
              "from apt_model.optimization import vb_global\n"
              f"main(['generate', {str(folder)!r}, '--max-new-tokens', '4'])\n"
              "assert 'transformers' not in sys.modules and 'matplotlib' not in sys.modules\n"
              "assert not vb_global.is_enabled()\n")
    clean = {k: v for k, v in os.environ.items() if k not in vb_config.ENV_VARS}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                          env={**clean, "VB_LANG": "en"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The ")


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_path_is_one_line(tmp_path):
    assert_one_line_error(vb("generate", str(tmp_path / "nowhere")), "does not exist")


def test_non_apt_checkpoint_is_one_line(tmp_path):
    save(tmp_path / "checkpoints", torch.nn.Linear(2, 2, bias=False), "GPT2LMHeadModel", None)
    assert_one_line_error(vb("generate", str(tmp_path), "--greedy"), "only APT checkpoints")


def test_folder_without_checkpoint(tmp_path):
    with pytest.raises(VBDataError, match="no checkpoint in"):
        main(["generate", str(tmp_path)])


def test_weights_that_do_not_fit_the_recorded_config(tmp_path):
    model = APTModel(APTConfig.from_preset("tiny"))
    save(tmp_path, model, "APTModel", dataclasses.asdict(APTConfig.from_preset("tiny", d_model=64)))
    with pytest.raises(VBConfigError, match="does not match its model configuration"):
        main(["generate", str(tmp_path)])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-new-tokens", "300"], "at most 252 new tokens"),
        (["--max-new-tokens", "-1"], "must not be negative"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--top-k", "-3"], "--top-k must not be negative"),
        (["--prompt", ""], "--prompt must not be empty"),
        (["--device", "quantum"], "quantum"),
    ],
)
def test_bad_generation_options(run, args, needle):
    folder, _ = run
    with pytest.raises((VBConfigError, VBDeviceError), match=needle):
        main(["generate", str(folder), *args])
