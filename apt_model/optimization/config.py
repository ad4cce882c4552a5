"""Virtual Blackwell configuration: the four modes, `.vbrc` files, environment variables and
the one precedence rule

    explicit arguments > CLI flags > environment > `.vbrc` > defaults

Every resolved value remembers where it came from, so ``vb info`` can say why it is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from apt_model import env
from apt_model.accelerator import resolve_device
from apt_model.errors import VBConfigError, VBDeviceError
from apt_model.i18n import tr
from apt_model.vgpu.levels import LEVEL_DEVICES


@dataclass(frozen=True)
class ModeSpec:
    """Which optimizations a mode switches on (the seed's mode table)."""

    fp4: bool
    fused_attention: bool
    fused_loss: bool
    mixed_precision: bool
    gradient_checkpointing: bool
    offload_optimizer: bool  # fp32 masters and AdamW state in host RAM, on an accelerator
    graphed_decode: bool  # Hugging Face generate(): greedy decoding as a CUDA-graph replay a token
    decode_attention: bool  # SDPA attention decodes one token through the one-token kernel


# fused_loss rides with fused attention: both are fused kernels that cut activation memory.
# The order is the modes' order of aggressiveness, least first: bf16 and fused kernels only;
# then recomputation (slower, same numbers); then FP4 weights (other numbers: speed, the
# smallest weights for serving); then everything. ``auto_estimate`` takes the first that fits.
MODES: dict[str, ModeSpec] = {
    "balanced": ModeSpec(fp4=False, fused_attention=True, fused_loss=True, mixed_precision=True,
                         gradient_checkpointing=False, offload_optimizer=False, graphed_decode=False,
                         decode_attention=True),
    "memory": ModeSpec(fp4=False, fused_attention=True, fused_loss=True, mixed_precision=True,
                       gradient_checkpointing=True, offload_optimizer=False, graphed_decode=False,
                       decode_attention=True),
    "speed": ModeSpec(fp4=True, fused_attention=False, fused_loss=False, mixed_precision=False,
                      gradient_checkpointing=False, offload_optimizer=False, graphed_decode=True,
                      decode_attention=True),
    "full": ModeSpec(fp4=True, fused_attention=True, fused_loss=True, mixed_precision=True,
                     gradient_checkpointing=True, offload_optimizer=True, graphed_decode=False,
                     decode_attention=True),
}

MOST_AGGRESSIVE = next(reversed(MODES))  # what auto_estimate falls back to when no mode fits

VGPU_LEVEL_KEYS = ("capacity_mb", "device", "speed_gbps", "path")
SWITCHES = tuple(f.name for f in fields(ModeSpec))


@dataclass(frozen=True)
class VGPULevel:
    """One level of the virtual VRAM stack: a compute device, host RAM ("cpu") or disk ("ssd")."""

    capacity_mb: float
    device: str
    speed_gbps: float
    path: str | None = None

    @property
    def kind(self) -> str:
        return self.device if self.device in ("cpu", "ssd") else "accelerator"


@dataclass(frozen=True)
class VGPUConfig:
    """The levels (Level 0 first: the compute device) and how many blocks are fetched ahead
    of use (None: automatic)."""

    levels: tuple[VGPULevel, ...]
    prefetch_depth: int | None = None

    @property
    def offloads(self) -> bool:
        """Whether there are levels below Level 0 (host RAM, SSD): training state can leave
        the device (VB's trainer offloads AdamW then)."""
        return len(self.levels) > 1


@dataclass(frozen=True)
class VBConfig:
    """The effective settings. ``None`` for a switch means "as the mode says"."""

    enabled: bool = False
    mode: str = "balanced"
    auto_patch: bool = True
    auto_estimate: bool = False  # on: VB picks the mode that fits (see ``auto_picks_mode``)
    verbose: bool = True
    device: str = "auto"
    fp4: bool | None = None
    fused_attention: bool | None = None
    fused_loss: bool | None = None
    mixed_precision: bool | None = None
    gradient_checkpointing: bool | None = None
    offload_optimizer: bool | None = None
    graphed_decode: bool | None = None
    decode_attention: bool | None = None
    fp4_format: str = "nvfp4"
    fp4_skip: tuple[str, ...] = ("lm_head", "*.lm_head")
    fp4_min_features: int = 64
    checkpoint_blocks: tuple[str, ...] = ()
    vgpu_config: VGPUConfig | None = None

    def switch(self, name: str) -> bool:
        """An optimization switch after applying the mode (an explicit True/False wins)."""
        value = getattr(self, name)
        return getattr(MODES[self.mode], name) if value is None else bool(value)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fp4_skip"] = list(self.fp4_skip)
        out["checkpoint_blocks"] = list(self.checkpoint_blocks)
        if self.vgpu_config is not None:
            out["vgpu_config"] = {"levels": [asdict(lv) for lv in self.vgpu_config.levels],
                                  "prefetch_depth": self.vgpu_config.prefetch_depth}
        out["effective"] = {name: self.switch(name) for name in SWITCHES}
        return out


OPTION_NAMES = tuple(f.name for f in fields(VBConfig))

ENV_VARS = env.OPTION_VARS
VBRC_ENV = env.CONFIG_FILE
VBRC_NAME = ".vbrc"


def _bad(zh: str, en: str) -> VBConfigError:
    return VBConfigError(tr(zh, en))


def _as_bool(key: str, value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    parsed = env.parse_switch(value) if isinstance(value, str) else None
    if parsed is None and isinstance(value, int) and value in (0, 1):
        parsed = bool(value)
    if parsed is None:
        raise _bad(f"{where}: '{key}' 应为布尔值，收到 {value!r}", f"{where}: '{key}' must be a boolean, got {value!r}")
    return parsed


def _as_number(key: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{where}: '{key}' 应为数字，收到 {value!r}", f"{where}: '{key}' must be a number, got {value!r}")
    if not value > 0:
        raise _bad(f"{where}: '{key}' 必须为正数，收到 {value!r}", f"{where}: '{key}' must be positive, got {value!r}")
    return float(value)


def _as_names(key: str, value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{where}: '{key}' 应为字符串列表", f"{where}: '{key}' must be a list of strings")
    return tuple(v.strip() for v in value)


def _check_device(name: str, where: str, allowed: tuple[str, ...]) -> str:
    """A device this machine really has (or one of ``allowed``), else one clear error.

    The same check as ``vb info --device`` and the launchers' ``--device``
    (``accelerator.resolve_device``), so a device is accepted or refused alike everywhere.
    """
    if name in allowed:
        return name
    try:
        resolve_device(name)
    except VBDeviceError as exc:
        raise VBConfigError(f"{where}: {exc}") from None
    return name


def parse_vgpu_config(value: Any, where: str, this_machine: bool = True) -> VGPUConfig | None:
    """Validate ``vgpu_config`` ({"levels": [{capacity_mb, device, speed_gbps[, path]}, ...]
    [, "prefetch_depth": n or "auto"]}). ``this_machine`` False: a level's device need not
    exist here (levels of a machine an estimate is for)."""
    if value is None:
        return None
    if isinstance(value, VGPUConfig):
        return value
    if not isinstance(value, Mapping) or "levels" not in value or set(value) - {"levels", "prefetch_depth"}:
        raise _bad(f"{where}: vgpu_config 应为 {{\"levels\": [...], \"prefetch_depth\": n (可选)}}",
                   f"{where}: vgpu_config must be {{\"levels\": [...], \"prefetch_depth\": n (optional)}}")
    depth = value.get("prefetch_depth")
    if depth == "auto":
        depth = None
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
        raise _bad(f"{where}: vgpu_config.prefetch_depth 应为非负整数或 \"auto\"，收到 {depth!r}",
                   f"{where}: vgpu_config.prefetch_depth must be a non-negative integer or \"auto\", got {depth!r}")
    raw_levels = value["levels"]
    if not isinstance(raw_levels, list) or not raw_levels:
        raise _bad(f"{where}: vgpu_config.levels 应为非空列表", f"{where}: vgpu_config.levels must be a non-empty list")
    levels = []
    for i, raw in enumerate(raw_levels):
        at = f"{where}: vgpu_config.levels[{i}]"
        if not isinstance(raw, Mapping):
            raise _bad(f"{at} 应为对象", f"{at} must be an object")
        unknown = sorted(set(raw) - set(VGPU_LEVEL_KEYS))
        if unknown:
            raise _bad(f"{at}: 未知键 {unknown}，可用: {list(VGPU_LEVEL_KEYS)}",
                       f"{at}: unknown key(s) {unknown}; valid: {list(VGPU_LEVEL_KEYS)}")
        missing = [k for k in ("capacity_mb", "device", "speed_gbps") if k not in raw]
        if missing:
            raise _bad(f"{at}: 缺少 {missing}", f"{at}: missing {missing}")
        device = raw["device"]
        if not isinstance(device, str):
            raise _bad(f"{at}: device 应为字符串", f"{at}: device must be a string")
        path = raw.get("path")
        if path is not None and not isinstance(path, str):
            raise _bad(f"{at}: path 应为字符串", f"{at}: path must be a string")
        levels.append(VGPULevel(
            capacity_mb=_as_number("capacity_mb", raw["capacity_mb"], at),
            device=_check_device(device, at, LEVEL_DEVICES) if this_machine else device,
            speed_gbps=_as_number("speed_gbps", raw["speed_gbps"], at),
            path=path,
        ))
    return VGPUConfig(levels=tuple(levels), prefetch_depth=depth)


def validate_option(key: str, value: Any, where: str) -> Any:
    """Check one option's value and return it in canonical form."""
    if key not in OPTION_NAMES:
        raise _bad(f"{where}: 未知选项 '{key}'，可用: {', '.join(OPTION_NAMES)}",
                   f"{where}: unknown option '{key}'; valid: {', '.join(OPTION_NAMES)}")
    if key == "mode":
        if not isinstance(value, str) or value.lower() not in MODES:
            raise _bad(f"{where}: 未知模式 {value!r}，可用: {', '.join(MODES)}",
                       f"{where}: unknown mode {value!r}; valid: {', '.join(MODES)}")
        return value.lower()
    if key == "fp4_format":
        from apt_model.fp4.format import FP4_FORMATS  # the formats' one definition

        if not isinstance(value, str) or value.lower() not in FP4_FORMATS:
            raise _bad(f"{where}: 未知FP4格式 {value!r}，可用: {', '.join(FP4_FORMATS)}",
                       f"{where}: unknown FP4 format {value!r}; valid: {', '.join(FP4_FORMATS)}")
        return value.lower()
    if key in ("enabled", "auto_patch", "auto_estimate", "verbose"):
        return _as_bool(key, value, where)
    if key in SWITCHES:
        return None if value is None else _as_bool(key, value, where)
    if key == "device":
        if not isinstance(value, str):
            raise _bad(f"{where}: device 应为字符串", f"{where}: device must be a string")
        return _check_device(value, where, ("auto",))
    if key in ("fp4_skip", "checkpoint_blocks"):
        return _as_names(key, value, where)
    if key == "fp4_min_features":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(f"{where}: fp4_min_features 应为非负整数", f"{where}: fp4_min_features must be a non-negative integer")
        return value
    return parse_vgpu_config(value, where)


def find_vbrc(cwd: str | os.PathLike | None = None) -> Path | None:
    """The `.vbrc` in force: named by $VB_CONFIG, else ./.vbrc, else ~/.vbrc."""
    named = env.get(VBRC_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise _bad(f"{VBRC_ENV}={named}: 文件不存在", f"{VBRC_ENV}={named}: no such file")
        return path
    for folder in (Path(cwd) if cwd else Path.cwd(), Path.home()):
        candidate = folder / VBRC_NAME
        if candidate.is_file():
            return candidate
    return None


def load_vbrc(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate one `.vbrc` (JSON object with the seed's keys)."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise _bad(f"{where}: 无法读取 ({exc.strerror})", f"{where}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(f"{where}: JSON格式错误，第{exc.lineno}行第{exc.colno}列: {exc.msg}",
                   f"{where}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise _bad(f"{where}: 顶层应为JSON对象", f"{where}: the top level must be a JSON object")
    return {key: validate_option(key, value, where) for key, value in data.items()}


def read_env() -> dict[str, tuple[Any, str]]:
    """Options set through environment variables, each with its variable's name."""
    out: dict[str, tuple[Any, str]] = {}
    for var, key in ENV_VARS.items():
        raw = env.get(var)
        if raw is None or (raw == "" and key != "enabled"):
            continue
        out[key] = (validate_option(key, raw, f"${var}"), f"env:{var}")
    return out


# The precedence rule's levels, lowest first, as the sources of ``ResolvedConfig`` name them
# ("env:VB_MODE", ".vbrc:/path", ...); "auto" is a mode that ``auto_estimate`` picked.
LEVELS = ("default", ".vbrc", "env", "cli", "argument")
AUTO = "auto"


def level(source: str) -> int:
    """The rank in ``LEVELS`` of the level that ``source`` names."""
    return LEVELS.index(source.split(":", 1)[0])


@dataclass
class ResolvedConfig:
    config: VBConfig
    sources: dict[str, str] = field(default_factory=dict)
    vbrc_path: Path | None = None


def auto_picks_mode(resolved: ResolvedConfig) -> bool:
    """Whether ``auto_estimate`` picks the mode: it is on, and the mode was not set at a higher
    level than it (at the same level the automatic pick wins; a mode it picked before is
    picked again for the next model)."""
    sources = resolved.sources
    return resolved.config.auto_estimate and (
        sources["mode"] == AUTO or level(sources["mode"]) <= level(sources["auto_estimate"]))


def auto_plans_levels(resolved: ResolvedConfig) -> bool:
    """Whether ``auto_estimate`` may plan the VGPU levels: as for the mode (``auto_picks_mode``),
    ``vgpu_config`` not set at a higher level than it."""
    sources = resolved.sources
    return resolved.config.auto_estimate and (
        sources["vgpu_config"] == AUTO or level(sources["vgpu_config"]) <= level(sources["auto_estimate"]))


def with_auto_mode(resolved: ResolvedConfig, mode: str, vgpu_config: Any = None) -> ResolvedConfig:
    """``resolved`` with ``mode`` (and, given, ``vgpu_config``) picked by ``auto_estimate``
    (their source "auto")."""
    changes: dict[str, Any] = {"mode": mode}
    if vgpu_config is not None:
        changes["vgpu_config"] = parse_vgpu_config(vgpu_config, AUTO)
    config = replace(resolved.config, **changes)
    sources = _switch_sources(config, {**resolved.sources, **dict.fromkeys(changes, AUTO)})
    return ResolvedConfig(config=config, sources=sources, vbrc_path=resolved.vbrc_path)


def _switch_sources(config: VBConfig, sources: dict[str, str]) -> dict[str, str]:
    """``sources`` with each switch left to the mode named after it ("mode:balanced")."""
    return {**sources, **{switch: f"mode:{config.mode}" for switch in SWITCHES if getattr(config, switch) is None}}


def resolve(explicit: Mapping[str, Any] | None = None, cli: Mapping[str, Any] | None = None,
            cwd: str | os.PathLike | None = None) -> ResolvedConfig:
    """Merge all layers by the precedence rule, validating each layer."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {name: "default" for name in OPTION_NAMES}
    vbrc_path = find_vbrc(cwd)
    if vbrc_path is not None:
        for key, value in load_vbrc(vbrc_path).items():
            values[key], sources[key] = value, f".vbrc:{vbrc_path}"
    for key, (value, src) in read_env().items():
        values[key], sources[key] = value, src
    for layer, name in ((cli, "cli"), (explicit, "argument")):
        for key, value in (layer or {}).items():
            values[key], sources[key] = validate_option(key, value, name), name
    config = VBConfig(**values)
    return ResolvedConfig(config=config, sources=_switch_sources(config, sources), vbrc_path=vbrc_path)
