"""Error types with messages meant for users, and the one-line reporting used by every CLI."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from apt_model.i18n import tr


class VBError(Exception):
    """Base of every error that the package reports to a user as one clear line."""


class VBConfigError(VBError, ValueError):
    """A bad option, mode, `.vbrc` file or environment variable."""


class VBDeviceError(VBError, RuntimeError):
    """An unknown or unusable device."""


class VBDataError(VBError, OSError):
    """A missing or unreadable data path, or an unwritable output folder."""


class VBUnsupportedError(VBError, NotImplementedError):
    """A use the package does not support (yet), named with what to do instead."""


class VBInterrupted(VBError):
    """A run stopped by a signal after saving its progress; the process exits 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def report(exc: VBError) -> None:
    """Print an error as one line on stderr."""
    print(tr("错误: ", "error: ") + str(exc), file=sys.stderr)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line entry point; report a `VBError` as one line on stderr and exit 2
    (a `VBInterrupted` run: its line, and 128 + the signal number)."""
    try:
        return int(main(argv) or 0)
    except VBInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except VBError as exc:
        report(exc)
        return 2
    except KeyboardInterrupt:
        print(tr("已中断", "interrupted"), file=sys.stderr)
        return 130


def positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool), else ``VBConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise VBConfigError(tr(f"{name} 必须是正整数, 得到 {value!r}", f"{name} must be a positive integer, got {value!r}"))
    return value


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]
