"""``argparse`` in the user's language, for every command of the package.

Headings, ``--help`` and argparse's own complaints follow ``VB_LANG`` (Chinese by default),
and a complaint raises ``VBConfigError`` instead of exiting, so ``run_cli`` prints it as one
line with exit code 2 like every other bad input.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from apt_model.errors import VBConfigError
from apt_model.i18n import language, tr

# argparse's English complaints (Python 3.10-3.13) and their Chinese wording.
_ZH_COMPLAINTS = (
    (r"argument (?P<arg>\S+?): (?P<rest>.*)", "参数 {arg}: {rest}"),
    (r"invalid (?P<type>\w+) value: (?P<value>.*)", "无效的 {type} 值: {value}"),
    (r"invalid choice: (?P<value>.*?) \(choose from (?P<choices>.*)\)", "无效的选项 {value} (可选: {choices})"),
    (r"expected one argument", "需要一个值"),
    (r"expected at least one argument", "至少需要一个值"),
    (r"the following arguments are required: (?P<args>.*)", "缺少必需的参数: {args}"),
    (r"unrecognized arguments: (?P<args>.*)", "无法识别的参数: {args}"),
    (r"ambiguous option: (?P<option>\S+) could match (?P<matches>.*)", "有歧义的选项 {option}, 可能是 {matches}"),
    (r"not allowed with argument (?P<arg>.*)", "不能与参数 {arg} 同时使用"),
)


def _chinese(message: str) -> str:
    for pattern, wording in _ZH_COMPLAINTS:
        match = re.fullmatch(pattern, message)
        if match:
            parts = {key: _chinese(value) if key == "rest" else value
                     for key, value in match.groupdict().items()}
            return wording.format(**parts)
    return message


class _Formatter(argparse.HelpFormatter):
    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, tr("用法: ", "usage: ") if prefix is None else prefix)


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose help and errors follow ``VB_LANG``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        add_help = kwargs.pop("add_help", True)
        super().__init__(*args, add_help=False, **kwargs)
        self._positionals.title = tr("位置参数", "positional arguments")
        self._optionals.title = tr("选项", "options")
        if add_help:
            self.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS,
                              help=tr("显示此帮助并退出", "show this help message and exit"))

    def error(self, message: str) -> NoReturn:
        if language() == "zh":
            message = _chinese(message)
        raise VBConfigError(f"{self.prog}: {message}")
