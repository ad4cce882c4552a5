"""Importing this module patches the APT model classes: a model built while VB is enabled
(and ``auto_patch`` is on) comes out optimized. More classes can be registered."""

from __future__ import annotations

import functools
import threading

from torch import nn

_registered: dict[type, object] = {}
_local = threading.local()


def register(cls: type[nn.Module]) -> type[nn.Module]:
    """Wrap ``cls.__init__`` so the outermost constructor hands the new model to VB."""
    if cls in _registered:
        return cls
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: nn.Module, *args, **kwargs) -> None:
        depth = getattr(_local, "depth", 0)
        _local.depth = depth + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _local.depth = depth
        if depth == 0:
            from apt_model.optimization import vb_global

            config = vb_global.active_config()
            if config is not None and config.auto_patch:
                vb_global.optimize(self)

    _registered[cls] = original
    cls.__init__ = __init__
    return cls


def unregister(cls: type[nn.Module]) -> None:
    """Give ``cls`` back its own constructor."""
    original = _registered.pop(cls, None)
    if original is not None:
        cls.__init__ = original


def registered() -> list[type]:
    return list(_registered)


def install() -> None:
    """Patch the APT model family (safe to call again)."""
    from apt_model.modeling.apt_model import APTLargeModel, APTModel

    register(APTModel)
    register(APTLargeModel)


install()
