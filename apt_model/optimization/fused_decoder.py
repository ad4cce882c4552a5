"""A model's RMSNorms, gated SiLU MLPs and rotary embedding run the one-launch kernels of
:mod:`apt_model.ops.decoder` when it decodes eagerly on CUDA.

Which parts, found by what they compute rather than by class name:

* an RMSNorm: a module without children whose ``weight`` is 1-D and whose ``variance_epsilon``
  (or ``eps``) is a number, and whose forward computes Llama's formula;
* a gated MLP: ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` children, the forward
  ``down_proj(silu(gate_proj(x)) * up_proj(x))``;
* the rotary embedding: the ``apply_rotary_pos_emb`` function an attention module's code calls
  (a global of its modeling module), computing ``q * cos + rotate_half(q) * sin``.

"Computes" is checked before anything changes: the module's own forward runs on the CPU over
a stand-in copy with small random weights (the function on small random tensors) and must
equal the formula bit for bit. Gemma's ``x * (1 + w)`` norm, a GELU MLP or a partial rotary
embedding fail that check and are left as they are.

What changes: a matching module's class becomes a subclass whose forward takes the kernel
where :func:`~apt_model.ops.decoder.fused_here` allows it and otherwise calls the original
forward (inside ``torch.compile``, on the CPU, in training). A matching rotary function is
replaced in its modeling module by a wrapper while an optimized model lives; the wrapper
takes the kernel only inside the forward of that model's attention modules (whose classes
become subclasses marking that), so other models in the process compute exactly as before.
The undo puts classes and functions back.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import threading
import weakref
from collections.abc import Callable
from types import FunctionType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from apt_model.fp4.layer import note_traced_rms_norm
from apt_model.ops.decoder import (
    fused_here,
    fused_rms_norm,
    fused_rotary,
    fused_silu_mul,
    rms_norm,
    rotary,
    silu_mul,
)

__all__ = ["fuse_decoder_ops"]

_EPS_NAMES = ("variance_epsilon", "eps")
_MLP_CHILDREN = ("gate_proj", "up_proj", "down_proj", "act_fn")
_ROTARY_NAME = "apply_rotary_pos_emb"

# (original class, what it is: "mlp", "attention" or "norm:<eps attribute>") -> the subclass
_SUBCLASSES: dict[tuple[type, str], type] = {}
# id of a modeling module's globals -> [the globals, the original function, models using it]
_ROTARY: dict[int, list] = {}
# .inside: the forward of an optimized model's attention runs on this thread (rotary kernel on)
_ATTENTION = threading.local()


def _stand_in(module: nn.Module, parameters: dict[str, Any] | None = None,
              modules: dict[str, nn.Module] | None = None) -> nn.Module:
    """A shallow copy of ``module`` whose parameters / submodules named are replaced (the
    original is untouched)."""
    probe = copy.copy(module)
    object.__setattr__(probe, "_parameters", {**module._parameters, **(parameters or {})})
    object.__setattr__(probe, "_modules", {**module._modules, **(modules or {})})
    object.__setattr__(probe, "_forward_hooks", {})
    object.__setattr__(probe, "_forward_pre_hooks", {})
    return probe


def _equal_on(run: Callable[[], Any], expected: Callable[[], Any]) -> bool:
    """Whether ``run()`` gives exactly what ``expected()`` gives (False if it raises)."""
    try:
        with torch.no_grad():
            got, want = run(), expected()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        return len(got) == len(want) and all(
            isinstance(g, Tensor) and g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
            for g, w in zip(got, want, strict=True))
    except Exception:  # noqa: BLE001 - any failure means "not this formula"
        return False


def _norm_eps_name(module: nn.Module) -> str | None:
    """The eps attribute of ``module`` if it computes Llama's RMSNorm, else None."""
    weight = module._parameters.get("weight")
    if module._modules or weight is None or weight.dim() != 1 or not weight.is_floating_point():
        return None
    name = next((n for n in _EPS_NAMES if isinstance(getattr(module, n, None), float)), None)
    if name is None:
        return None
    eps = getattr(module, name)
    generator = torch.Generator().manual_seed(0)
    stand_in = nn.Parameter(torch.randn(24, generator=generator).to(weight.dtype), requires_grad=False)
    probe = _stand_in(module, {"weight": stand_in})
    forward = type(module).forward
    for dtype in {weight.dtype, torch.float32}:
        x = (torch.randn(3, 24, generator=generator) * 3).to(dtype)
        if not _equal_on(lambda x=x: forward(probe, x), lambda x=x: rms_norm(x, stand_in, eps)):
            return None
    return name


def _is_silu_mlp(module: nn.Module) -> bool:
    if not all(isinstance(module._modules.get(name), nn.Module) for name in _MLP_CHILDREN):
        return False
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = {"gate_proj": nn.Linear(8, 16), "up_proj": nn.Linear(8, 16),
                 "down_proj": nn.Linear(16, 8)}
    probe = _stand_in(module, modules=parts)
    x = torch.randn(3, 8, generator=generator)

    def formula() -> Tensor:
        return parts["down_proj"](silu_mul(parts["gate_proj"](x), parts["up_proj"](x)))

    return _equal_on(lambda: type(module).forward(probe, x), formula)


def _norm_forward(original: Callable, eps_name: str) -> Callable:
    def forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            out = original(self, hidden_states)
            if not torch.is_grad_enabled():  # a frozen FP4 product reading out may make it
                note_traced_rms_norm(out, hidden_states, self.weight, getattr(self, eps_name))
            return out
        fused = fused_rms_norm(hidden_states, self.weight, getattr(self, eps_name))
        return fused if fused is not None else original(self, hidden_states)

    return forward


def _mlp_forward(original: Callable) -> Callable:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        if not fused_here(x):
            return original(self, x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        hidden = fused_silu_mul(gate, up)
        if hidden is None:
            hidden = self.act_fn(gate) * up
        return self.down_proj(hidden)

    return forward


def _attention_forward(original: Callable) -> Callable:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return original(self, *args, **kwargs)
        outer = getattr(_ATTENTION, "inside", False)
        _ATTENTION.inside = True
        try:
            return original(self, *args, **kwargs)
        finally:
            _ATTENTION.inside = outer

    return forward


def _fused_class(cls: type, kind: str) -> type:
    """The subclass of ``cls`` with the fused forward for ``kind`` (made once)."""
    key = (cls, kind)
    sub = _SUBCLASSES.get(key)
    if sub is None:
        if kind == "mlp":
            forward = _mlp_forward(cls.forward)
        elif kind == "attention":
            forward = _attention_forward(cls.forward)
        else:
            forward = _norm_forward(cls.forward, kind.removeprefix("norm:"))
        # The original's name (code that matches class names, such as Hugging Face's lists
        # of modules not to split, still finds it); a unique qualified name under which this
        # module holds it, for pickle.
        qualname = f"VBFused{len(_SUBCLASSES)}_{cls.__name__}"
        sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__,
                                          "__qualname__": qualname})
        setattr(sys.modules[__name__], qualname, sub)
        _SUBCLASSES[key] = sub
    return sub


def _rotary_wrapper(original: FunctionType) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any,
                             **kwargs: Any) -> tuple[Tensor, Tensor]:
        if getattr(_ATTENTION, "inside", False) and not args and not kwargs:
            fused = fused_rotary(q, k, cos, sin)
            if fused is not None:
                return fused
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._vb_original = original
    return apply_rotary_pos_emb


def _computes_rotary(function: Callable) -> bool:
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, h, 3, 8, generator=generator).bfloat16() for h in (4, 2))
    cos, sin = (torch.randn(1, 3, 8, generator=generator).bfloat16() for _ in range(2))
    return _equal_on(lambda: tuple(function(q, k, cos, sin)), lambda: rotary(q, k, cos, sin))


def _use_rotary(namespace: dict) -> Callable[[], None] | None:
    """Wrap ``namespace``'s rotary function (once for every model using it); the undo, or
    None when the function does not compute the formula."""
    entry = _ROTARY.get(id(namespace))
    if entry is None:
        original = namespace.get(_ROTARY_NAME)
        if not isinstance(original, FunctionType) or not _computes_rotary(original):
            return None
        entry = _ROTARY[id(namespace)] = [namespace, original, 0]
        namespace[_ROTARY_NAME] = _rotary_wrapper(original)
    entry[2] += 1
    done = []

    def undo() -> None:
        if done:
            return
        done.append(True)
        entry[2] -= 1
        if entry[2] == 0:
            entry[0][_ROTARY_NAME] = entry[1]
            del _ROTARY[id(entry[0])]

    return undo


def _swap_class(module: nn.Module, kind: str, undo: list[Callable[[], None]]) -> None:
    cls = type(module)
    module.__class__ = _fused_class(cls, kind)
    undo.append(functools.partial(object.__setattr__, module, "__class__", cls))


def fuse_decoder_ops(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Give ``model``'s RMSNorms, gated SiLU MLPs and rotary embedding the fused kernels;
    returns (modules and functions changed, the undo)."""
    with _disable_current_modes():  # real CPU tensors for the probes, even while a model is
        return _fuse(model)           # traced under a fake or tracking dispatch mode


def _fuse(model: nn.Module) -> tuple[int, Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    callers: dict[int, tuple[dict, list[nn.Module]]] = {}  # id -> (rotary namespace, its callers)
    for module in model.modules():
        cls = type(module)
        if cls.__module__ == __name__:  # fused already
            continue
        function = inspect.unwrap(cls.forward)  # under decorators such as deprecate_kwarg
        globals_ = getattr(function, "__globals__", None)
        names = getattr(getattr(function, "__code__", None), "co_names", ())
        if isinstance(globals_, dict) and _ROTARY_NAME in globals_ and _ROTARY_NAME in names:
            callers.setdefault(id(globals_), (globals_, []))[1].append(module)
        if _is_silu_mlp(module):
            _swap_class(module, "mlp", undo)
        else:
            eps_name = _norm_eps_name(module)
            if eps_name is not None:
                _swap_class(module, f"norm:{eps_name}", undo)
    for namespace, modules in callers.values():
        put_back = _use_rotary(namespace)
        if put_back is not None:
            undo.append(put_back)
            weakref.finalize(model, put_back)  # a model dropped without vb.restore
            for module in modules:
                _swap_class(module, "attention", undo)

    def undo_all() -> None:
        for step in reversed(undo):
            step()

    return len(undo), undo_all
