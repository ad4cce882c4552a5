"""The public switch of Virtual Blackwell.

    import apt_model.optimization.vb_global as vb
    vb.enable_balanced_mode()          # models built from now on come out optimized
    model = APTLargeModel(config)
    vb.print_stats()

Options (``vb.enable(**options)``), the ``.vbrc`` keys and the environment variables are
validated and merged by one rule: explicit arguments > CLI flags > environment > ``.vbrc``
> defaults (see ``apt_model.optimization.config``). ``vb.restore(model)`` gives an optimized
model back plain. ``vb.load_pretrained_fp4(folder)`` loads a Hugging Face checkpoint straight
into frozen FP4 layers (speed mode), one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from apt_model.errors import VBConfigError, positive_int
from apt_model.i18n import tr
from apt_model.optimization import autopatch, hf_patch
from apt_model.optimization import config as _config

# The engine, its passes, the FP4 layers and the statistics load when first used
# (``_engine()``, ``_stats()``): ``import apt_model`` stays light.


def _engine():
    from apt_model.optimization import engine

    return engine


def _stats():
    from apt_model.optimization import stats

    return stats


ModelT = TypeVar("ModelT", bound=nn.Module)

_active: _config.ResolvedConfig | None = None  # the configuration in force; None: VB is off
_explicit: dict[str, Any] = {}  # options of the last ``enable(...)`` call (the top level)
_cli_options: dict[str, Any] = {}  # a launcher's flags (the level below explicit arguments)
_announced: tuple | None = None  # what the last banner announced: one banner per configuration
_banner_pending = False  # auto-enabled at import: announced when VB first acts
_fp4_noted = False  # the note that FP4 saves memory, not time, where no kernel runs: said once


@dataclasses.dataclass(frozen=True)
class Pick:
    """A pick ``auto_pick`` made ahead: for models built from ``target`` (a config) in
    training (or not), under the configuration ``base``: ``picked``."""

    target: Any
    training: bool
    base: _config.VBConfig
    picked: _config.ResolvedConfig


@dataclasses.dataclass(frozen=True)
class Workload:
    """What ``auto_estimate`` sizes the mode for: a step of ``batch`` × ``seq`` tokens (None:
    the model's context length) within ``memory`` bytes (None: the device's free memory when
    the model is optimized); ``pick``: the pick made ahead for it (``auto_pick``), if any."""

    batch: int = 1
    seq: int | None = None
    memory: int | None = None
    pick: Pick | None = None


_workload = Workload()


def set_cli_options(**options: Any) -> None:
    """Record options given as command-line flags (they rank below explicit arguments)."""
    for key, value in options.items():
        _config.validate_option(key, value, "cli")
    _cli_options.clear()
    _cli_options.update(options)


def _source_text(resolved: _config.ResolvedConfig) -> str:
    """Where the mode (and, when it differs, the switch-on) came from, for the banner."""
    sources = resolved.sources
    if _config.auto_picks_mode(resolved) and sources["mode"] != _config.AUTO:
        text = tr(f"由 auto_estimate 按模型选择 ← {sources['auto_estimate']}",
                  f"picked per model by auto_estimate ← {sources['auto_estimate']}")
    else:
        text = f"{resolved.config.mode} ← {sources['mode']}"
    if sources["enabled"] not in (sources["mode"], "argument"):
        text += tr(f"; 启用 ← {sources['enabled']}", f"; enabled ← {sources['enabled']}")
    return text


def _announce() -> None:
    """Print the banner of the configuration in force, unless it was already announced."""
    global _announced, _banner_pending, _fp4_noted
    _banner_pending = False
    if _active is None or not _active.config.verbose:
        return
    config = _active.config
    key = (config.mode, config.fp4_format, *(config.switch(name) for name in _config.SWITCHES))
    if key == _announced:
        return
    _announced = key
    print(tr(f"✅ 虚拟Blackwell已启用: 模式 {_source_text(_active)}",
             f"✅ Virtual Blackwell enabled: mode {_source_text(_active)}"))
    if config.switch("fp4") and not _fp4_noted:
        _fp4_noted = True
        note = _fp4_speed_note(config.device)
        if note:
            print(note)


def _fp4_speed_note(device_name: str) -> str | None:
    """Where FP4 has no fused kernels, the one line saying it saves memory, not time."""
    from apt_model.accelerator import resolve_device
    from apt_model.fp4.ops import triton_available

    device = resolve_device(device_name)
    if triton_available(device):
        return None
    return tr(f"   注意: {device} 上没有融合FP4内核, FP4 权重节省内存, 但不加速 (每次计算先反量化; 见 BENCHMARKS.md)",
              f"   note: {device} has no fused FP4 kernels: FP4 weights save memory there, not time "
              "(each product dequantizes first; see BENCHMARKS.md)")


def _activate(resolved: _config.ResolvedConfig, announce: bool) -> None:
    global _active, _banner_pending
    _active = resolved
    if resolved.config.auto_patch:
        install_patches()
    if announce:
        _announce()
    else:
        _banner_pending = True


def configure(cli: dict[str, Any] | None = None, *, announce: bool = True) -> _config.ResolvedConfig:
    """Resolve every level (explicit > ``cli`` > environment > `.vbrc` > defaults) and switch
    VB on or off as the result says; a bad value anywhere raises ``VBConfigError``.

    The launchers call it with their flags before any work; ``import apt_model`` calls it
    with ``announce=False`` (the banner then comes when VB first optimizes a model).
    """
    global _active
    if cli is not None:
        set_cli_options(**cli)
    resolved = _config.resolve(explicit=_explicit, cli=_cli_options)
    if resolved.config.enabled:
        _activate(resolved, announce)
    else:
        _active = None
    return resolved


def enable(**options: Any) -> dict[str, Any]:
    """Turn VB on with the given options; returns the effective configuration."""
    global _explicit
    explicit = {**options, "enabled": True}
    _activate(_config.resolve(explicit=explicit, cli=_cli_options), announce=True)
    _explicit = explicit
    return get_config()


def enable_full_optimization(**options: Any) -> dict[str, Any]:
    """FP4 weights + fused attention + bf16 + checkpointing."""
    return enable(mode="full", **options)


def enable_speed_mode(**options: Any) -> dict[str, Any]:
    """FP4 weights only (inference speed)."""
    return enable(mode="speed", **options)


def enable_memory_mode(**options: Any) -> dict[str, Any]:
    """Fused attention + bf16 + checkpointing, full-precision master weights."""
    return enable(mode="memory", **options)


def enable_balanced_mode(**options: Any) -> dict[str, Any]:
    """Fused attention + bf16 (the recommended default)."""
    return enable(mode="balanced", **options)


def disable() -> None:
    """Turn VB off: models built afterwards are plain (already optimized ones stay as they are);
    the workload goes back to its defaults."""
    global _active, _explicit, _announced, _banner_pending, _workload
    _active = None
    _explicit = {}
    _announced = None
    _banner_pending = False
    _workload = Workload()


def set_workload(*, batch: int = 1, seq: int | None = None, memory: int | None = None) -> None:
    """Tell ``auto_estimate`` the step the model will run: ``batch`` × ``seq`` tokens (default
    1 × the model's context length) within ``memory`` bytes (default: the device's free memory
    when the model is optimized). Non-positive values raise ``VBConfigError``."""
    global _workload
    for name, value in (("batch", batch), ("seq", seq), ("memory", memory)):
        if value is not None:
            positive_int(name, value)
    _workload = Workload(batch=batch, seq=seq, memory=memory)


def is_enabled() -> bool:
    return _active is not None


def active_config() -> _config.VBConfig | None:
    """The configuration in force, or None when VB is off."""
    return _active.config if _active else None


def _in_force() -> _config.ResolvedConfig:
    return _active or _config.resolve(explicit=_explicit, cli=_cli_options)


def get_config() -> dict[str, Any]:
    """The effective configuration as a dict (what VB would use if it is off)."""
    out = _in_force().config.to_dict()
    out["enabled"] = is_enabled()
    return out


def explain_config() -> dict[str, tuple[Any, str]]:
    """Each option's effective value and where it came from (argument, cli, env, .vbrc, default)."""
    resolved = _in_force()
    values = resolved.config.to_dict()
    explained = {key: (values[key], resolved.sources[key]) for key in _config.OPTION_NAMES}
    if resolved.config.enabled != is_enabled():  # switched off (or on) by a call since
        explained["enabled"] = (is_enabled(), "argument")
    return explained


def _resolved_for(options: dict[str, Any]) -> _config.ResolvedConfig:
    """The configuration ``optimize(model, **options)`` applies: the active one, plus ``options``."""
    if _active is not None and not options:
        return _active
    return _config.resolve(explicit={**_explicit, **options, "enabled": True}, cli=_cli_options)


def _auto_mode(model: nn.Module, resolved: _config.ResolvedConfig) -> _config.ResolvedConfig:
    """``resolved`` with what ``auto_estimate`` picks for ``model`` (``_auto_pick``), or the pick
    made ahead for a model built from its config (``auto_pick``), not traced again."""
    pick = _workload.pick
    if (pick is not None and pick.base == resolved.config and pick.training == model.training
            and getattr(model, "config", None) == pick.target):
        return pick.picked
    return _auto_pick(model, model.training, resolved)[0]


def auto_pick(target: Any, *, training: bool = True) -> bool:
    """Make ``auto_estimate``'s pick now for the workload (``set_workload``) of a model to be
    built from ``target`` (an APT or Hugging Face config), under the configuration in force:
    the model built from an equal config afterwards takes it without tracing again (the
    launchers' check). Says which and why, as at the model's construction; returns whether the
    step fits (in a mode, or with a VGPU plan)."""
    global _workload
    resolved = _in_force()
    picked, fits = _auto_pick(target, training, resolved)
    _workload = dataclasses.replace(_workload, pick=Pick(target, training, resolved.config, picked))
    return fits


def _auto_pick(target: Any, training: bool,
               resolved: _config.ResolvedConfig) -> tuple[_config.ResolvedConfig, bool]:
    """``resolved`` with the mode ``auto_estimate`` picks for ``target``: the least aggressive
    that fits the workload (``set_workload``) in the device's free memory, its step traced in
    each mode (a training step when ``training``, else a decode step), placed over the
    configured VGPU levels if any (as it will run). When none fits that way, the least aggressive mode that fits with a VGPU plan over the device
    and host RAM (and a configured SSD level), and the plan (``fit.choose_vgpu``; unless
    ``vgpu_config`` is set at a higher level); else the most aggressive mode. Says which and
    why (when verbose); also returns whether the step fits."""
    from apt_model.accelerator import host_memory_info, resolve_device
    from apt_model.estimator.fit import choose_mode, choose_vgpu, free_memory

    config = resolved.config
    device = resolve_device(config.device)
    free = _workload.memory or free_memory(device)
    choice = choose_mode(target, free=free, batch=_workload.batch, seq=_workload.seq, training=training,
                         device=str(device), base=config, levels=config.vgpu_config)
    if choice.mode is not None:
        if config.verbose:
            print(tr(f"✓ auto_estimate: 模式 {choice.mode}, 能放下的最不激进的模式 ({choice.reason()})",
                     f"✓ auto_estimate: mode {choice.mode}, the least aggressive mode that fits ({choice.reason()})"))
        return _config.with_auto_mode(resolved, choice.mode), True
    planned = None
    plans = _config.auto_plans_levels(resolved)
    if plans:
        disk = tuple(lv for lv in config.vgpu_config.levels if lv.device == "ssd") if config.vgpu_config else ()
        planned = choose_vgpu(target, free=free, host_free=host_memory_info()[0], batch=_workload.batch,
                              seq=_workload.seq, training=training, device=device, base=config, disk=disk)
    if planned is not None:
        if config.verbose:
            print(tr(f"✓ auto_estimate: {device} 上任何模式都放不下 ({choice.reason()}); 用 VGPU 计划, 模式 "
                     f"{planned.mode}: {planned.reason()}",
                     f"✓ auto_estimate: no mode fits on {device} alone ({choice.reason()}); using a VGPU plan in mode "
                     f"{planned.mode}: {planned.reason()}"))
        return _config.with_auto_mode(resolved, planned.mode, planned.levels), True
    mode = _config.MOST_AGGRESSIVE
    if config.verbose:
        levels = (tr("卸载到主机内存 (VGPU) 也放不下", "nor with host RAM (VGPU)") if plans
                  else tr("VGPU 层级按配置 (其设置高于 auto_estimate)", "the VGPU levels stay as configured "
                          "(set above auto_estimate)"))
        print(tr(f"⚠ auto_estimate: {device} 上任何模式都放不下 ({choice.reason()}); {levels}; 暂用最激进的模式 {mode}",
                 f"⚠ auto_estimate: no mode fits on {device} ({choice.reason()}); {levels}; using the most "
                 f"aggressive mode, {mode}, meanwhile"))
    return _config.with_auto_mode(resolved, mode), False


def optimize(model: ModelT, **options: Any) -> ModelT:
    """Optimize any ``nn.Module`` now, with the active configuration (plus ``options``); with
    ``auto_estimate`` on, in the mode it picks for this model (``_auto_mode``)."""
    global _active
    resolved = _resolved_for(options)
    if _config.auto_picks_mode(resolved) and _engine().report_of(model) is None:
        picked = _auto_mode(model, resolved)
        if resolved is _active:
            _active = picked
        resolved = picked
    return _apply(model, resolved.config)


def _apply(model: ModelT, cfg: _config.VBConfig) -> ModelT:
    """The banner (once), the engine's passes in ``cfg`` and the statistics' tracking."""
    if _banner_pending:
        _announce()
    _engine().optimize(model, cfg)
    _stats().REGISTRY.track(model)
    return model


def restore(model: ModelT) -> ModelT:
    """Turn a model VB optimized back into the plain one, weights included: FP4 layers become
    ``nn.Linear`` (or GPT-2 ``Conv1D``) again (holding the same master weight; a frozen layer
    its dequantized weight), attention and loss implementations, autocast and checkpointing
    are undone.
    It can then be optimized again, in any mode."""
    _engine().restore(model)
    _stats().REGISTRY.untrack(model)
    return model


def register_model_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Make instances of ``cls`` built while VB is on come out optimized (usable as a decorator)."""
    return autopatch.register(cls)


def install_patches() -> None:
    """Patch the APT classes and arm the Hugging Face builders' hook (safe to call again)."""
    autopatch.install()
    hf_patch.install()


def _on_model_built(model: nn.Module) -> None:
    """A patched constructor built ``model``: optimize it when VB is on with ``auto_patch``."""
    config = active_config()
    if config is not None and config.auto_patch:
        optimize(model)


autopatch.set_handler(_on_model_built)


def get_stats() -> dict[str, Any]:
    """The numbers behind ``print_stats``: layers, bytes, peak memory, steps, VGPU."""
    return _stats().collect(active_config(), is_enabled())


def print_stats() -> None:
    print(_stats().render(get_stats()))


def offload_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                      params: Iterable[nn.Parameter] | None = None,
                      max_grad_norm: float | None = None, accumulate: int = 1) -> torch.optim.Optimizer:
    """The one line that offloads training state: ``optimizer = vb.offload_optimizer(model,
    optimizer)``. The fp32 master weights and AdamW state of ``model``'s parameters (or of
    ``params``) live in host RAM and are stepped there, overlapped with the backward; the loop
    (``backward(); step(); zero_grad()``, lr schedulers, ``state_dict()``) stays as it is.
    Clip with ``max_grad_norm`` instead of ``clip_grad_norm_`` (offloaded gradients leave the
    device during backward); with gradient accumulation say how many backwards make a step
    (``accumulate``). Blocks that a VGPU stack streams train too (under activation
    checkpointing): their new weights are written into their home. Where the configured
    levels have an SSD level and the host RAM levels cannot hold all masters and moments, the
    rest live in swap files there. See ``apt_model.vgpu.offload``."""
    from apt_model.vgpu import offload_optimizer as _offload

    config = active_config()
    levels = config.vgpu_config.levels if config is not None and config.vgpu_config is not None else ()
    offloaded = _offload(model, optimizer, params=params, max_grad_norm=max_grad_norm, accumulate=accumulate,
                         levels=levels)
    _stats().REGISTRY.track_optimizer(offloaded)
    return offloaded


def offloads_training(config: _config.VBConfig | None) -> bool:
    """Whether VB's trainers offload the optimizer state (fp32 masters and AdamW state in host
    RAM, :func:`offload_optimizer`): ``vgpu_config`` has levels below Level 0 (host RAM or
    SSD), or the ``offload_optimizer`` switch is on (mode full) and the compute device is an
    accelerator (on the CPU the host is the device: nothing to gain)."""
    from apt_model.accelerator import resolve_device

    if config is None:
        return False
    if config.vgpu_config is not None and config.vgpu_config.offloads:
        return True
    return config.switch("offload_optimizer") and resolve_device(config.device).type != "cpu"


def freeze_fp4(model: nn.Module) -> int:
    """Drop the master weights of ``model``'s FP4 layers for serving (packed FP4 only); with a
    VGPU stack the packed weights are placed again (what streams is then packed FP4).

    Returns how many layers were frozen; the model is put in eval mode.
    """
    return _engine().freeze(model)


def save_fp4(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as one packed FP4 safetensors file (atomic); returns its path."""
    from apt_model.fp4.packed_checkpoint import save_fp4_checkpoint

    return save_fp4_checkpoint(model, path)


def load_fp4(path: str | os.PathLike, model: ModelT | None = None) -> ModelT | nn.Module:
    """Load a packed FP4 checkpoint (into ``model``, or into the APT model it records);
    ``get_stats`` counts the loaded model."""
    from apt_model.fp4.packed_checkpoint import load_fp4_checkpoint
    from apt_model.modeling.apt_model import APTLargeModel, APTModel

    loaded = load_fp4_checkpoint(path, model, classes=(APTModel, APTLargeModel))
    _stats().REGISTRY.track(loaded)
    return loaded


def load_pretrained_fp4(path: str | os.PathLike, model_class: type | None = None, *,
                        config: Any = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, **options: Any) -> nn.Module:
    """A Hugging Face safetensors checkpoint (folder ``path``, sharded or not) loaded straight
    into frozen FP4 layers, one tensor at a time: neither the card nor host memory ever holds
    the whole model in ``dtype`` (see ``apt_model.fp4.hf_loading``).

    The FP4 format, skip patterns and minimum size come from the configuration
    ``vb.optimize(model, **options)`` would apply, in speed mode where no mode is set
    anywhere, and with FP4 on whatever the mode (``fp4=False`` is refused); the model is
    then optimized with it (``vb.get_stats`` counts it, ``vb.restore`` dequantizes it).
    ``model_class`` is a transformers model or auto class (default: the config's
    architecture), ``config`` replaces the folder's config, ``device`` defaults to the
    configured device, ``dtype`` (the compute dtype) to the config's, else bf16. Raises
    ``VBDataError`` / ``VBConfigError`` naming what is wrong.
    """
    from apt_model.accelerator import resolve_device
    from apt_model.fp4.hf_loading import load_hf_checkpoint_fp4

    if options.get("fp4", True) is False:
        raise VBConfigError(tr("load_pretrained_fp4 加载为FP4权重, 不能与 fp4=False 一起使用",
                               "load_pretrained_fp4 loads FP4 weights and cannot take fp4=False"))
    resolved = _resolved_for(options)
    cfg = resolved.config
    if resolved.sources["mode"] == "default":
        cfg = dataclasses.replace(cfg, mode="speed")
    if not cfg.switch("fp4"):
        cfg = dataclasses.replace(cfg, fp4=True)
    model = load_hf_checkpoint_fp4(
        path, model_class, config=config, fmt=cfg.fp4_format, skip=cfg.fp4_skip,
        min_features=cfg.fp4_min_features, device=resolve_device(device or cfg.device), dtype=dtype)
    return _apply(model, cfg)


def estimate(target: Any, *, mode: str | None = None, batch: int = 1, seq: int | None = None,
             optimizer: str = "adamw", training: bool = True, device: str | None = None,
             levels: Any = None) -> Any:
    """The peak memory of one training (or decode) step of ``target`` in ``mode`` (default:
    the configured mode), measured by tracing the step on fake tensors with VB's passes
    applied, and placed over VGPU ``levels`` when given (the ``vgpu_config`` form): an
    ``apt_model.estimator.Estimate``. See ``apt_model.estimator.estimate``."""
    from apt_model.estimator import estimate as _estimate

    config = _in_force().config
    return _estimate(target, mode=mode or (None if isinstance(target, nn.Module) else config.mode), batch=batch,
                     seq=seq, optimizer=optimizer, training=training, device=device, base=config, levels=levels)
