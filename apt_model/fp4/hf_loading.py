"""Hugging Face safetensors checkpoints loaded straight into frozen FP4 layers, tensor by tensor.

:func:`load_hf_checkpoint_fp4` builds the model from its config with every parameter on the
``meta`` device (no weight memory), turns the linear layers :func:`fp4_candidates` picks
into `FP4Linear` layers (the rule ``vb.optimize`` uses: tied, tiny and skipped layers stay
plain), then reads the checkpoint one shard and one tensor at a time with
``safetensors.safe_open``:

* an FP4 layer's weight goes to the device in the compute dtype, is quantized there
  (:func:`fp4_quantize`, the Triton kernel on CUDA) and only its packed form is kept;
* every other tensor is put on the device, floating-point ones in the compute dtype.

So the device never holds more than the FP4 model plus one weight in the compute dtype
(and the quantizer's scratch), and the host never more than the mapped pages of the shard
being read plus one tensor. The packed weights are bit for bit those of
``from_pretrained`` + ``vb.optimize(mode="speed")`` + ``vb.freeze_fp4`` at the same dtype.

Buffers the checkpoint does not hold (rotary ``inv_freq``...) are computed by the
model's own constructor, directly on the target device: only parameters are sent to
``meta`` while the skeleton is built. Checkpoint keys are matched to the model's as
transformers matches them for the usual causal LMs: as they are, or with the model's
``base_model_prefix`` added or removed (a ``GPT2Model`` checkpoint into ``GPT2LMHeadModel``),
ignoring the model's ``_keys_to_ignore_on_load_*`` patterns and the legacy
``rotary_emb.inv_freq`` / ``position_ids`` buffers. Checkpoints that need transformers'
weight conversions (fused MoE experts, ...) are refused, naming the keys that do not fit.
transformers' ``_keep_in_fp32_modules`` are not applied: the few models that list some
(GPT-OSS norms in fp16, ...) get them in the compute dtype too.

Why this matters, for a Llama-3-70B-class model (vocab 128256, hidden 8192, 80 layers,
intermediate 28672, 64 heads, 8 KV heads; figures from ``fp4_nbytes``):

======================================  ==============================================
parameters                              70.55e9 (68.45e9 in the linear layers)
bf16 weights                            141.1 GB: no single 80 GB card holds them
NVFP4 linear layers (4.5 bits/weight)   38.5 GB
embeddings + lm_head + norms, in bf16   4.2 GB
the model served in NVFP4               42.7 GB (39.8 GiB); MXFP4: 40.6 GB
peak on the card while loading          + the largest weight in bf16 (0.47 GB): 43.2 GB
======================================  ==============================================

It loads and serves from one 80 GB card with about 37 GB left for the KV cache: at 320 KiB
per token in bf16 (2 x 80 layers x 8 KV heads x 128 x 2 bytes), some 110k tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from apt_model.errors import VBConfigError, VBDataError, first_line
from apt_model.fp4.layer import FP4Linear, convert_to_fp4, retie, tied_groups
from apt_model.fp4.ops import fp4_quantize
from apt_model.i18n import tr

__all__ = ["INDEX_NAME", "SINGLE_NAME", "checkpoint_shards", "load_hf_checkpoint_fp4"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Keys transformers drops from every checkpoint: buffers that older versions saved.
_LEGACY_KEYS = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


# ------------------------------------------------------------------------ the checkpoint


def checkpoint_shards(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder, in load order:
    ``model.safetensors``, else the shards ``model.safetensors.index.json`` names, by name.

    Raises ``VBDataError`` naming the folder, the index or the shard that is missing or
    unreadable.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise VBDataError(tr(f"{folder}: 目录不存在", f"{folder}: no such folder"))
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    index = folder / INDEX_NAME
    if not index.is_file():
        raise VBDataError(tr(f"{folder}: 没有safetensors检查点 (缺少 {SINGLE_NAME} 或 {INDEX_NAME})",
                             f"{folder}: no safetensors checkpoint ({SINGLE_NAME} or {INDEX_NAME})"))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = first_line(exc) if not isinstance(exc, KeyError) else f"no {exc}"
        raise VBDataError(tr(f"{index}: 索引文件无效 ({reason})",
                             f"{index}: invalid index file ({reason})")) from None
    if not names or not all(isinstance(name, str) for name in names):
        raise VBDataError(tr(f"{index}: 索引文件的 weight_map 为空或无效",
                             f"{index}: the index's weight_map is empty or invalid"))
    shards = [folder / name for name in names]
    for shard in shards:
        if not shard.is_file():
            raise VBDataError(tr(f"{index} 列出的分片 {shard.name} 不存在",
                                 f"{index} names shard {shard.name}, which does not exist"))
    return shards


def _shard_header(shard: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in ``shard`` (its header only; no tensor is read)."""
    try:
        with safe_open(shard, framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (OSError, RuntimeError, SafetensorError, ValueError) as exc:
        raise VBDataError(tr(f"{shard}: 不是可读的safetensors文件 ({first_line(exc)})",
                             f"{shard}: not a readable safetensors file ({first_line(exc)})")) from None


# ------------------------------------------------------------------------------ the model


def _config_of(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise VBConfigError(tr(f"{folder}: 无法读取模型配置 config.json ({first_line(exc)})",
                               f"{folder}: cannot read the model config config.json "
                               f"({first_line(exc)})")) from None


def _model_class(config: Any, model_class: type | None) -> type[nn.Module]:
    """``model_class``, the class an auto class maps ``config`` to, or (none given) the
    config's ``architectures[0]``, else what ``AutoModelForCausalLM`` maps it to."""
    import transformers

    if model_class is not None and not hasattr(model_class, "_model_mapping"):
        return model_class
    if model_class is None:
        for name in getattr(config, "architectures", None) or ():
            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                return cls
        model_class = transformers.AutoModelForCausalLM
    try:
        return model_class._model_mapping[type(config)]
    except (KeyError, ValueError):
        raise VBConfigError(tr(
            f"{model_class.__name__} 不支持模型类型 {config.model_type!r}; 请传入 model_class=",
            f"{model_class.__name__} has no class for model type {config.model_type!r}; "
            "pass model_class=")) from None


def _compute_dtype(config: Any, dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype``, else the config's ``dtype`` (``torch_dtype`` before transformers 5), else bf16."""
    if dtype is None:
        dtype = getattr(config, "dtype", None) or config.to_dict().get("torch_dtype") or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise VBConfigError(tr(f"计算精度 {dtype!r} 无效: 需要浮点类型 (如 torch.bfloat16)",
                               f"invalid compute dtype {dtype!r}: a floating-point dtype is "
                               "needed (such as torch.bfloat16)"))
    return dtype


@contextlib.contextmanager
def _skeleton(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build modules with every parameter on ``meta`` and the buffers on ``device``, with
    ``dtype`` as the default dtype (as ``from_pretrained`` builds them).

    A parameter's storage is requested on ``device`` and dropped at once (never written:
    ``reset_parameters`` runs on the meta tensor), so at most one parameter is allocated
    at a time; the buffers the constructor computes (rotary ``inv_freq``...) are real.
    ``nn.Module.register_parameter`` is patched process-wide meanwhile (as accelerate's
    ``init_empty_weights`` does): modules built by other threads then go to meta too.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    default_dtype = torch.get_default_dtype()
    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        torch.set_default_dtype(dtype)
        with device:
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
        torch.set_default_dtype(default_dtype)


def _build(cls: type[nn.Module], config: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``cls(config)`` on the meta device (the buffers on ``device``), with its generation
    config, not yet optimized (a direct constructor call: VB's builder hooks are not run)."""
    with _skeleton(device, dtype):
        try:
            return cls(config)
        except (TypeError, ValueError, AttributeError) as exc:
            raise VBConfigError(tr(f"无法用该配置构建 {cls.__name__}: {first_line(exc)}",
                                   f"cannot build {cls.__name__} from this config: "
                                   f"{first_line(exc)}")) from None


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's ``generation_config.json`` on a generating model, as ``from_pretrained`` does."""
    if not (folder / "generation_config.json").is_file() or not getattr(model, "can_generate", bool)():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise VBConfigError(tr(f"{folder}: generation_config.json 无效 ({first_line(exc)})",
                               f"{folder}: invalid generation_config.json ({first_line(exc)})")) from None


# ------------------------------------------------------------------------- key matching


def _patterns(model: nn.Module, attr: str, extra: tuple[str, ...] = ()) -> re.Pattern | None:
    patterns = [*(getattr(model, attr, None) or ()), *extra]
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _model_key(key: str, expected: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The model's name for checkpoint key ``key``: itself, or with ``prefix.`` added or removed."""
    if key in expected:
        return key
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return None


def _plan(model: nn.Module, shards: list[Path], tied: list[list[str]]) -> list[tuple[Path, dict[str, str]]]:
    """For each shard, its checkpoint keys to load and the model name each fills (``tied``:
    the model's tied parameter names, ``tied_groups``).

    Every check that needs no tensor data is done here, before any is read: keys the model
    lacks, names no shard fills, shapes that differ from the config's.
    """
    expected = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    skip_unexpected = _patterns(model, "_keys_to_ignore_on_load_unexpected", _LEGACY_KEYS)
    skip_missing = _patterns(model, "_keys_to_ignore_on_load_missing")
    alias = {name: group[0] for group in tied for name in group}
    plan: list[tuple[Path, dict[str, str]]] = []
    filled: set[str] = set()
    unexpected: list[str] = []
    for shard in shards:
        keys: dict[str, str] = {}
        for key, shape in _shard_header(shard).items():
            target = _model_key(key, expected, prefix)
            if target is None:
                if skip_unexpected is None or not skip_unexpected.search(key):
                    unexpected.append(f"{shard.name}:{key}")
                continue
            if alias.get(target, target) in filled:  # one weight stored under two tied names
                continue
            if tuple(expected[target].shape) != shape:
                raise VBConfigError(tr(
                    f"{shard}: 张量 {key} 的形状为 {list(shape)}, 模型配置要求 {list(expected[target].shape)}",
                    f"{shard}: tensor {key} has shape {list(shape)}, the model's config needs "
                    f"{list(expected[target].shape)}"))
            filled.add(alias.get(target, target))
            keys[key] = target
        plan.append((shard, keys))
    # a buffer the constructor built may be left out where the model says so; a parameter,
    # still on meta, never
    missing = [name for name, tensor in expected.items() if alias.get(name, name) not in filled
               and (tensor.is_meta or skip_missing is None or not skip_missing.search(name))]
    if missing or unexpected:
        parts = ([f"missing {missing[:5]}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else "")]
                 if missing else [])
        if unexpected:
            more = f" (+{len(unexpected) - 5})" if len(unexpected) > 5 else ""
            parts.append(f"unexpected {unexpected[:5]}{more}")
        what = "; ".join(parts)
        raise VBConfigError(tr(f"{shards[0].parent}: 检查点与模型 {type(model).__name__} 不匹配: {what}",
                               f"{shards[0].parent}: the checkpoint does not fit "
                               f"{type(model).__name__}: {what}"))
    return plan


# ------------------------------------------------------------------------------ loading


def _moved(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype``, in memory of its own (never the checkpoint's
    mapping): moved first and converted there, so loading onto an accelerator makes no
    host copy of it."""
    moved = tensor.to(device)
    return moved.to(dtype, copy=moved is tensor)


def _put(model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device,
         dtype: torch.dtype) -> None:
    """Fill parameter or buffer ``name``: an `FP4Linear`'s weight quantized on ``device``,
    anything else put there (floating point in ``dtype``, other tensors in their own)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(owner, FP4Linear) and leaf == "weight":
        weight = tensor.to(device, dtype)  # only read: the checkpoint's own memory will do
        # [in, out] for a GPT-2 Conv1D: packed as [out, in]
        owner._install_packed(fp4_quantize(weight.t() if owner.weight_transposed else weight,
                                           owner.fmt), dtype)
        return
    value = _moved(tensor, device, dtype if tensor.is_floating_point() else tensor.dtype)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


def load_hf_checkpoint_fp4(path: str | os.PathLike, model_class: type | None = None, *,
                           config: Any = None, fmt: str = "nvfp4",
                           skip: tuple[str, ...] = ("lm_head", "*.lm_head"), min_features: int = 64,
                           device: str | torch.device = "cpu",
                           dtype: torch.dtype | str | None = None) -> nn.Module:
    """A Hugging Face model from the safetensors checkpoint in folder ``path`` (one file or
    shards with an index), its FP4-candidate linear layers frozen packed `FP4Linear`
    layers in ``fmt``, everything on ``device``, in eval mode.

    ``model_class`` is a transformers model class or auto class; by default the config's
    ``architectures[0]`` (else ``AutoModelForCausalLM``'s class for it). ``config`` (a
    ``PretrainedConfig``, e.g. with ``attn_implementation`` set) replaces the folder's
    ``config.json``. ``skip`` and ``min_features`` pick the FP4 layers as
    :func:`fp4_candidates` does; ``dtype`` is the compute dtype of the FP4 layers and the
    dtype of every other floating-point tensor (default: the config's dtype, else bf16).

    The whole model is never materialized in the compute dtype, on the device or in host
    memory (see the module docstring). Raises ``VBDataError`` for a missing folder, index,
    shard or unreadable file, ``VBConfigError`` for a config, class or dtype that does not
    work, and for checkpoint keys or shapes that do not fit the model (naming them).
    """
    device = torch.device(device)
    shards = checkpoint_shards(path)
    folder = shards[0].parent
    if config is None:
        config = _config_of(folder)
    dtype = _compute_dtype(config, dtype)
    model = _build(_model_class(config, model_class), config, device, dtype)
    _generation_config(model, folder)
    groups = tied_groups(model)
    convert_to_fp4(model, fmt, skip, min_features)
    for shard, keys in _plan(model, shards, groups):
        with safe_open(shard, framework="pt") as fh:
            for key, name in keys.items():
                _put(model, name, fh.get_tensor(key), device, dtype)
    retie(model, groups)
    return model.eval()
