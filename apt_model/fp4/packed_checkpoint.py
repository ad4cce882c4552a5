"""Packed FP4 checkpoints: one safetensors file a server loads straight into frozen layers.

The file holds, for every FP4 layer ``L``, the tensors of its packed weight under the names a
frozen layer's state_dict uses (``L.weight_packed``, ``L.weight_scales`` and, for NVFP4,
``L.weight_tensor_scale``), and every other parameter and buffer as it is. So it is the
state_dict of the frozen model, about 4.5/32 of an fp32 checkpoint for the FP4 layers, and
loading it needs no quantization: the bytes served are the bytes saved.

The safetensors metadata (strings only) records::

    format            "apt_model.fp4"       marks the file as one of these
    format_version    "1"
    fp4_layers        JSON {layer: {"fmt", "shape": [out, in], "dtype", "bias"}}
    aliases           JSON {name: stored_name} for tied tensors, stored once
    model_class       the model's class name
    config            JSON of the model's dataclass ``config``, when it has one

Loading needs the model to fill: one the caller gives, or one built from ``model_class`` and
``config`` by one of the classes the caller names (``classes``; ``vb.load_fp4`` names the APT
model classes). This module knows no model family of its own and imports none.

The write is atomic (temporary file in the same folder, fsync, ``os.replace``): a crash or a
full disk leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from apt_model.errors import VBConfigError, VBDataError
from apt_model.fp4.format import FP4_FORMATS, FP4Weight
from apt_model.fp4.layer import (
    PACKED_BUFFERS,
    FP4Linear,
    is_conv1d,
    linear_features,
    retie,
    tied_groups,
)
from apt_model.i18n import tr
from apt_model.storage import fsync_path, unique_tensors

__all__ = ["FORMAT", "FORMAT_VERSION", "load_fp4_checkpoint", "read_fp4_metadata",
           "save_fp4_checkpoint"]

FORMAT = "apt_model.fp4"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------- saving


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fp4_layers(model: nn.Module) -> dict[str, FP4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP4Linear)}


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        return None
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _checkpoint_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The frozen model's state_dict (quantizing layers that still have a master weight),
    and the per-layer metadata."""
    state = dict(model.state_dict())
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in _fp4_layers(model).items():
        if not layer.frozen:
            if layer.weight.is_meta:
                raise VBDataError(tr(f"{name} 的权重在 meta 设备上, 无法保存",
                                     f"{name}: the weight is on the meta device, nothing to save"))
            state.pop(_prefix(name) + "weight", None)
            for key, tensor in layer.packed_weight().state_tensors().items():
                state[_prefix(name) + PACKED_BUFFERS[key]] = tensor
        layers[name] = {"fmt": layer.fmt, "shape": [layer.out_features, layer.in_features],
                        "dtype": _dtype_name(layer.compute_dtype), "bias": layer.bias is not None}
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise VBDataError(tr(f"{meta[0]} 在 meta 设备上, 无法保存",
                             f"{meta[0]} is on the meta device, nothing to save"))
    return state, layers


def save_fp4_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as one packed FP4 safetensors file at ``path``, atomically.

    FP4 layers are stored packed, frozen or not (a layer with a master weight is quantized
    exactly as its inference would); everything else is stored as it is. Raises
    ``VBDataError`` naming the path when it cannot be written; an existing file is then
    left as it was.
    """
    path = Path(path).expanduser()
    state, layers = _checkpoint_state(model)
    tensors, aliases = unique_tensors(state)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "fp4_layers": json.dumps(layers), "aliases": json.dumps(aliases),
                "model_class": type(model).__name__}
    config = _model_config(model)
    if config is not None:
        metadata["config"] = json.dumps(config)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp, metadata=metadata)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except (OSError, RuntimeError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise VBDataError(tr(f"无法写入FP4检查点 {path}: {reason}",
                             f"cannot write FP4 checkpoint {path}: {reason}")) from None
    return path


# --------------------------------------------------------------------------------- loading


def _bad_file(path: Path, zh: str, en: str) -> VBDataError:
    return VBDataError(tr(f"{path}: {zh}", f"{path}: {en}"))


def read_fp4_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of an FP4 checkpoint (``fp4_layers``, ``aliases``, ``config``...).

    Raises ``VBDataError`` when the file is missing, unreadable or not an FP4 checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise _bad_file(path, "文件不存在", "no such file")
    try:
        with safe_open(path, framework="pt") as fh:
            raw = dict(fh.metadata() or {})
    except (OSError, RuntimeError, SafetensorError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _bad_file(path, f"不是可读的safetensors文件 ({reason})",
                        f"not a readable safetensors file ({reason})") from None
    if raw.get("format") != FORMAT:
        raise _bad_file(path, "不是FP4检查点 (缺少 format=apt_model.fp4 元数据)",
                        "not an FP4 checkpoint (no format=apt_model.fp4 metadata)")
    version = raw.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise _bad_file(path, f"不支持的FP4检查点版本 {version!r} (支持 ≤ {FORMAT_VERSION})",
                        f"unsupported FP4 checkpoint version {version!r} (this build reads ≤ {FORMAT_VERSION})")
    try:
        meta: dict[str, Any] = {
            "format_version": int(version),
            "fp4_layers": json.loads(raw.get("fp4_layers", "{}")),
            "aliases": json.loads(raw.get("aliases", "{}")),
            "model_class": raw.get("model_class"),
            "config": json.loads(raw["config"]) if "config" in raw else None,
        }
    except json.JSONDecodeError as exc:
        raise _bad_file(path, f"元数据损坏: {exc.msg}", f"corrupt metadata: {exc.msg}") from None
    for name, info in meta["fp4_layers"].items():
        if not isinstance(info, dict) or info.get("fmt") not in FP4_FORMATS \
                or not isinstance(info.get("shape"), list) or len(info["shape"]) != 2:
            raise _bad_file(path, f"层 {name} 的元数据损坏", f"corrupt metadata for layer {name}")
    return meta


def _build_model(path: Path, meta: dict[str, Any],
                 classes: Sequence[type[nn.Module]]) -> nn.Module:
    """The model the metadata describes, on the meta device (the file fills it): the class of
    ``classes`` named ``model_class``, called with the recorded config's fields."""
    cls_name, config = meta["model_class"], meta["config"]
    cls = next((c for c in classes if c.__name__ == cls_name), None)
    if config is None or cls is None:
        raise VBConfigError(tr(
            f"{path}: 检查点没有可构建的模型配置 (模型类 {cls_name}); 请传入 model= (或在 classes= 中给出该类)",
            f"{path}: the checkpoint holds no config of a model class this loader builds "
            f"(model class {cls_name}); pass model= (or that class in classes=)"))
    try:
        with torch.device("meta"):
            return cls(**config)
    except (TypeError, ValueError, VBConfigError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise VBConfigError(tr(f"{path}: 检查点中的 {cls_name} 配置无效: {reason}",
                               f"{path}: invalid {cls_name} config in the checkpoint: {reason}")) from None


def _mismatch(path: Path, zh: str, en: str) -> VBConfigError:
    return VBConfigError(tr(f"{path} 与模型不匹配: {zh}", f"{path} does not match the model: {en}"))


def _recorded_dtype(path: Path, name: str, info: dict[str, Any]) -> torch.dtype:
    dtype = getattr(torch, str(info.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _bad_file(path, f"层 {name} 的 dtype {info.get('dtype')!r} 无效",
                        f"layer {name} has an invalid dtype {info.get('dtype')!r}")
    return dtype


def _install_fp4_layers(path: Path, model: nn.Module, meta: dict[str, Any],
                        tensors: dict[str, torch.Tensor], assign: bool) -> None:
    """Turn each layer the file names into a frozen `FP4Linear` holding the file's tensors."""
    for name, info in meta["fp4_layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise _mismatch(path, f"模型中没有层 {name}", f"the model has no layer {name}") from None
        if not (is_conv1d(module) or isinstance(module, (nn.Linear, FP4Linear))):
            raise _mismatch(path, f"{name} 是 {type(module).__name__}, 不是线性层",
                            f"{name} is a {type(module).__name__}, not a linear layer")
        shape = linear_features(module)[::-1]
        if tuple(info["shape"]) != shape:
            raise _mismatch(path, f"{name} 的形状为 {list(shape)}, 检查点中为 {info['shape']}",
                            f"{name} has shape {list(shape)}, the checkpoint {info['shape']}")
        parts = {key: tensors.get(_prefix(name) + buf) for key, buf in PACKED_BUFFERS.items()}
        try:
            weight = FP4Weight.from_state_tensors(
                info["fmt"], shape, {k: t for k, t in parts.items() if t is not None})
        except (KeyError, ValueError) as exc:
            raise _bad_file(path, f"层 {name} 的打包张量缺失或损坏 ({exc})",
                            f"packed tensors of layer {name} are missing or corrupt ({exc})") from None
        if assign:  # a meta model takes the file's tensors, and its dtypes
            dtype, device = _recorded_dtype(path, name, info), torch.device("cpu")
        elif isinstance(module, FP4Linear) and module.frozen:
            dtype, device = module.compute_dtype, module.weight_packed.device
        else:
            dtype, device = module.weight.dtype, module.weight.device
        if isinstance(module, FP4Linear):
            module._install_packed(weight.to(device), dtype)
            continue
        layer = FP4Linear(module, weight.fmt)  # its bias, and for a Conv1D the layout to restore
        layer._install_packed(weight.to(device), dtype)
        layer.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def load_fp4_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, *,
                        classes: Sequence[type[nn.Module]] | None = None) -> nn.Module:
    """Load a packed FP4 checkpoint into a model whose FP4 layers are frozen packed layers.

    With ``model`` (a plain or VB-optimized one, on the CPU, another device or the meta
    device), the linear layers the file names are replaced by frozen `FP4Linear` layers and
    everything is loaded into it; a meta model gets the file's CPU tensors. Without
    ``model``, the model the metadata records is built on the meta device: the class of
    ``classes`` whose name is the recorded ``model_class``, called with the recorded
    config's fields as keyword arguments (``cls(**config)``, as the APT model classes take
    them). The model comes back in eval mode. A missing or foreign file raises
    ``VBDataError``; a model that does not fit the file, or none to build, ``VBConfigError``.
    """
    path = Path(path).expanduser()
    meta = read_fp4_metadata(path)
    if model is None:
        model = _build_model(path, meta, classes or ())
    try:
        tensors = load_file(path)
    except (OSError, RuntimeError, SafetensorError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _bad_file(path, f"无法读取 ({reason})", f"cannot be read ({reason})") from None
    for alias, stored in meta["aliases"].items():
        if stored not in tensors:
            raise _bad_file(path, f"别名 {alias} 指向不存在的 {stored}",
                            f"alias {alias} points to missing tensor {stored}")
        tensors[alias] = tensors[stored]
    assign = any(t.is_meta for t in model.state_dict().values())
    groups = tied_groups(model)
    _install_fp4_layers(path, model, meta, tensors, assign)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + \
               ("; " if missing and unexpected else "") + \
               (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise _mismatch(path, what, what)
    try:
        model.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise _mismatch(path, detail, detail) from None
    if assign:
        retie(model, groups)
    return model.eval()
