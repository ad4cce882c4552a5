"""Fixed-shape decoding for ``APTModel.generate``: the one-token step against a
``StaticKVCache``, captured once as a CUDA graph on CUDA.

Why: at batch 1 a decode step of a 1B-parameter model is memory-bound, about a millisecond of
reading weights, yet it launches hundreds of small kernels (norms, rotary, attention, the
autopoietic term), each costing microseconds of Python and driver time. Launch overhead then
hides what smaller weights (bf16, FP4) save. With a static cache every step has the same
shapes and tensors, so the whole step is captured once and replayed with one launch per token.

Decoders are kept per model (weakly: they go when the model goes) and per shape, so a second
``generate`` of the same shape reuses the cache and the graph. A graph replays the tensors it
was captured with, so it is captured again when the model's parameters, buffers, module
classes, instance forwards or attention implementations changed since (an in-place update,
``.to()``, a wrapper): a host-side check of ids, storage pointers and version counters.
Anything else a forward reads (e.g. a packed FP4 weight) must change only with those.

``compile_step=True`` runs the step through ``torch.compile`` before capture (it implies a
graph; without one it is ignored). ``cuda_graph=True`` on a device other than CUDA warns (a ``RuntimeWarning``) and runs the
same fixed-shape step without a graph, so code written for the GPU still runs on the CPU.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn

from apt_model.i18n import tr
from apt_model.modeling.kv_cache import KVCache, StaticKVCache

MAX_DECODERS_PER_MODEL = 4  # shapes kept per model; each holds its cache and graph memory
WARMUP_STEPS = 2  # eager steps before capture: lazy initialisation, FP4 packing, cuBLAS

_decoders: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, StaticDecoder]] = weakref.WeakKeyDictionary()


class StaticDecoder:
    """A ``StaticKVCache``, the static input token and, on CUDA, the captured one-token step.

    It holds no reference to the model (``step`` is given it), so keeping decoders per model
    does not keep the model alive.
    """

    def __init__(self, cache: StaticKVCache, cuda_graph: bool, fingerprint: tuple = (),
                 compile_step: bool = False) -> None:
        self.cache = cache
        # dynamic=False: every step has the same shapes, so one specialised graph serves all.
        self.run_step = torch.compile(_decode_step, dynamic=False) if compile_step else _decode_step
        self.token = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)
        self.cuda_graph = cuda_graph
        self.fingerprint = fingerprint
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the graph's output, overwritten by every replay

    def step(self, model: nn.Module, next_token: Tensor) -> Tensor:
        """Feed ``next_token`` (B,) at the cache's position; return the logits (B, vocab).

        With a graph the logits tensor is the same at every call: read it before the next.
        """
        cache = self.cache
        if cache.length >= cache.max_len:
            raise ValueError(tr(f"静态缓存已满 (max_len={cache.max_len})",
                                f"static cache full (max_len={cache.max_len})"))
        self.token.copy_(next_token.view(-1, 1))
        if not self.cuda_graph:
            return self._forward(model)
        if self.graph is None:
            self._capture(model)
        self.graph.replay()
        cache.length += 1  # the replay advanced ``position`` on the device; mirror it
        return self.logits

    def _forward(self, model: nn.Module) -> Tensor:
        return self.run_step(model, self.token, self.cache)

    def _capture(self, model: nn.Module) -> None:
        """Warm up on a side stream, then capture one step.

        Warm-up steps feed the real token at the real slot and rewind the position after each,
        so the first replay redoes exactly that step. They also make every lazily built
        tensor (rotary tables, FP4 packed weights, decode tables) exist before capture.
        """
        cache = self.cache
        length = cache.length
        with torch.cuda.device(cache.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._forward(model)
                    cache.seek(length)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._forward(model)
        cache.seek(length)  # capture ran no kernel but advanced the host mirror
        self.graph = graph


def _decode_step(model: nn.Module, token: Tensor, cache: StaticKVCache) -> Tensor:
    """One token through the model against the static cache; the logits of that token.

    Through the module call, so hooks and a forward wrapped from outside (VB's autocast
    subclass, FP4 layers) are part of what is compiled and captured.
    """
    return model(token, past_key_values=cache, use_cache=True).logits[:, -1]


def _tensor_key(t: Tensor) -> tuple[int, int, int]:
    try:
        version = t._version
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return id(t), t.data_ptr(), version


def fingerprint(model: nn.Module) -> tuple:
    """What a captured step depends on besides its cache (see the module docstring)."""
    tensors = tuple(_tensor_key(t) for t in itertools.chain(model.parameters(), model.buffers()))
    modules = tuple((type(m), m.__dict__.get("forward"), getattr(m, "attn_implementation", None))
                    for m in model.modules())
    return tensors, modules


def _graphs_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    warnings.warn(tr(
        f"cuda_graph=True 需要 CUDA 设备; {device.type} 上以静态缓存逐步解码, 不使用 CUDA 图",
        f"cuda_graph=True needs a CUDA device; on {device.type} the static-cache step runs "
        "without a CUDA graph"), RuntimeWarning, stacklevel=3)
    return False


def static_decoder(model: nn.Module, prefill: KVCache, max_len: int, cuda_graph: bool,
                   compile_step: bool = False) -> StaticDecoder:
    """The model's decoder for this shape (reused when it still fits), loaded with ``prefill``."""
    first = prefill[0].k
    if first is None:
        raise ValueError(tr("预填充缓存为空", "the prefill cache is empty"))
    batch, n_heads, _, head_dim = first.shape
    graph = (cuda_graph or compile_step) and _graphs_available(first.device)
    # Compiled only where the step is captured: the graph replays one compiled step, while
    # uncaptured steps would recompile for every cache length (a host-side int the step reads).
    compile_step = compile_step and graph
    key = (len(prefill.layers), batch, n_heads, head_dim, max_len, first.dtype, first.device, graph,
           compile_step)
    stamp = fingerprint(model) if graph else ()
    kept = _decoders.setdefault(model, OrderedDict())
    decoder = kept.pop(key, None)
    if decoder is not None and decoder.fingerprint == stamp:
        decoder.cache.load(prefill)
    else:
        del decoder  # free its cache and graph before building the next
        decoder = StaticDecoder(StaticKVCache.from_kv_cache(prefill, max_len), graph, stamp, compile_step)
    kept[key] = decoder
    while len(kept) > MAX_DECODERS_PER_MODEL:
        kept.popitem(last=False)
    return decoder


def cached_decoders(model: nn.Module) -> list[StaticDecoder]:
    """The decoders kept for ``model``, oldest first."""
    return list(_decoders.get(model, {}).values())


def clear(model: nn.Module) -> None:
    """Drop the decoders kept for ``model`` (their caches and graphs)."""
    _decoders.pop(model, None)
