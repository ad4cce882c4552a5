"""``vb estimate --plot``: the peak of each mode as a stacked bar of its components."""

from __future__ import annotations

import os
from pathlib import Path

from apt_model.estimator.estimate import COMPONENT_NAMES, COMPONENTS, Estimate


def plot_estimates(estimates: list[Estimate], png_path: str | os.PathLike) -> Path | None:
    """One stacked bar per estimate (its mode): the components live at its peak
    (``Estimate.at_peak``) and the runtime overhead, in GiB (MiB below 1 GiB), so each bar's height is
    ``peak_bytes``. Returns the PNG's path, or None when matplotlib is not installed; raises
    ``VBDataError`` when the PNG cannot be written."""
    try:
        from matplotlib import rc_context
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from apt_model.figures import figure_language, save_figure

    png_path = Path(png_path)
    style, text = figure_language()
    unit, scale = ("GiB", 2**30) if max(est.peak_bytes for est in estimates) >= 2**30 else ("MiB", 2**20)
    parts = {key: [est.at_peak.get(key, 0) / scale for est in estimates] for key in COMPONENTS}
    parts["runtime_overhead"] = [est.runtime_overhead / scale for est in estimates]
    first = estimates[0]
    step = (text(f"训练 ({first.optimizer})", f"training ({first.optimizer})") if first.training
            else text("解码", "decode"))
    with rc_context(style):
        figure = Figure(figsize=(8, 5), dpi=100, layout="tight")
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        modes = [est.mode for est in estimates]
        bottom = [0.0] * len(estimates)
        for key, values in parts.items():
            if any(values):
                ax.bar(modes, values, bottom=bottom, label=text(*COMPONENT_NAMES[key]))
                bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xlabel(text("模式", "mode"))
        ax.set_ylabel(text(f"峰值内存 ({unit})", f"peak memory ({unit})"))
        ax.set_title(f"{first.target} · {step} · batch {first.batch} × seq {first.seq} · {first.device}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        save_figure(figure, png_path, ("内存估算图", "memory estimate plot"))
    return png_path
