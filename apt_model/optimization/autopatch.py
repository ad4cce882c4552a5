"""Constructors that hand new models to VB: the APT classes and any registered class.

A patched constructor hands the model it built to the handler the public switch sets
(``set_handler``; ``vb_global`` optimizes it when VB is on with ``auto_patch``). Only the
outermost construction on a thread is handed over: a registered model built inside another
one (or a Hugging Face model loaded inside a registered constructor, see ``hf_patch``) is
optimized as part of the outer model. Importing this module changes nothing; the guide's
``import apt_model.optimization.vb_autopatch`` is what patches.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

from torch import nn

_registered: dict[type, object] = {}
_local = threading.local()
_handler: Callable[[nn.Module], None] | None = None


def set_handler(handler: Callable[[nn.Module], None]) -> None:
    """Who receives each outermost-built model (the public switch)."""
    global _handler
    _handler = handler


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
    """Give a just-built model to the handler (if one is set)."""
    if _handler is not None:
        _handler(model)


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
    """Patch the APT model family (safe to call again)."""
    from apt_model.modeling.apt_model import APTLargeModel, APTModel

    register(APTModel)
    register(APTLargeModel)
