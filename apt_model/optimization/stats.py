"""Real counters behind ``vb.print_stats`` / ``vb.get_stats``.

Everything here is measured from the optimized models themselves (their layers and
parameter bytes), the device allocator (peak memory) and the optimizers that step them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from apt_model import accelerator, vgpu
from apt_model.fp4.format import fp4_nbytes
from apt_model.fp4.layer import FP4Linear, count_linear_layers
from apt_model.i18n import tr
from apt_model.optimization.config import VBConfig
from apt_model.optimization.engine import OptimizationReport, report_of
from apt_model.storage import human_bytes


class StatsRegistry:
    """The models VB optimized in this process, the optimizer steps taken on them, and the
    optimizers VB offloaded (``vb.offload_optimizer``)."""

    def __init__(self) -> None:
        self._models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._optimizers: weakref.WeakSet[vgpu.OffloadedAdamW] = weakref.WeakSet()
        self._param_ids: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.steps = 0
        self._hook = None

    def track(self, model: nn.Module) -> None:
        self._models.add(model)
        for param in model.parameters():
            self._param_ids[id(param)] = param
        if self._hook is None:
            self._hook = register_optimizer_step_post_hook(self._on_step)

    def untrack(self, model: nn.Module) -> None:
        """Stop counting ``model`` (``vb.restore`` gave the plain model back)."""
        self._models.discard(model)
        for param in model.parameters():
            if self._param_ids.get(id(param)) is param:
                del self._param_ids[id(param)]

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if self._param_ids.get(id(param)) is param:
                    self.steps += 1
                    return

    def models(self) -> list[nn.Module]:
        return list(self._models)

    def track_optimizer(self, optimizer: vgpu.OffloadedAdamW) -> None:
        self._optimizers.add(optimizer)

    def optimizers(self) -> list[vgpu.OffloadedAdamW]:
        return list(self._optimizers)

    def reset(self) -> None:
        self.steps = 0
        self._models = weakref.WeakSet()
        self._optimizers = weakref.WeakSet()
        self._param_ids = weakref.WeakValueDictionary()


REGISTRY = StatsRegistry()


def _unique_params(model: nn.Module) -> list[torch.Tensor]:
    return list({id(p): p for p in model.parameters()}.values())


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _loaded_report(model: nn.Module) -> OptimizationReport:
    """The layers of a model VB loaded from a packed FP4 checkpoint without optimizing it."""
    fp4 = [m for m in model.modules() if isinstance(m, FP4Linear)]
    return OptimizationReport(
        mode="fp4-checkpoint", fp4_format=fp4[0].fmt if fp4 else None,
        linear_total=count_linear_layers(model),
        fp4_layers=len(fp4), autocast_linears=0, attention_fused=0, fused_losses=0,
        checkpointed_blocks=0)


def collect(config: VBConfig | None, enabled: bool) -> dict[str, Any]:
    """The numbers behind ``print_stats``."""
    models = REGISTRY.models()
    layers = {"linear_total": 0, "linear_optimized": 0, "fp4": 0, "autocast": 0,
              "attention_fused": 0, "fused_losses": 0, "checkpointed_blocks": 0}
    param_bytes = compute_bytes = 0
    devices: list[torch.device] = []
    for model in models:
        report = report_of(model) or _loaded_report(model)
        layers["linear_total"] += report.linear_total
        layers["linear_optimized"] += report.linears_optimized
        layers["fp4"] += report.fp4_layers
        layers["autocast"] += report.autocast_linears
        layers["attention_fused"] += report.attention_fused
        layers["fused_losses"] += report.fused_losses
        layers["checkpointed_blocks"] += report.checkpointed_blocks
        params = _unique_params(model)
        param_bytes += sum(_bytes(p) for p in params)
        fp4_weights = {}
        for module in model.modules():
            if not isinstance(module, FP4Linear):
                continue
            if module.frozen:  # no master weight left: count it as the plain model would hold it
                param_bytes += module.plain_weight_nbytes()
                compute_bytes += module.packed_weight().nbytes()
            else:
                fp4_weights[id(module.weight)] = fp4_nbytes((module.out_features, module.in_features), module.fmt)
        compute_bytes += sum(fp4_weights.get(id(p), _bytes(p)) for p in params)
        if params and params[0].device not in devices:
            devices.append(params[0].device)
    device = devices[0] if devices else accelerator.default_device()
    peak = accelerator.max_memory_allocated(device) if device.type != "cpu" else None
    levels = list(config.vgpu_config.levels) if config and config.vgpu_config else []
    stacks = [stack.stats() for stack in map(vgpu.stack_of, models) if stack is not None]
    optimizers = [optimizer.stats() for optimizer in REGISTRY.optimizers()]
    return {
        "enabled": enabled,
        "mode": config.mode if (config and enabled) else None,
        "fp4_format": config.fp4_format if (config and layers["fp4"]) else None,
        "device": str(device),
        "models": len(models),
        "layers": layers,
        "param_bytes_before": param_bytes,
        "param_bytes_after": compute_bytes,
        "peak_memory_bytes": peak,
        "steps": REGISTRY.steps,
        "vgpu": {
            "active": bool(stacks or optimizers),
            "configured_levels": [
                {"capacity_mb": lv.capacity_mb, "device": lv.device, "speed_gbps": lv.speed_gbps} for lv in levels
            ],
            "stacks": stacks,
            "optimizers": optimizers,
        },
    }


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else human_bytes(n, digits=2)


def render(stats: dict[str, Any]) -> str:
    """``print_stats`` text: the seed's Chinese by default, English with VB_LANG=en."""
    lay = stats["layers"]
    state = tr("已启用", "enabled") if stats["enabled"] else tr("未启用", "disabled")
    lines = [
        tr("虚拟Blackwell统计:", "Virtual Blackwell stats:"),
        tr(f"  状态: {state}  模式: {stats['mode'] or '-'}  设备: {stats['device']}",
           f"  state: {state}  mode: {stats['mode'] or '-'}  device: {stats['device']}"),
        tr(f"  已优化模型: {stats['models']}", f"  models optimized: {stats['models']}"),
        tr(f"  线性层: {lay['linear_optimized']}/{lay['linear_total']} 已优化 (FP4: {lay['fp4']}"
           f"{' ' + stats['fp4_format'] if stats['fp4_format'] else ''}, bf16混合精度: {lay['autocast']})",
           f"  linear layers: {lay['linear_optimized']}/{lay['linear_total']} optimized (FP4: {lay['fp4']}"
           f"{' ' + stats['fp4_format'] if stats['fp4_format'] else ''}, bf16 autocast: {lay['autocast']})"),
        tr(f"  融合注意力模块: {lay['attention_fused']}  融合损失: {lay['fused_losses']}  "
           f"梯度检查点块: {lay['checkpointed_blocks']}",
           f"  fused attention modules: {lay['attention_fused']}  fused losses: {lay['fused_losses']}  "
           f"checkpointed blocks: {lay['checkpointed_blocks']}"),
        tr(f"  参数字节: {_fmt_bytes(stats['param_bytes_before'])} → 计算用权重 {_fmt_bytes(stats['param_bytes_after'])}",
           f"  parameter bytes: {_fmt_bytes(stats['param_bytes_before'])} → compute weights "
           f"{_fmt_bytes(stats['param_bytes_after'])}"),
        tr(f"  峰值显存: {_fmt_bytes(stats['peak_memory_bytes'])}", f"  peak device memory: {_fmt_bytes(stats['peak_memory_bytes'])}"),
        tr(f"  训练步数: {stats['steps']}", f"  optimizer steps: {stats['steps']}"),
        tr("VGPU堆叠统计:", "VGPU stack stats:"),
    ]
    stacks = stats["vgpu"]["stacks"]
    for number, stack in enumerate(stacks, 1):
        if len(stacks) > 1:
            lines.append(tr(f"  模型 {number}:", f"  model {number}:"))
        lines.extend(_render_stack(stack))
    for optimizer in stats["vgpu"]["optimizers"]:
        lines.append(_render_optimizer(optimizer))
    levels = stats["vgpu"]["configured_levels"]
    idle = not stacks and not stats["vgpu"]["optimizers"]
    if idle and levels:
        desc = ", ".join(f"L{i} {lv['device']} {lv['capacity_mb']:.0f}MB" for i, lv in enumerate(levels))
        lines.append(tr(f"  未启用分层: 已配置 {len(levels)} 级 ({desc})，但没有模型按这些层级优化过",
                        f"  no tiering active: {len(levels)} levels configured ({desc}), but no model was "
                        "optimized with them"))
    elif idle:
        lines.append(tr("  未启用分层（未配置vgpu_config），所有参数留在计算设备上",
                        "  no tiering active (no vgpu_config); all parameters stay on the compute device"))
    return "\n".join(lines)


def _render_optimizer(opt: dict[str, Any]) -> str:
    """One offloaded optimizer: what it holds on the host and in SSD swap files, and what it
    moved and waited."""
    memory = tr("锁页" if opt["pinned"] else "可分页", "pinned" if opt["pinned"] else "pageable")
    return tr(
        f"  卸载的优化器: {opt['params']} 个参数, 主机内存 {_fmt_bytes(opt['host_bytes'])} ({memory}), "
        f"SSD {_fmt_bytes(opt['disk_bytes'])}, "
        f"{opt['steps']} 步, 梯度移出 {_fmt_bytes(opt['grad_bytes_off'])}, 权重移回 {_fmt_bytes(opt['weight_bytes_back'])}, "
        f"流式权重写回其层级 {_fmt_bytes(opt['weight_bytes_home'])}, "
        f"主机AdamW {1e3 * opt['host_step_s']:.1f} ms, 计算等待 {1e3 * opt['wait_s']:.1f} ms",
        f"  offloaded optimizer: {opt['params']} params, host RAM {_fmt_bytes(opt['host_bytes'])} ({memory}), "
        f"SSD {_fmt_bytes(opt['disk_bytes'])}, "
        f"{opt['steps']} steps, grads off {_fmt_bytes(opt['grad_bytes_off'])}, weights back "
        f"{_fmt_bytes(opt['weight_bytes_back'])}, streamed weights written home {_fmt_bytes(opt['weight_bytes_home'])}, "
        f"host AdamW {1e3 * opt['host_step_s']:.1f} ms, compute waited {1e3 * opt['wait_s']:.1f} ms")


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _render_stack(stack: dict[str, Any]) -> list[str]:
    """One VGPU stack: the seed's three lines (hit rate, promotions, demotions), the plan and
    each level's bytes and bandwidth."""
    if not stack["placed"]:
        return [tr(f"  {stack['blocks']} 个块，首次前向时放置", f"  {stack['blocks']} blocks, placed at the first forward")]
    l0 = stack["levels"][0]
    rate = "n/a" if l0["hit_rate"] is None else f"{100 * l0['hit_rate']:.1f}%"
    lines = [
        tr(f"  Level 0命中率: {rate}  (命中 {l0['hits']} / 未命中 {l0['misses']})",
           f"  Level 0 hit rate: {rate}  (hits {l0['hits']} / misses {l0['misses']})"),
        tr(f"  提升次数: {l0['promotions']}  (其中预取 {l0['prefetches']})",
           f"  promotions: {l0['promotions']}  (prefetched {l0['prefetches']})"),
        tr(f"  降级次数: {l0['demotions']}", f"  demotions: {l0['demotions']}"),
        tr(f"  计算等待数据: {1e3 * l0['stall_s']:.1f} ms", f"  compute stalled for data: {1e3 * l0['stall_s']:.1f} ms"),
        tr(f"  块: {stack['blocks']} (常驻 {stack['resident_blocks']}, 流式 {stack['streamed_blocks']}, "
           f"预取深度 {stack['depth']}, 槽位 {stack['slots']})",
           f"  blocks: {stack['blocks']} ({stack['resident_blocks']} resident, {stack['streamed_blocks']} "
           f"streamed, prefetch depth {stack['depth']}, {stack['slots']} slots)"),
    ]
    for lv in stack["levels"]:
        lines.append(tr(
            f"  L{lv['level']} {lv['device']}: 容量 {_fmt_bytes(lv['capacity_bytes'])}, 占用 "
            f"{_fmt_bytes(lv['resident_bytes'])} (峰值 {_fmt_bytes(lv['peak_bytes'])}), 入 {_fmt_bytes(lv['bytes_in'])}, "
            f"出 {_fmt_bytes(lv['bytes_out'])}, {_rate(lv['achieved_gbps'])} GB/s (配置 {lv['speed_gbps']:g} GB/s)",
            f"  L{lv['level']} {lv['device']}: capacity {_fmt_bytes(lv['capacity_bytes'])}, holds "
            f"{_fmt_bytes(lv['resident_bytes'])} (peak {_fmt_bytes(lv['peak_bytes'])}), in {_fmt_bytes(lv['bytes_in'])}, "
            f"out {_fmt_bytes(lv['bytes_out'])}, {_rate(lv['achieved_gbps'])} GB/s (configured {lv['speed_gbps']:g} GB/s)"))
    return lines
