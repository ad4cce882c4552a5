"""The one engine behind ``vb.enable`` / ``vb.optimize``: applies each enabled optimization
module to a model and reports what it changed."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from apt_model.i18n import tr
from apt_model.optimization.attention import use_fused_attention, use_fused_loss
from apt_model.optimization.checkpointing import apply_checkpointing
from apt_model.optimization.config import VBConfig
from apt_model.optimization.fp4_linear import FP4Linear, convert_to_fp4
from apt_model.optimization.precision import apply_autocast

REPORT_ATTR = "_vb_report"


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

    @property
    def linears_optimized(self) -> int:
        return self.fp4_layers + self.autocast_linears


def _count_linears(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, FP4Linear)) for m in model.modules())


def optimize(model: nn.Module, config: VBConfig) -> OptimizationReport:
    """Apply the optimizations ``config`` switches on; a model is optimized at most once."""
    existing = getattr(model, REPORT_ATTR, None)
    if existing is not None:
        return existing
    fp4_layers = []
    if config.switch("fp4"):
        fp4_layers = convert_to_fp4(model, config.fp4_format, config.fp4_skip, config.fp4_min_features)
    attention = use_fused_attention(model) if config.switch("fused_attention") else 0
    fused_losses = use_fused_loss(model) if config.switch("fused_loss") else 0
    blocks = apply_checkpointing(model, config.checkpoint_blocks) if config.switch("gradient_checkpointing") else []
    linear_total = _count_linears(model)
    autocast = config.switch("mixed_precision")
    if autocast:
        apply_autocast(model)
    report = OptimizationReport(
        mode=config.mode,
        fp4_format=config.fp4_format if fp4_layers else None,
        linear_total=linear_total,
        fp4_layers=len(fp4_layers),
        autocast_linears=(linear_total - len(fp4_layers)) if autocast else 0,
        attention_fused=attention,
        fused_losses=fused_losses,
        checkpointed_blocks=len(blocks),
    )
    object.__setattr__(model, REPORT_ATTR, report)
    if config.verbose:
        print(tr(f"✓ 自动优化模型: {report.linears_optimized} 个线性层",
                 f"✓ Model optimized: {report.linears_optimized} linear layers"))
    return report


def report_of(model: nn.Module) -> OptimizationReport | None:
    return getattr(model, REPORT_ATTR, None)
