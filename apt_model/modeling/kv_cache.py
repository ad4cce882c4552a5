"""The KV caches of the APT models: the growing one (``KVCache``) and the preallocated one
(``StaticKVCache``) whose decode step can be captured once as a CUDA graph."""

from __future__ import annotations

import torch
from torch import Tensor

from apt_model.i18n import tr


class LayerKVCache:
    """Keys and values one attention layer has seen so far, shape (B, H, T, head_dim).

    The cache grows by ``torch.cat``: simple, any batch size, no length to guess up front. The
    copying costs O(T^2) over a generation, negligible next to the model at these lengths.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys and values; return everything cached, the new ones included."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v


class KVCache:
    """One ``LayerKVCache`` per block; its length is the position offset of the next token."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]


class StaticKVCache:
    """Preallocated keys and values of every layer, written at a position held on the device.

    Why: a decode step against this cache has the same shapes and reads and writes the same
    tensors at every token, so it can be captured once as a CUDA graph and replayed. Nothing
    in the step depends on a Python int that changes per token:

    * ``position`` (a 0-dim int64 tensor on the cache's device) is the slot of the next token;
      the model's forward writes new keys and values there (``index_copy_`` along the sequence
      dimension) and then advances it in place;
    * the rotary cos/sin rows are gathered by that position tensor;
    * attention reads the whole buffer under the boolean mask ``arange(max_len) <= position``
      of each query, which is causal masking and hides the unused slots at once. Unused slots
      hold zeros or stale keys of an earlier sequence: finite, and masked out.

    ``length`` mirrors ``position`` on the host, so bounds are checked without a device sync;
    whoever advances ``position`` without the forward (a graph replay) advances it too.
    ``dtype`` must be the dtype the attention computes in (the model's, or the autocast one).
    Inference only: writing in place into shared buffers has no sensible gradient, so a
    forward that would record one is refused.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=self.k.device)
        self.length = 0
        # Set by ``begin`` for the forward in flight: the positions of its tokens (T,) and the
        # keys each of them may see (T, max_len).
        self.write_index: Tensor | None = None
        self.mask: Tensor | None = None
        self._slots = torch.arange(max_len, device=self.k.device)
        self.layers = [StaticLayerKVCache(self, i) for i in range(n_layers)]

    @classmethod
    def from_kv_cache(cls, cache: KVCache, max_len: int) -> StaticKVCache:
        """A static cache of room ``max_len`` holding what ``cache`` holds (e.g. after prefill)."""
        first = cache[0]
        if first.k is None:
            raise ValueError(tr("缓存为空", "the cache is empty"))
        batch, n_heads, _, head_dim = first.k.shape
        static = cls(len(cache.layers), batch, n_heads, max_len, head_dim, first.k.dtype, first.k.device)
        static.load(cache)
        return static

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def __getitem__(self, i: int) -> StaticLayerKVCache:
        return self.layers[i]

    def load(self, cache: KVCache) -> None:
        """Replace the contents by those of a ``KVCache``; the position follows its length."""
        length = cache.length
        if len(cache.layers) != len(self.layers) or length > self.max_len:
            raise ValueError(tr(
                f"无法载入: {len(cache.layers)} 层 × {length} 个位置, 静态缓存为 {len(self.layers)} 层 × {self.max_len}",
                f"cannot load {len(cache.layers)} layers x {length} positions into a static cache of "
                f"{len(self.layers)} layers x {self.max_len}"))
        for i, layer in enumerate(cache.layers):
            if layer.k is None or layer.v is None:
                continue
            self.layers[i].check(layer.k)
            self.k[i, :, :, :length].copy_(layer.k)
            self.v[i, :, :, :length].copy_(layer.v)
        self.seek(length)

    def seek(self, length: int) -> None:
        """Make ``length`` the position of the next token (later slots count as empty)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(tr(f"位置 {length} 超出静态缓存 [0, {self.max_len}]",
                                f"position {length} is outside the static cache [0, {self.max_len}]"))
        self.position.fill_(length)
        self.length = length

    def begin(self, n_tokens: int) -> Tensor:
        """Positions (T,) of the next ``n_tokens`` tokens, on the device; sets write index and mask."""
        if self.length + n_tokens > self.max_len:
            raise ValueError(tr(
                f"静态缓存已满: {self.length} + {n_tokens} 个词元超过 max_len={self.max_len}",
                f"static cache full: {self.length} + {n_tokens} tokens exceed its max_len={self.max_len}"))
        positions = self.position + torch.arange(n_tokens, device=self.position.device)
        self.write_index = positions
        self.mask = self._slots <= positions[:, None]
        return positions

    def advance(self, n_tokens: int) -> None:
        """Move past the tokens just written: on the device (captured in a graph) and the host."""
        self.position.add_(n_tokens)
        self.length += n_tokens


class StaticLayerKVCache:
    """One layer's view of a ``StaticKVCache``: buffers (B, H, max_len, head_dim) and the mask."""

    def __init__(self, parent: StaticKVCache, index: int) -> None:
        self.parent = parent
        self.k = parent.k[index]
        self.v = parent.v[index]

    @property
    def length(self) -> int:
        return self.parent.length

    @property
    def mask(self) -> Tensor | None:
        return self.parent.mask

    def check(self, k: Tensor) -> None:
        if k.dtype != self.k.dtype or k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
            raise ValueError(tr(
                f"静态缓存为 {self.k.dtype} {tuple(self.k.shape)}, 键为 {k.dtype} {tuple(k.shape)}",
                f"static cache holds {self.k.dtype} {tuple(self.k.shape)}, got keys {k.dtype} {tuple(k.shape)}"))

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys and values at the positions of the forward in flight; return the
        whole buffers (attention masks the slots not yet written)."""
        index = self.parent.write_index
        if index is None:
            raise RuntimeError(tr("静态缓存: 写入前须先调用 begin()",
                                  "static cache: begin() must be called before update()"))
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError(tr("静态缓存仅用于推理: 请在 torch.no_grad() 下调用",
                                  "the static cache is for inference: call under torch.no_grad()"))
        self.check(k)
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v
