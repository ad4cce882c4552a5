"""Figures in the user's language: the labels' language and font, the atomic PNG write, and
the one line said when matplotlib is missing (the loss curve, ``vb estimate --plot``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apt_model.errors import VBDataError
from apt_model.i18n import language, tr

CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC",
             "AR PL UMing CN")


def missing_matplotlib_message(log_path: str | os.PathLike | None = None,
                               what: tuple[str, str] = ("损失曲线", "loss curve")) -> str:
    """The one line printed when no figure (``what``: its Chinese and English name) can be
    drawn for lack of matplotlib; with ``log_path`` it also says how to draw the loss curve
    later."""
    if log_path is None:
        return tr(f'未安装 matplotlib，无法画{what[0]}；安装: pip install -e ".[plot]"',
                  f'matplotlib is not installed, so no {what[1]} can be drawn; install it with '
                  'pip install -e ".[plot]"')
    return tr(f'未安装 matplotlib，未画损失曲线；安装: pip install -e ".[plot]" 然后运行 vb plot {log_path}',
              f'matplotlib is not installed, so no loss curve was drawn; install it with '
              f'pip install -e ".[plot]" and run: vb plot {log_path}')


def _cjk_font(font_manager: Any) -> str | None:
    """The first installed font that has Chinese glyphs, or None."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def figure_language() -> tuple[dict[str, Any], Callable[[str, str], str]]:
    """A figure's matplotlib style and its label chooser: Chinese labels where messages are
    Chinese and a font with Chinese glyphs is installed, else English (needs matplotlib)."""
    from matplotlib import font_manager

    font = _cjk_font(font_manager) if language() == "zh" else None
    zh = font is not None

    def text(chinese: str, english: str) -> str:
        return chinese if zh else english

    return ({"font.family": "sans-serif", "font.sans-serif": [font, "DejaVu Sans"]} if zh else {}), text


def save_figure(figure: Any, png_path: Path, what: tuple[str, str]) -> None:
    """Write ``figure`` as the PNG ``png_path`` atomically; ``VBDataError`` naming ``what`` (its
    Chinese and English name) when it cannot be written."""
    tmp = png_path.with_name(png_path.name + ".tmp")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise VBDataError(tr(f"无法写入{what[0]} {png_path}: {exc.strerror or exc}",
                             f"cannot write {what[1]} {png_path}: {exc.strerror or exc}")) from None
