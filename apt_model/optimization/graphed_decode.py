"""Hugging Face ``generate()`` without its per-token host loop: greedy decoding as one CUDA-graph
replay a token.

:func:`attach` gives a Hugging Face causal LM a ``generate`` of its own (an instance attribute
over the class's; :func:`detach` removes it). On a CUDA device it takes the common call:
greedy search (``do_sample=False``, one beam), ``max_new_tokens`` or ``max_length``,
``eos_token_id`` / ``pad_token_id``, an ``attention_mask`` of ones, with the generation
config's static or dynamic cache. Any other call goes to Hugging Face's ``generate`` as it is.

A taken call runs the prompt through the model's forward into a ``StaticCache`` kept between
calls, then each new token is one replay of a CUDA graph of the decode step: the forward
(compiled by ``torch.compile`` with ``fullgraph=True``), the argmax (in two reductions,
:func:`~apt_model.ops.argmax.argmax_last`), and the token and cache
position advanced on the device. The host issues one replay a token and synchronizes only every
``EOS_CHECK_EVERY`` tokens, to look for end-of-sequence tokens (never without an
``eos_token_id``). Hugging Face's greedy loop instead runs its Python, its guards and a host
sync for every token. The result is Hugging Face's: the prompt and the new tokens, pad tokens
after a row's end-of-sequence token, and the call ends where every row has ended or at the
length asked for. A model whose step cannot be compiled or captured is handed back to Hugging
Face's ``generate`` from then on, with one warning.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from apt_model.i18n import tr
from apt_model.ops.argmax import argmax_last

ATTR = "_vb_graphed_decode"
EOS_CHECK_EVERY = 16
CACHE_LEN_STEP = 256  # cache lengths are rounded up to this: prompts of other lengths share a graph
KEPT_GRAPHS = 2  # (batch, cache length) steps kept, each with its static cache; the oldest goes first

# Generation-config fields a taken call may differ from the defaults in (anything else, such as
# sampling, beams, penalties, or output dicts, goes to Hugging Face). temperature / top_p /
# top_k do nothing in greedy search.
_ALLOWED_CONFIG = {
    "max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "bos_token_id",
    "do_sample", "num_beams", "use_cache", "cache_implementation", "output_attentions",
    "output_hidden_states", "return_dict_in_generate", "temperature", "top_p", "top_k",
    "_from_model_config", "transformers_version",
}
# ... and the values these must have where they are set (None: the default).
_REQUIRED = {"do_sample": False, "num_beams": 1, "use_cache": True, "output_attentions": False,
             "output_hidden_states": False, "return_dict_in_generate": False}


def is_generative_hf_model(model: nn.Module) -> bool:
    """A Hugging Face model with ``generate`` and a generation config (a causal LM)."""
    return (callable(getattr(model, "generate", None)) and hasattr(model, "generation_config")
            and hasattr(model, "prepare_inputs_for_generation")
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", True))


def attach(model: nn.Module) -> bool:
    """Give ``model`` the graphed ``generate``; False (nothing done) for a model that is not a
    Hugging Face causal LM."""
    if not is_generative_hf_model(model) or ATTR in model.__dict__:
        return False
    decoder = GraphedDecoder(model)
    object.__setattr__(model, ATTR, decoder)
    object.__setattr__(model, "generate", decoder.generate)
    return True


def detach(model: nn.Module) -> None:
    """Hugging Face's ``generate`` back, the graphs and caches freed."""
    if ATTR in model.__dict__:
        object.__delattr__(model, ATTR)
        object.__delattr__(model, "generate")


@dataclass
class _Step:
    """A captured decode step over one kept cache: its static inputs and its graph."""

    cache: Any
    token: Tensor  # [batch, 1] the token the next replay feeds
    position: Tensor  # [1] its cache position
    index: Tensor  # [1] where the next replay writes its token in ``tokens``
    tokens: Tensor  # [batch, cache length] the new tokens
    graph: torch.cuda.CUDAGraph | None = None


@dataclass(frozen=True)
class _Call:
    """What a taken call asks for."""

    ids: Tensor
    new: int
    eos: tuple[int, ...]
    pad: int | None


def greedy_call(ids: Tensor, mask: Tensor | None, generation_config: Any,
                kwargs: dict[str, Any]) -> _Call | None:
    """What a ``generate(ids, generation_config, attention_mask=mask, **kwargs)`` call asks for,
    when it is a plain greedy search the graphed loop runs as Hugging Face would; else None."""
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype != torch.long:
        return None
    config = copy.deepcopy(generation_config)
    unused = config.update(**kwargs)
    if any(value is not None for value in unused.values()):
        return None  # logits processors, stopping criteria, streamers, ...
    if set(config.to_diff_dict()) - _ALLOWED_CONFIG:
        return None
    if any(getattr(config, key, None) not in (None, value) for key, value in _REQUIRED.items()):
        return None
    if config.cache_implementation not in (None, "static", "dynamic"):
        return None
    if mask is not None and not bool(mask.all()):
        return None  # padding: positions differ by row
    prompt = ids.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
    if new is None or new < 1:
        return None
    eos = config.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    return _Call(ids=ids, new=int(new), eos=eos, pad=pad)


def padded_like_greedy_search(tokens: Tensor, eos: tuple[int, ...], pad: int | None) -> Tensor:
    """New tokens [batch, n] as Hugging Face's greedy search returns them: after each row's
    first end-of-sequence token ``pad``, and cut after the step where the last row ended."""
    is_eos = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first
    if pad is not None:
        tokens = tokens.masked_fill(after, pad)
    if bool(is_eos.any(dim=1).all()):
        tokens = tokens[:, :int(is_eos.long().argmax(dim=1).max()) + 1]
    return tokens


def _logits(model: nn.Module, ids: Tensor, cache: Any, position: Tensor, **extra: Any) -> Tensor:
    """The model's logits for ``ids`` at cache positions ``position``, writing ``cache``."""
    return model(input_ids=ids, past_key_values=cache, cache_position=position,
                 position_ids=position.expand(ids.shape[0], -1), use_cache=True, **extra).logits


class GraphedDecoder:
    """The ``generate`` :func:`attach` installs, with the steps it keeps."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hf_generate: Callable[..., Any] = type(model).generate.__get__(model)
        self.steps: OrderedDict[tuple[int, int], _Step] = OrderedDict()
        self.failed: str | None = None
        self._forward: Callable[[Tensor, Any, Tensor], Tensor] | None = None
        self._weights_at: tuple[int, ...] = ()  # where the captured steps read the weights
        self._keep_one = "logits_to_keep" in inspect.signature(model.forward).parameters

    def __getstate__(self) -> dict[str, Any]:
        """Copied (``copy.deepcopy`` of the model) without its graphs, caches and compiled step,
        which the copy makes again at its first call."""
        return dict(self.__dict__, steps=OrderedDict(), _forward=None, _weights_at=())

    def forget_stale_steps(self) -> None:
        """Drop the captured steps when a weight or buffer of the model has moved (``.to()``,
        ``freeze_fp4``, a layer replaced): their graphs read the old addresses. Weights
        changed in place (``load_state_dict``) need nothing: the graphs read them anew."""
        where = tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))
        if where != self._weights_at:
            self.steps.clear()
            self._weights_at = where

    # ------------------------------------------------------------------ the call

    def generate(self, inputs: Tensor | None = None, generation_config: Any = None,
                 **kwargs: Any) -> Any:
        """Hugging Face's ``generate`` signature; the graphed loop where it applies."""
        call = None if self.failed else self._taken(inputs, generation_config, kwargs)
        if call is None:
            return self.hf_generate(inputs, generation_config, **kwargs)
        try:
            # Inference mode always, so the kept caches and buffers are inference tensors
            # whatever mode the caller is in; the result is made outside it, a plain tensor.
            with torch.inference_mode():
                new = self._decode(call)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever stops compiling or capturing the step
            self._give_up(exc)
            return self.hf_generate(inputs, generation_config, **kwargs)
        if call.eos:
            new = padded_like_greedy_search(new, call.eos, call.pad)
        return torch.cat([call.ids, new], dim=1)

    def _taken(self, inputs: Tensor | None, generation_config: Any,
               kwargs: dict[str, Any]) -> _Call | None:
        """The call as a :class:`_Call` when the graphed loop gives Hugging Face's result."""
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        mask = kwargs.pop("attention_mask", None)
        if not isinstance(ids, Tensor) or ids.device.type != "cuda":
            return None
        return greedy_call(ids, mask, generation_config or self.model.generation_config, kwargs)

    def _give_up(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        self.steps.clear()
        warnings.warn(tr(
            f"VB: 图捕获的解码不适用于此模型（{self.failed[:300]}），以后改用 Hugging Face 的 generate()",
            f"VB: graphed decoding does not work for this model ({self.failed[:300]}); "
            "Hugging Face's generate() runs from now on"), RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the loop

    def _decode(self, call: _Call) -> Tensor:
        """The new tokens [batch, n] as the graph wrote them (through the step where every row
        has met an end-of-sequence token, or all of them)."""
        self.forget_stale_steps()
        ids = call.ids
        batch, prompt = ids.shape
        step = self._step(batch, prompt + call.new, ids.device)
        self._prefill(step, ids)
        eos = torch.tensor(call.eos, device=ids.device) if call.eos else None
        done = 1
        while done < call.new:
            chunk = min(EOS_CHECK_EVERY if call.eos else call.new, call.new - done)
            for _ in range(chunk):
                step.graph.replay()
            done += chunk
            if eos is not None and bool(torch.isin(step.tokens[:, :done], eos).any(dim=1).all()):
                break
        return step.tokens[:, :done]

    def _prefill(self, step: _Step, ids: Tensor) -> None:
        """The prompt into the (reset) cache; its next token into ``token`` and ``tokens[:, 0]``."""
        step.cache.reset()
        prompt = ids.shape[1]
        position = torch.arange(prompt, device=ids.device)
        extra = {"logits_to_keep": 1} if self._keep_one else {}
        logits = _logits(self.model, ids, step.cache, position, **extra)
        first = argmax_last(logits[:, -1])[:, None]
        step.token.copy_(first)
        step.tokens[:, :1].copy_(first)
        step.position.fill_(prompt)
        step.index.fill_(1)

    def _step(self, batch: int, length: int, device: torch.device) -> _Step:
        """The kept step for ``batch`` rows and a cache of ``length`` (rounded up), captured at
        its first use."""
        cache_len = -(-length // CACHE_LEN_STEP) * CACHE_LEN_STEP
        key = (batch, cache_len)
        step = self.steps.get(key)
        if step is not None:
            self.steps.move_to_end(key)
            return step
        while len(self.steps) >= KEPT_GRAPHS:
            self.steps.popitem(last=False)
        from transformers import StaticCache  # a Hugging Face model: transformers is there

        zeros = dict(dtype=torch.long, device=device)
        step = _Step(cache=StaticCache(config=self.model.config, max_cache_len=cache_len),
                     token=torch.zeros(batch, 1, **zeros), position=torch.zeros(1, **zeros),
                     index=torch.zeros(1, **zeros), tokens=torch.zeros(batch, cache_len, **zeros))
        self._capture(step, batch, device)
        self.steps[key] = step
        return step

    def _capture(self, step: _Step, batch: int, device: torch.device) -> None:
        """Warm the compiled step up on a side stream (the cache filled by a one-token prompt),
        then capture one step into a CUDA graph."""
        forward = self._compiled_forward()

        def decode_step() -> None:
            logits = forward(step.token, step.cache, step.position)
            token = argmax_last(logits[:, -1])[:, None]
            step.token.copy_(token)
            step.tokens.index_copy_(1, step.index, token)
            step.position.add_(1)
            step.index.add_(1)

        self._prefill(step, torch.zeros(batch, 1, dtype=torch.long, device=device))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                decode_step()
        torch.cuda.current_stream(device).wait_stream(side)
        self._prefill(step, torch.zeros(batch, 1, dtype=torch.long, device=device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_step()
        step.graph = graph

    def _compiled_forward(self) -> Callable[[Tensor, Any, Tensor], Tensor]:
        if self._forward is None:
            self._forward = torch.compile(functools.partial(_logits, self.model), fullgraph=True,
                                          dynamic=False)
        return self._forward
