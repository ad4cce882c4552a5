"""Attach behaviour around a module's ``forward`` without touching its code or parameters.

The module's class is swapped for a cached subclass of the same name whose ``forward``
calls a wrapper around the original one. Parameters, buffers, state_dict keys, ``isinstance``
checks and pickling (which resolves the class by name to the original) are unaffected, and
``unwrap`` restores the plain class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

Wrapper = Callable[..., Any]  # wrapper(forward, module, *args, **kwargs)

_SUBCLASSES: dict[tuple[type, str], type] = {}


def _make_subclass(base: type, tag: str, wrapper: Wrapper) -> type:
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return wrapper(functools.partial(base.forward, self), self, *args, **kwargs)

    namespace = {
        "forward": forward,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_vb_base": base,
        "_vb_tag": tag,
    }
    return type(base.__name__, (base,), namespace)


def wrap_forward(module: nn.Module, tag: str, wrapper: Wrapper) -> None:
    """Run ``module.forward`` through ``wrapper``; a second call with the same tag is a no-op."""
    if wrapped_tags(module) and tag in wrapped_tags(module):
        return
    base = type(module)
    key = (base, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = _make_subclass(base, tag, wrapper)
    module.__class__ = _SUBCLASSES[key]


def wrapped_tags(module: nn.Module) -> list[str]:
    """The wrappers applied to ``module``, outermost first."""
    tags = []
    cls = type(module)
    while "_vb_tag" in cls.__dict__:
        tags.append(cls.__dict__["_vb_tag"])
        cls = cls.__dict__["_vb_base"]
    return tags


def original_class(module: nn.Module) -> type:
    """The class of ``module`` under the wrappers (``type(module)`` when there are none)."""
    cls = type(module)
    while "_vb_base" in cls.__dict__:
        cls = cls.__dict__["_vb_base"]
    return cls


def unwrap(module: nn.Module) -> None:
    """Restore the module's original class."""
    cls = type(module)
    while "_vb_base" in cls.__dict__:
        cls = cls.__dict__["_vb_base"]
    module.__class__ = cls
