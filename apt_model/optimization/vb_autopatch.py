"""Importing this module patches the APT model classes: a model built while VB is enabled
(and ``auto_patch`` is on) comes out optimized. More classes can be registered, and
``install`` also arms the Hugging Face hook (``hf_patch``).

Only the outermost construction on a thread is handed to VB: a registered model built
inside another one (or a Hugging Face model loaded inside a registered constructor) is
optimized as part of the outer model.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

from torch import nn

_registered: dict[type, object] = {}
_local = threading.local()


@contextlib.contextmanager
def building() -> Iterator[bool]:
    """Count one model construction on this thread; yields whether it is the outermost."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield depth == 0
    finally:
        _local.depth = depth


def hand_over(model: nn.Module) -> None:
    """Optimize a just-built model when VB is on with ``auto_patch``."""
    from apt_model.optimization import vb_global

    config = vb_global.active_config()
    if config is not None and config.auto_patch:
        vb_global.optimize(model)


def register(cls: type[nn.Module]) -> type[nn.Module]:
    """Wrap ``cls.__init__`` so the outermost constructor hands the new model to VB."""
    if cls in _registered:
        return cls
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: nn.Module, *args, **kwargs) -> None:
        with building() as outermost:
            original(self, *args, **kwargs)
        if outermost:
            hand_over(self)

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
    """Patch the APT model family and arm the Hugging Face hook (safe to call again)."""
    from apt_model.modeling.apt_model import APTLargeModel, APTModel
    from apt_model.optimization import hf_patch

    register(APTModel)
    register(APTLargeModel)
    hf_patch.install()


install()
