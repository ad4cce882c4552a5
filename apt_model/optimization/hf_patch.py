"""Hugging Face models built while VB is on come out optimized.

``install`` wraps the builders on ``transformers.PreTrainedModel``: ``from_pretrained`` and
``_from_config`` (which ``AutoModel*.from_config`` and ``SomeModel._from_config`` go through).
The outermost build hands its model to ``vb_global.optimize`` when VB is enabled with
``auto_patch``; builds nested in it (or in a registered APT constructor) are left to it.

Direct construction (``LlamaForCausalLM(config)``) is not covered, and neither are the
sub-models such a constructor builds: call ``vb.optimize(model)`` on the result.

Installing never imports transformers (an optional extra). When
``transformers.modeling_utils`` is not loaded yet, a ``sys.meta_path`` finder waits for
its import, patches it right after the module has run, then removes itself. ``uninstall``
gives transformers its own builders back.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import FrameType, ModuleType
from typing import Any

from apt_model.optimization.autopatch import building, hand_over

_TARGET = "transformers.modeling_utils"
_BUILDERS = ("from_pretrained", "_from_config")

_patched: type | None = None  # the PreTrainedModel whose builders are wrapped
_originals: dict[str, Any] = {}  # builder name -> its original classmethod object
_finder: _PostImportFinder | None = None


def _inside_hf_constructor(frame: FrameType | None, base: type) -> bool:
    """Whether a ``base`` instance's ``__init__`` is running somewhere up the stack."""
    while frame is not None:
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), base):
            return True
        frame = frame.f_back
    return False


def _wrap(build: Callable[..., Any], base: type) -> classmethod:
    """A classmethod that runs ``build`` and hands the outermost build's model to VB."""

    @functools.wraps(build)
    def builder(cls: type, *args: Any, **kwargs: Any) -> Any:
        with building() as outermost:
            model = build(cls, *args, **kwargs)
        if outermost and not _inside_hf_constructor(sys._getframe(1), base):
            hand_over(model)
        return model

    return classmethod(builder)


def _patch(modeling_utils: ModuleType) -> None:
    """Wrap the builders of ``modeling_utils.PreTrainedModel`` (once)."""
    global _patched
    if _patched is not None:
        return
    base = modeling_utils.PreTrainedModel
    for name in _BUILDERS:
        original = base.__dict__[name]
        _originals[name] = original
        setattr(base, name, _wrap(original.__func__, base))
    _patched = base


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, gives the module its real loader back, then patches it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        _disarm()
        _patch(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.modeling_utils`` through the other finders, with a patching loader."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def _disarm() -> None:
    global _finder
    if _finder is not None:
        sys.meta_path.remove(_finder)
        _finder = None


def install() -> None:
    """Patch transformers now if its ``modeling_utils`` is loaded, else right after it loads."""
    global _finder
    module = sys.modules.get(_TARGET)
    if module is not None:
        _patch(module)
    elif _patched is None and _finder is None:
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Restore the original builders and drop a pending hook."""
    global _patched
    _disarm()
    if _patched is not None:
        for name, original in _originals.items():
            setattr(_patched, name, original)
        _originals.clear()
        _patched = None


def installed() -> bool:
    """Whether the builders are wrapped now."""
    return _patched is not None
