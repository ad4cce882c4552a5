"""Virtual Blackwell and the APT model family.

Setting ``ENABLE_VIRTUAL_BLACKWELL=1`` (or ``"enabled": true`` in a ``.vbrc``) turns VB on
as soon as the package is imported, in the mode from ``VB_MODE`` (default balanced).
"""

__version__ = "0.1.0"


def _auto_enable() -> None:
    import sys

    from apt_model.errors import VBConfigError
    from apt_model.optimization import config, vb_global

    try:
        settings = config.resolve().config
    except VBConfigError as exc:  # reported again, as an error, by whatever uses the setting
        print(f"Virtual Blackwell: {exc}", file=sys.stderr)
        return
    if settings.enabled:
        vb_global.enable()


_auto_enable()
