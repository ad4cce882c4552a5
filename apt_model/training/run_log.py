"""A run's training log as JSON lines, and its loss curve as a PNG.

The trainer writes ``<out>/train_log.jsonl`` (``LOG_NAME``) beside ``<out>/checkpoints``: one
JSON object per line, appended and flushed as it happens, so a crash loses at most the line
being written. The records it writes:

* every training step: ``{"step", "loss", "lr", "tokens_per_s", "memory_bytes", "epoch",
  "time_s"}``: the step just finished (1-based, as in checkpoint names), its training loss,
  the learning rate it used, the training throughput of this invocation so far (tokens/s),
  the memory in use (device allocator bytes, or the process's resident bytes on the CPU;
  null when unknown), epochs done, and seconds since this invocation started training;
* every validation: ``{"step", "val_loss"}``, with the step it followed.

``RunLog`` accepts any JSON-serializable dict; non-finite numbers (a diverged loss) are
written as null, so every line is strict JSON (``jq`` and friends read it). A resumed run
opens the log with the checkpoint's step: lines of later steps, written by the run that
crashed after that checkpoint, are dropped first, so the log reads as if the run had never
stopped. A fresh run keeps the previous log as ``train_log.prev.jsonl``.

``plot_log`` draws the loss curve (``loss.png``, ``PLOT_NAME``) with matplotlib, an optional
dependency (``pip install -e ".[plot]"``); ``vb plot`` draws it afterwards.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from apt_model.errors import VBDataError
from apt_model.figures import figure_language, save_figure
from apt_model.i18n import tr

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.png"

# Log-scale y axis when the largest loss is at least this many times the smallest: the
# first steps' drop then no longer flattens the rest of the curve.
LOG_SCALE_RATIO = 3.0


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a log file, and whether its bytes are exactly those records' lines.

    The last line may be torn (a crash mid-write): dropped when it does not parse. A bad line
    anywhere else means the file is not such a log, and is an error naming the line.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VBDataError(tr(f"训练日志不存在: {path}", f"training log does not exist: {path}")) from None
    except OSError as exc:
        raise VBDataError(tr(f"无法读取训练日志 {path}: {exc.strerror}",
                             f"cannot read training log {path}: {exc.strerror}")) from None
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    records: list[dict[str, Any]] = []
    clean = raw.endswith(b"\n") or not raw
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines):
            clean = False
        else:
            raise VBDataError(tr(f"训练日志 {path} 第 {number} 行不是 JSON 对象",
                                 f"training log {path}: line {number} is not a JSON object"))
    return records, clean


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a JSON-lines log, in file order; a torn last line is skipped.

    Raises ``VBDataError`` when the file is missing or unreadable, or a line other than the
    last is not a JSON object.
    """
    return _parse_lines(Path(path))[0]


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def _line(record: dict[str, Any]) -> str:
    return json.dumps(_strict_json(record), allow_nan=False) + "\n"


class RunLog:
    """Append-only JSON-lines log of one run (use as a context manager, or call ``close``).

    ``resume_step`` is the step of the checkpoint the run resumes from: existing records with
    a larger ``"step"`` are dropped, and so is a torn last line, before anything is appended;
    records without a step are kept; the trimmed file is rewritten atomically. A fresh run
    (``resume_step`` 0) starts an empty log and keeps a previous one as ``<stem>.prev.jsonl``
    (``train_log.prev.jsonl``), as the trainer keeps old checkpoints in ``checkpoints.prev``.
    Raises ``VBDataError`` naming the path when the file cannot be read or written.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0) -> None:
        self.path = Path(path)
        if resume_step <= 0 and self.path.exists():
            self._set_aside()
        elif self.path.exists():
            self._trim(resume_step)
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise VBDataError(self._write_error(exc)) from None

    def _write_error(self, exc: OSError) -> str:
        reason = exc.strerror or str(exc)
        return tr(f"无法写入训练日志 {self.path}: {reason}", f"cannot write training log {self.path}: {reason}")

    def _set_aside(self) -> None:
        try:
            os.replace(self.path, self.path.with_suffix(".prev" + self.path.suffix))
        except OSError as exc:
            raise VBDataError(self._write_error(exc)) from None

    def _trim(self, resume_step: int) -> None:
        records, clean = _parse_lines(self.path)
        kept = [r for r in records if not (isinstance(r.get("step"), (int, float)) and r["step"] > resume_step)]
        if clean and len(kept) == len(records):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(map(_line, kept))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise VBDataError(self._write_error(exc)) from None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and flush it to the operating system.

        Raises ``TypeError`` for a value JSON cannot hold, ``VBDataError`` when the disk refuses.
        """
        line = _line(record)
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            raise VBDataError(self._write_error(exc)) from None

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _smooth(values: list[float], half: int) -> list[float]:
    """Centred moving average: each value becomes the mean of the values up to ``half``
    places either side of it (fewer at the ends), so the line does not lag the raw one."""
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _points(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a finite number under both "step" and ``key``."""
    steps: list[float] = []
    values: list[float] = []
    for record in records:
        step, value = record.get("step"), record.get(key)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (step, value))
        if numbers and math.isfinite(step) and math.isfinite(value):
            steps.append(step)
            values.append(value)
    return steps, values


def _minor_label(value: float, limits: tuple[float, float]) -> str:
    """Label the minor log ticks 2, 3 and 5 (times a power of ten) on an axis spanning less
    than 1.5 decades; wider axes show their powers of ten only."""
    low, high = limits
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if high / low < 10**1.5 and leading in (2, 3, 5) else ""


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path | None:
    """Draw the training loss (raw, light; plus a moving average) and the validation losses
    of a log into a PNG (default: ``loss.png`` beside the log); return its path.

    Returns None when matplotlib is not installed (``missing_matplotlib_message`` says what to
    do). Labels follow the message language; Chinese ones need a font with Chinese glyphs,
    and without one the labels are English. Raises ``VBDataError`` when the log cannot be
    read, holds no loss, or the PNG cannot be written.
    """
    try:
        from matplotlib import rc_context
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return None

    log_path = Path(log_path)
    png_path = Path(png_path) if png_path is not None else log_path.with_name(PLOT_NAME)
    records = read_log(log_path)
    steps, losses = _points(records, "loss")
    val_steps, val_losses = _points(records, "val_loss")
    if not losses and not val_losses:
        raise VBDataError(tr(f"训练日志 {log_path} 中没有损失记录", f"training log {log_path} holds no loss records"))

    style, text = figure_language()
    with rc_context(style):
        figure = Figure(figsize=(8, 5), dpi=100, layout="tight")
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        if losses:
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label=text("训练损失", "train loss"))
            half = min(50, len(losses) // 40)
            if half:
                ax.plot(steps, _smooth(losses, half), color="tab:blue", linewidth=1.8,
                        label=text(f"训练损失 ({2 * half + 1} 步平均)", f"train loss ({2 * half + 1}-step mean)"))
        if val_losses:
            ax.plot(val_steps, val_losses, "o-", color="tab:orange", markersize=4, linewidth=1.2,
                    label=text("验证损失", "validation loss"))
        values = losses + val_losses
        if min(values) > 0 and max(values) / min(values) >= LOG_SCALE_RATIO:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # "0.1", not 10⁻¹
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: _minor_label(value, ax.get_ylim())))
        ax.set_xlabel(text("步", "step"))
        ax.set_ylabel(text("损失 (交叉熵, nat)", "loss (cross-entropy, nats)"))
        ax.set_title(text(f"损失曲线: {log_path.parent.resolve().name}",
                          f"Loss curve: {log_path.parent.resolve().name}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save_figure(figure, png_path, ("损失曲线", "loss curve"))
    return png_path
