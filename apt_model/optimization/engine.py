"""The one engine behind ``vb.enable`` / ``vb.optimize``: applies each enabled optimization
module to a model and reports what it changed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from apt_model import vgpu
from apt_model.errors import VBConfigError
from apt_model.fp4.layer import FP4Linear, convert_to_fp4, count_linear_layers, freeze_fp4
from apt_model.i18n import tr
from apt_model.optimization import graphed_decode
from apt_model.optimization.attention import (
    remember_implementations,
    use_decode_attention,
    use_fused_attention,
    use_fused_loss,
)
from apt_model.optimization.checkpointing import apply_checkpointing, find_blocks
from apt_model.optimization.config import VBConfig
from apt_model.optimization.fused_decoder import fuse_decoder_ops
from apt_model.optimization.fused_projections import fuse_projections
from apt_model.optimization.precision import apply_autocast
from apt_model.optimization.wrapping import unwrap

REPORT_ATTR = "_vb_report"
_COMPARED_SWITCHES = ("fp4", "fused_attention", "fused_loss", "mixed_precision", "gradient_checkpointing",
                      "graphed_decode", "decode_attention")


@dataclass
class OptimizationReport:
    """What ``optimize`` did to one model."""

    mode: str
    fp4_format: str | None
    linear_total: int
    fp4_layers: int
    autocast_linears: int
    attention_fused: int
    fused_losses: int
    checkpointed_blocks: int
    fused_projections: int = 0
    """Groups of sibling FP4 projections multiplied as one (q/k/v, gate/up)."""
    fused_decoder_ops: int = 0
    """RMSNorms, gated SiLU MLPs and rotary functions given one-launch decode kernels."""
    graphed_decode: bool = False
    """Hugging Face ``generate()`` decodes greedily as one CUDA-graph replay a token."""
    switches: dict[str, bool | str] = field(default_factory=dict)
    """The effective switches it was optimized with (see ``effective_switches``)."""
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)
    """What ``restore`` runs, in reverse order, to give the plain model back."""

    @property
    def linears_optimized(self) -> int:
        return self.fp4_layers + self.autocast_linears


def effective_switches(config: VBConfig) -> dict[str, bool | str]:
    """The switches that decide what ``optimize`` does, plus the FP4 format when FP4 is on."""
    switches: dict[str, bool | str] = {name: config.switch(name) for name in _COMPARED_SWITCHES}
    if switches["fp4"]:
        switches["fp4_format"] = config.fp4_format
    return switches


def _reoptimize_error(existing: OptimizationReport, config: VBConfig,
                      asked: dict[str, bool | str]) -> VBConfigError:
    changed = ", ".join(f"{name}: {existing.switches.get(name, '-')} → {asked.get(name, '-')}"
                        for name in (*_COMPARED_SWITCHES, "fp4_format")
                        if existing.switches.get(name) != asked.get(name))
    detail = f" ({changed})" if changed else ""
    return VBConfigError(tr(
        f"此模型已按模式 '{existing.mode}' 优化，不能再按模式 '{config.mode}'{detail} 优化；"
        "请在VB切换到新模式后重新构建模型（从其配置或检查点）",
        f"this model is already optimized in mode '{existing.mode}' and cannot be optimized again "
        f"in mode '{config.mode}'{detail}; build the model again (from its config or checkpoint) "
        "with VB in the new mode"))


def optimize(model: nn.Module, config: VBConfig) -> OptimizationReport:
    """Apply the optimizations ``config`` switches on; a model is optimized at most once.

    Asking again with the same mode and effective switches returns the stored report (no
    second banner); asking for anything else raises ``VBConfigError``.
    """
    switches = effective_switches(config)
    existing = getattr(model, REPORT_ATTR, None)
    if existing is not None:
        if existing.mode == config.mode and existing.switches == switches:
            return existing
        raise _reoptimize_error(existing, config, switches)
    undo: list[Callable[[], None]] = []  # run in reverse by ``restore``
    fp4_layers = 0
    fused = decoder_ops = 0
    if config.switch("fp4"):
        convert_to_fp4(model, config.fp4_format, config.fp4_skip, config.fp4_min_features)
        # converted now, or before (a checkpoint loaded straight into FP4 layers)
        fp4_layers = sum(isinstance(m, FP4Linear) for m in model.modules())
        undo.append(lambda: _unconvert_fp4(model))
        fused, unfuse = fuse_projections(model)
        undo.append(unfuse)
        decoder_ops, unfuse_ops = fuse_decoder_ops(model)
        undo.append(unfuse_ops)
    undo.append(remember_implementations(model))
    attention = use_fused_attention(model) if config.switch("fused_attention") else 0
    if config.switch("decode_attention"):
        undo.append(use_decode_attention(model))
    fused_losses = use_fused_loss(model) if config.switch("fused_loss") else 0
    blocks = apply_checkpointing(model, config.checkpoint_blocks) if config.switch("gradient_checkpointing") else []
    undo.extend(functools.partial(unwrap, block) for block in blocks)
    linear_total = count_linear_layers(model)
    autocast = config.switch("mixed_precision")
    if autocast:
        apply_autocast(model)
        undo.append(functools.partial(unwrap, model))
    stack = None
    if config.vgpu_config is not None:
        stack = _attach_vgpu(model, config)
        undo.append(functools.partial(vgpu.detach, model))
    # A streamed model moves weights between levels in every forward: nothing to capture.
    graphed = stack is None and config.switch("graphed_decode") and graphed_decode.attach(model)
    if graphed:
        undo.append(functools.partial(graphed_decode.detach, model))
    report = OptimizationReport(
        mode=config.mode,
        fp4_format=config.fp4_format if fp4_layers else None,
        linear_total=linear_total,
        fp4_layers=fp4_layers,
        autocast_linears=(linear_total - fp4_layers) if autocast else 0,
        attention_fused=attention,
        fused_losses=fused_losses,
        checkpointed_blocks=len(blocks),
        fused_projections=fused,
        fused_decoder_ops=decoder_ops,
        graphed_decode=graphed,
        switches=switches,
        undo=undo,
    )
    object.__setattr__(model, REPORT_ATTR, report)
    if config.verbose:
        print(tr(f"✓ 自动优化模型: {report.linears_optimized} 个线性层",
                 f"✓ Model optimized: {report.linears_optimized} linear layers"))
        if stack is not None:
            print(_vgpu_banner(stack))
    return report


def _attach_vgpu(model: nn.Module, config: VBConfig) -> vgpu.VGPUStack:
    """Place ``model`` over the configured levels, streaming its repeated blocks: frozen FP4
    layers as packed FP4 (serving), FP4 layers with master weights as those (training; each
    use quantizes them, see :mod:`apt_model.vgpu.streaming`)."""
    vc = config.vgpu_config
    stack = vgpu.attach(model, find_blocks(model, config.checkpoint_blocks), vc.levels, vc.prefetch_depth)
    _place_now(stack)
    return stack


def _place_now(stack: vgpu.VGPUStack) -> None:
    """Place the model now rather than at its first forward, so that it reports Level 0's
    device before it is called (Hugging Face ``generate()`` moves its inputs to
    ``model.device`` first). Not while FP4 layers still hold master weights: a model to serve
    is frozen next, and ``freeze`` places the packed weights it leaves (placing the masters
    now would move them out only to move them back); one to train is placed by its first
    forward or by ``vb.offload_optimizer``."""
    if not any(isinstance(m, FP4Linear) and not m.frozen for m in stack.model.modules()):
        stack.place()


def _vgpu_banner(stack: vgpu.VGPUStack) -> str:
    levels = ", ".join(f"L{i} {spec.device} {spec.capacity_mb:g} MB" for i, spec in enumerate(stack.specs))
    if stack.placed:
        return tr(f"✓ VGPU: {len(stack.modules)} 个块分布在 {levels}; 已放置",
                  f"✓ VGPU: {len(stack.modules)} blocks over {levels}; placed")
    return tr(f"✓ VGPU: {len(stack.modules)} 个块分布在 {levels}; 首次前向时放置",
              f"✓ VGPU: {len(stack.modules)} blocks over {levels}; placed at the first forward")


def freeze(model: nn.Module) -> int:
    """``freeze_fp4`` on a model; a placed VGPU stack gives its weights back first and places
    the packed ones after (they travel as packed FP4). Returns how many layers were frozen."""
    stack = vgpu.stack_of(model)
    if stack is not None:
        stack.unplace()
    frozen = freeze_fp4(model)
    if stack is not None:
        _place_now(stack)
    return frozen


def report_of(model: nn.Module) -> OptimizationReport | None:
    return getattr(model, REPORT_ATTR, None)


def _unconvert_fp4(model: nn.Module) -> None:
    """Every ``FP4Linear`` of ``model`` back to its plain layer, an ``nn.Linear`` or ``Conv1D``
    (see ``FP4Linear.to_plain``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FP4Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.to_plain())


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the plain model again, with its weights (FP4 layers become the
    ``nn.Linear`` or ``Conv1D`` they were, holding the same master ``Parameter``; a frozen one,
    its dequantized weight). A model that was never optimized is returned as it is."""
    report = report_of(model)
    if report is None:
        return model
    for step in reversed(report.undo):
        step()
    object.__delattr__(model, REPORT_ATTR)
    return model
