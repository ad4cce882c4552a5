"""Virtual Blackwell and the APT model family.

Setting ``ENABLE_VIRTUAL_BLACKWELL=1`` (or ``"enabled": true`` in a ``.vbrc``) turns VB on
as soon as the package is imported, in the mode from ``VB_MODE`` (default balanced).
"""

__version__ = "0.1.0"


def _auto_enable() -> None:
    from apt_model.errors import VBConfigError, report
    from apt_model.optimization import config, vb_global

    try:
        settings = config.resolve().config
    except VBConfigError as exc:  # one line now; a CLI that fails on it does not repeat it
        report(exc)
        return
    if settings.enabled:
        vb_global.enable()


_auto_enable()
