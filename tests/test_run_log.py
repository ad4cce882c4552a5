"""The JSON-lines training log (write, read, resume trimming) and its loss curve (``vb plot``)."""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest

from apt_model.cli import main
from apt_model.errors import VBConfigError, VBDataError
from apt_model.figures import missing_matplotlib_message
from apt_model.training.run_log import (
    LOG_NAME,
    PLOT_NAME,
    RunLog,
    plot_log,
    read_log,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def step_record(step: int) -> dict:
    return {"step": step, "loss": 5.5 * 0.97 ** step, "lr": 1e-3, "tokens_per_s": 1000.0,
            "memory_bytes": 123456, "epoch": step / 50, "time_s": 0.1 * step}


def write_run(path, steps: int, eval_every: int = 5) -> list[dict]:
    written = []
    with RunLog(path) as log:
        for step in range(1, steps + 1):
            written.append(step_record(step))
            log.write(written[-1])
            if step % eval_every == 0:
                written.append({"step": step, "val_loss": 6.0 * 0.97 ** step})
                log.write(written[-1])
    return written


def test_write_then_read_round_trips_one_flushed_line_per_record(tmp_path):
    path = tmp_path / LOG_NAME
    log = RunLog(path)
    log.write(step_record(1))
    assert read_log(path) == [step_record(1)]  # flushed before close
    log.write({"step": 2, "loss": math.nan, "note": [math.inf, "x"]})
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]  # strict JSON
    assert read_log(path)[1] == {"step": 2, "loss": None, "note": [None, "x"]}


def test_resume_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / LOG_NAME
    written = write_run(path, steps=12)
    with open(path, "a") as fh:
        fh.write('{"step": 13, "loss": 2.')  # the crash tore this line
    assert read_log(path) == written

    with RunLog(path, resume_step=10) as log:
        assert read_log(path) == [r for r in written if r["step"] <= 10]
        log.write(step_record(11))
    records = read_log(path)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 12))
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10]
    assert path.read_text().endswith("\n") and not list(tmp_path.glob("*.tmp"))


def test_resume_keeps_a_complete_last_line_missing_its_newline(tmp_path):
    path = tmp_path / LOG_NAME
    path.write_text(json.dumps(step_record(1)) + "\n" + json.dumps(step_record(2)))
    with RunLog(path, resume_step=2) as log:
        log.write(step_record(3))
    assert [r["step"] for r in read_log(path)] == [1, 2, 3]


def test_fresh_run_starts_an_empty_log_and_keeps_the_previous_one(tmp_path):
    path = tmp_path / LOG_NAME
    first = write_run(path, steps=4)
    with RunLog(path) as log:
        log.write(step_record(1))
    assert read_log(path) == [step_record(1)]
    assert read_log(tmp_path / "train_log.prev.jsonl") == first


def test_bad_middle_line_and_missing_log_are_clear_errors(tmp_path):
    path = tmp_path / LOG_NAME
    path.write_text('{"step": 1, "loss": 3.0}\nnot json\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(VBDataError, match="line 2"):
        read_log(path)
    with pytest.raises(VBDataError, match="line 2"):
        RunLog(path, resume_step=1)
    with pytest.raises(VBDataError, match="does not exist"):
        read_log(tmp_path / "missing.jsonl")
    with pytest.raises(VBDataError, match="cannot write"):
        RunLog(tmp_path / "no-such-folder" / LOG_NAME)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_plot_writes_a_png(tmp_path, monkeypatch, lang):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("VB_LANG", lang)
    path = tmp_path / LOG_NAME
    write_run(path, steps=120, eval_every=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Chinese glyphs missing from the font
        png = plot_log(path)
    assert png == tmp_path / PLOT_NAME
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_of_a_log_without_losses_is_an_error(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / LOG_NAME
    path.write_text('{"note": "nothing yet"}\n')
    with pytest.raises(VBDataError, match="no loss"):
        plot_log(path, tmp_path / "out.png")


def test_plot_without_matplotlib_returns_none_and_says_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / LOG_NAME
    write_run(path, steps=3)
    assert plot_log(path) is None
    assert not (tmp_path / PLOT_NAME).exists()
    message = missing_matplotlib_message(path)
    assert "matplotlib is not installed" in message and 'pip install -e ".[plot]"' in message
    assert f"vb plot {path}" in message and "\n" not in message
    monkeypatch.setenv("VB_LANG", "zh")
    assert "未安装 matplotlib" in missing_matplotlib_message(path) and f"vb plot {path}" in missing_matplotlib_message(path)
    with pytest.raises(VBConfigError, match="matplotlib"):
        main(["plot", str(path)])


def test_vb_plot_takes_a_log_or_its_run_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / LOG_NAME, steps=30)
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / PLOT_NAME).read_bytes().startswith(PNG_SIGNATURE)
    out = tmp_path / "curve.png"
    assert main(["plot", str(tmp_path / LOG_NAME), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert capsys.readouterr().out.splitlines() == [f"loss curve: {tmp_path / PLOT_NAME}", f"loss curve: {out}"]
