"""Virtual Blackwell and the APT model family.

Setting ``ENABLE_VIRTUAL_BLACKWELL=1`` (or ``"enabled": true`` in a ``.vbrc``) turns VB on
as soon as the package is imported, in the mode from ``VB_MODE`` (default balanced); the
banner naming the mode and where it came from appears when VB first optimizes a model.

A bad configuration (environment, ``.vbrc``, a device this machine lacks) stops the
process here, with one line on stderr and exit code 2, as every VB command does: a run
must not go on without the VB the user asked for.
"""

__version__ = "0.1.0"


def _auto_enable() -> None:
    from apt_model.errors import VBConfigError, report
    from apt_model.optimization import vb_global

    try:
        vb_global.configure(announce=False)
    except VBConfigError as exc:
        report(exc)
        raise SystemExit(2) from None


_auto_enable()
