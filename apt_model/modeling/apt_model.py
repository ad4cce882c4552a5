"""The APT model family: a small, readable decoder-only transformer.

Read it top to bottom: config and presets, the building blocks (RMSNorm, rotary positions,
SwiGLU MLP, attention with its autopoietic term), the block, and the model with its loss and
``generate``. The KV caches (grown by ``torch.cat``, and the preallocated static one that
makes decoding CUDA-graph capturable) live in ``apt_model.modeling.kv_cache``, the
fixed-shape decode step and its CUDA graph in ``apt_model.modeling.decoding``.

The library's optimizer works on this model from the outside only, so a few conventions are
part of the API and must not drift:

* every attention module has a plain attribute ``attn_implementation`` ("eager" or "sdpa"),
  read at every forward; ``"sdpa"`` looks up ``F.scaled_dot_product_attention`` at call time;
* the model has a plain attribute ``loss_implementation`` ("logits" or "fused"), read at every
  forward: with labels, "fused" computes the loss by ``apt_model.ops.linear_cross_entropy``
  straight from the final hidden states and returns no logits;
* transformer blocks are ``APTBlock`` modules in ``model.blocks`` and the model names them in
  ``_no_split_modules``; a block's forward takes positional tensors only, so
  ``torch.utils.checkpoint`` (non-reentrant) can wrap it;
* linear layers are plain ``nn.Linear`` without bias, so they can be swapped for FP4 ones;
* ``generate`` calls the model through ``self(...)``, so a forward replaced on the instance
  is honoured.

Presets (byte-level vocabulary of 256, tied embeddings; counts are exact and checked by the
tests; ``d_ff`` is about 8/3 of ``d_model``, rounded up)::

    name    d_model  n_layers  n_heads  head_dim  d_ff  max_seq_len     parameters
    tiny        128         4        4        32   384          256        902,784
    small       384         8        6        64  1024         1024     14,361,984
    medium      768        12       12        64  2048         1024     85,454,592
    large      1024        24       16        64  2816         2048    309,404,672
    xl         2048        24       16       128  5632         2048  1,235,372,032
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apt_model.errors import VBConfigError
from apt_model.i18n import tr
from apt_model.modeling import decoding
from apt_model.modeling.kv_cache import KVCache, LayerKVCache, StaticKVCache, StaticLayerKVCache
from apt_model.ops.argmax import argmax_last
from apt_model.ops.decode_attention import decode_attention
from apt_model.ops.linear_cross_entropy import linear_cross_entropy

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
LOSS_IMPLEMENTATIONS = ("logits", "fused")

# Every dimension is a multiple of 32 (FP4 blocks); head_dim >= 64 from "medium" up, so the
# flash-attention kernels apply. Parameter counts are in the module docstring.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=256),
    "small": dict(d_model=384, n_layers=8, n_heads=6, d_ff=1024, max_seq_len=1024),
    "medium": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_seq_len=1024),
    "large": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, max_seq_len=2048),
    "xl": dict(d_model=2048, n_layers=24, n_heads=16, d_ff=5632, max_seq_len=2048),
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class APTConfig:
    """Every size and switch of an APT model; the defaults are the "small" preset."""

    vocab_size: int = 256  # byte-level by default
    d_model: int = 384
    n_layers: int = 8
    n_heads: int = 6
    d_ff: int = 1024  # SwiGLU hidden size
    max_seq_len: int = 1024
    rope_theta: float = 10000.0  # rotary positions
    ap_rank: int = 16  # rank of the autopoietic low-rank gated term
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    attn_implementation: str = "eager"  # "eager" | "sdpa"
    loss_implementation: str = "logits"  # "logits" | "fused" (chunked LM head + loss)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        """Reject impossible shapes here, with a clear message, rather than deep in a matmul."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "ap_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise VBConfigError(tr(f"{name} 必须是正整数, 得到 {value!r}",
                                       f"{name} must be a positive integer, got {value!r}"))
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise VBConfigError(tr(
                f"d_model={self.d_model} 必须能被 n_heads={self.n_heads} 整除且 head_dim 为偶数",
                f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size"))
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise VBConfigError(_bad_attn_message(self.attn_implementation))
        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise VBConfigError(_bad_loss_message(self.loss_implementation))
        if not 0.0 <= self.dropout < 1.0:
            raise VBConfigError(tr(f"dropout 必须在 [0, 1) 内, 得到 {self.dropout}",
                                   f"dropout must be in [0, 1), got {self.dropout}"))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> APTConfig:
        """Build the named preset, with any field replaced by ``overrides``."""
        if name not in PRESETS:
            valid = ", ".join(PRESETS)
            raise VBConfigError(tr(f"未知的预设 {name!r}; 可用: {valid}",
                                   f"unknown preset {name!r}; valid presets: {valid}"))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise VBConfigError(tr(f"未知的配置项 {unknown}; 可用: {', '.join(sorted(fields))}",
                                   f"unknown config fields {unknown}; valid: {', '.join(sorted(fields))}"))
        return cls(**{**PRESETS[name], **overrides})

    def num_parameters(self) -> int:
        """Exact parameter count of ``APTModel(self)``, the tied head counted once."""
        d, r = self.d_model, self.ap_rank
        attention = 4 * d * d + 2 * d * r + d  # q, k, v, o + ap_down, ap_up + ap_gate
        mlp = 3 * d * self.d_ff  # w_gate, w_up, w_down
        block = attention + mlp + 2 * d  # + two RMSNorm weights
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embed + self.n_layers * block + d + head  # + final norm


def _bad_attn_message(name: object) -> str:
    valid = ", ".join(ATTN_IMPLEMENTATIONS)
    return tr(f"未知的注意力实现 {name!r}; 可用: {valid}",
              f"unknown attention implementation {name!r}; valid: {valid}")


def _bad_loss_message(name: object) -> str:
    valid = ", ".join(LOSS_IMPLEMENTATIONS)
    return tr(f"未知的损失实现 {name!r}; 可用: {valid}",
              f"unknown loss implementation {name!r}; valid: {valid}")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm: cheaper than LayerNorm (no mean, no bias) and as stable."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in fp32 even for bf16 inputs; the result keeps the input dtype.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
                ) -> tuple[Tensor, Tensor]:
    """cos and sin of every (position, frequency) pair, fp32, shape (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of ``x`` (B, H, T, head_dim) by position.

    The rotation runs in fp32 and the result is cast back to ``x.dtype``: under bf16 autocast
    q and k must stay bf16, or SDPA cannot pick its flash kernel.
    """
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP, w_down(silu(w_gate x) * w_up x): better than a GELU MLP at equal cost."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


# --------------------------------------------------------------------------------------------
# Attention and the transformer block
# --------------------------------------------------------------------------------------------


class APTAttention(nn.Module):
    """Causal multi-head self-attention with rotary positions and an autopoietic term.

    The autopoietic term is a correction the layer produces from its own input: a rank-``r``
    bottleneck ``ap_up(silu(ap_down(x)))`` added to the attention output through a learned
    per-channel gate. The gate starts at exactly zero, so a fresh model is a plain
    transformer and the term only grows where training finds it useful (weight decay pulls an
    unused gate back to zero). It costs ``2 d r + d`` parameters, a few percent of a layer.

    ``attn_implementation`` is read at every forward: "eager" writes the attention out by hand;
    "sdpa" calls ``F.scaled_dot_product_attention`` (fused kernels, flash on GPU in bf16).
    """

    def __init__(self, config: APTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.attn_implementation = config.attn_implementation
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.ap_down = nn.Linear(d, config.ap_rank, bias=False)
        self.ap_up = nn.Linear(config.ap_rank, d, bias=False)
        self.ap_gate = nn.Parameter(torch.zeros(d))
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor],
                cache: LayerKVCache | StaticLayerKVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        # (B, T, d) -> (B, H, T, head_dim)
        q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        mask = None  # a static cache brings its own: by position, over the whole buffer
        if cache is not None:
            past = cache.length
            k, v = cache.update(k, v)
            if isinstance(cache, StaticLayerKVCache):
                mask = cache.mask

        dropout_p = self.dropout if self.training else 0.0
        if self.attn_implementation == "sdpa":
            y = self._sdpa(q, k, v, past, dropout_p, mask)
        elif self.attn_implementation == "eager":
            y = self._eager(q, k, v, dropout_p, mask)
        else:
            raise VBConfigError(_bad_attn_message(self.attn_implementation))

        y = y.transpose(1, 2).reshape(B, T, -1)
        correction = self.ap_up(F.silu(self.ap_down(x)))
        out = self.o_proj(y) + self.ap_gate.to(correction.dtype) * correction
        return self.resid_dropout(out)

    @staticmethod
    def _causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
        """True where query i (at position k_len - q_len + i) may attend to key j."""
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float, mask: Tensor | None = None) -> Tensor:
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if mask is None:
            mask = self._causal_mask(q.shape[2], k.shape[2], q.device)
        probs = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
        probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
        return probs @ v

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, past: int, dropout_p: float,
              mask: Tensor | None = None) -> Tensor:
        # A static cache's mask (by position, over the whole buffer) is always needed. Else:
        # no cache prefix: the built-in causal mask is right and keeps the flash kernel
        # eligible. A single decode query may see every cached key: no mask at all. Only a
        # multi-token chunk after a prefix needs an explicit mask, because SDPA's is_causal
        # aligns the triangle to the top-left corner, not to the end of the keys.
        # One decode query over a static cache on CUDA: the one-token kernel, which reads the
        # cache in place (None where it does not apply).
        if mask is not None:
            if q.shape[2] == 1 and not dropout_p:
                out = decode_attention(q, k, v, mask[None, None])
                if out is not None:
                    return out.transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        q_len = q.shape[2]
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if q_len == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        mask = self._causal_mask(q_len, k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class APTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Positional tensor arguments only, so ``torch.utils.checkpoint`` can wrap ``forward``. Do
    not checkpoint a block while it fills a KV cache: the recomputation would append twice.
    """

    def __init__(self, config: APTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = APTAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)
        self.mlp_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor],
                cache: LayerKVCache | StaticLayerKVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp_dropout(self.mlp(self.mlp_norm(x)))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class APTOutput:
    """What a forward returns: the loss (when labels were given), logits and the KV cache.

    ``logits`` is None only for the fused loss (labels given, ``loss_implementation="fused"``).
    """

    loss: Tensor | None
    logits: Tensor | None
    past_key_values: KVCache | StaticKVCache | None = None


class APTModel(nn.Module):
    """Decoder-only language model: embedding, ``n_layers`` APT blocks, RMSNorm, LM head."""

    _no_split_modules = ["APTBlock"]
    default_preset = "small"

    def __init__(self, config: APTConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = APTConfig.from_preset(self.default_preset, **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.loss_implementation = config.loss_implementation
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(APTBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # cos/sin tables per device, built on first use. Not buffers: model.to(bfloat16) would
        # round them, and derived tables have no place in a state_dict.
        self._rope_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.reset_parameters()

    # ---- set-up -----------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """normal(0, init_std) everywhere; projections into the residual stream scaled down by
        1/sqrt(2 n_layers) so the stream's variance does not grow with depth; norms at 1;
        autopoietic gates at 0."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight is not self.embed.weight:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            for residual_out in (block.attn.o_proj, block.attn.ap_up, block.mlp.w_down):
                nn.init.normal_(residual_out.weight, mean=0.0, std=residual_std)
            nn.init.zeros_(block.attn.ap_gate)

    def set_attn_implementation(self, name: str) -> None:
        """Switch every attention module between "eager" and "sdpa"."""
        if name not in ATTN_IMPLEMENTATIONS:
            raise VBConfigError(_bad_attn_message(name))
        for module in self.modules():
            if isinstance(module, APTAttention):
                module.attn_implementation = name
        # replace, not mutate: the config object may be shared with other models.
        self.config = dataclasses.replace(self.config, attn_implementation=name)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _rope_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._rope_cache:
            c = self.config
            self._rope_cache[device] = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, device)
        return self._rope_cache[device]

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cos, sin = self._rope_tables(device)
        return cos[start:start + length], sin[start:start + length]

    def _rope_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin rows gathered by a position tensor: no Python int, so a graph can replay it."""
        cos, sin = self._rope_tables(positions.device)
        return cos.index_select(0, positions), sin.index_select(0, positions)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, labels: Tensor | None = None,
                past_key_values: KVCache | StaticKVCache | None = None, use_cache: bool = False) -> APTOutput:
        """Logits for every position; with ``labels`` also the next-token loss.

        Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids``
        and shifted here (position t predicts label t+1); -100 is ignored. With a cache the
        positions start at its length; it is extended in place and returned. With a
        ``StaticKVCache`` the positions come from its device-side ``position`` (see there), so
        the same call can be captured once in a CUDA graph and replayed token after token.

        With labels and ``self.loss_implementation == "fused"`` the loss comes from
        ``linear_cross_entropy`` on the final hidden states, like Liger Kernel's fused linear
        cross-entropy: the (batch, seq, vocab) logits are never materialized, which is most of
        the peak training memory for a large vocabulary, and ``logits`` is None. The loss is the
        same (up to rounding), except that a batch whose labels are all ignored gives 0, not
        NaN. It reads ``lm_head.weight`` directly, so a head replaced by a quantized layer is
        used at its master precision. The optimization layer switches it on; without labels
        nothing changes.
        """
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(tr(
                f"input_ids 必须是 (batch, seq) 整数张量, 得到 {tuple(input_ids.shape)} {input_ids.dtype}",
                f"input_ids must be an integer tensor (batch, seq), got {tuple(input_ids.shape)} {input_ids.dtype}"))
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.config.n_layers)
        past = cache.length if cache is not None else 0
        B, T = input_ids.shape
        if past + T > self.config.max_seq_len:
            raise ValueError(tr(
                f"序列长度 {past + T} (缓存 {past} + 输入 {T}) 超过 max_seq_len={self.config.max_seq_len}",
                f"sequence length {past + T} (cache {past} + input {T}) exceeds "
                f"max_seq_len={self.config.max_seq_len}"))
        static = isinstance(cache, StaticKVCache)
        if static and B != cache.batch:
            raise ValueError(tr(f"静态缓存的批大小为 {cache.batch}, 输入为 {B}",
                                f"the static cache holds a batch of {cache.batch}, the input has {B}"))

        x = self.embed_dropout(self.embed(input_ids))
        rope = self._rope_at(cache.begin(T)) if static else self._rope(past, T, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache[i] if cache is not None else None)
        if static:
            cache.advance(T)
        hidden = self.norm(x)

        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise VBConfigError(_bad_loss_message(self.loss_implementation))
        if labels is not None and self.loss_implementation == "fused":
            loss = linear_cross_entropy(hidden[:, :-1], self.lm_head.weight,
                                        labels[:, 1:].to(hidden.device),
                                        bias=getattr(self.lm_head, "bias", None), ignore_index=-100)
            return APTOutput(loss=loss, logits=None, past_key_values=cache)

        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            logits = logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return APTOutput(loss=loss, logits=logits, past_key_values=cache)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, do_sample: bool = True, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, static_cache: bool = False,
                 cuda_graph: bool = False, compile_step: bool = False) -> Tensor:
        """Continue ``input_ids`` by up to ``max_new_tokens`` tokens; returns prompt + new tokens.

        The prompt runs once (prefill), then one token per step against the KV cache. Greedy
        when ``do_sample`` is False or ``temperature`` is 0. Sequences that produced
        ``eos_token_id`` are padded with it; generation stops once all of them have. The model
        is called through ``self(...)`` so a forward wrapped from outside is used. A 1-D
        prompt is treated as a batch of one.

        ``static_cache=True`` decodes against a preallocated ``StaticKVCache`` (room for prompt
        and new tokens, rounded up to 64 within ``max_seq_len``): the prompt runs through the
        same forward as by default, its keys and values are copied into the static cache, and
        every step after that has the same shapes. ``cuda_graph=True`` (implies
        ``static_cache``) captures that step once as a CUDA graph and replays it per token, so
        at batch 1 launch overhead stops hiding what smaller weights save; on a device other
        than CUDA it warns and runs the step without a graph. Sampling stays outside the graph;
        the host waits on the device per token only to check ``eos_token_id``. Caches and
        graphs are kept for later calls of the same shape (``clear_decode_cache`` frees them),
        see ``apt_model.modeling.decoding``. The tokens are those of the default path (greedy
        in fp32: the same, token for token). ``compile_step=True`` (implies ``cuda_graph``)
        runs the step through ``torch.compile``, which fuses its many small elementwise
        kernels (norms, rotary, residual adds) before the graph is captured.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if max_new_tokens <= 0:
            return input_ids
        prompt_len = input_ids.shape[1]
        if prompt_len + max_new_tokens > self.config.max_seq_len:
            raise ValueError(tr(
                f"提示 {prompt_len} + max_new_tokens {max_new_tokens} 超过 "
                f"max_seq_len={self.config.max_seq_len}",
                f"prompt {prompt_len} + max_new_tokens {max_new_tokens} exceeds "
                f"max_seq_len={self.config.max_seq_len}"))
        was_training = self.training
        self.eval()
        try:
            out = self(input_ids, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
            decoder = None
            if static_cache or cuda_graph or compile_step:
                room = min(self.config.max_seq_len, -(-(prompt_len + max_new_tokens) // 64) * 64)
                decoder = decoding.static_decoder(self, cache, room, cuda_graph, compile_step)
            tokens = input_ids
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for step in range(max_new_tokens):
                next_token = self._pick(logits, temperature, top_k, do_sample, generator)
                if eos_token_id is not None:
                    next_token = next_token.masked_fill(finished, eos_token_id)
                    finished |= next_token == eos_token_id
                tokens = torch.cat((tokens, next_token[:, None]), dim=1)
                if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                    break
                if decoder is not None:
                    logits = decoder.step(self, next_token)
                else:
                    logits = self(next_token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            return tokens
        finally:
            self.train(was_training)

    def clear_decode_cache(self) -> None:
        """Free the static KV caches and CUDA graphs that ``generate`` keeps for reuse."""
        decoding.clear(self)

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: int | None, do_sample: bool,
              generator: torch.Generator | None) -> Tensor:
        """Choose one token per row from last-position logits (B, vocab)."""
        if not do_sample or temperature == 0:
            return argmax_last(logits)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class APTLargeModel(APTModel):
    """The same model, built from the "large" preset when no config is given."""

    default_preset = "large"
