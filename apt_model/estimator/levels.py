"""Where the VGPU stack would put a model, and what each level would then hold.

The model is the traced one (fake tensors, VB's passes applied), laid out and planned by the
stack's own code: its blocks (``find_blocks``, outermost only) and their tensors
(``streaming.partition``, ``layout.Layout``), the plan (``placement.make_plan`` over
``levels.capacity_bytes``), host buffers carved by ``levels.HostLevel`` / ``HostArena`` (on
the meta device here, so nothing is allocated) and the offloaded optimizer's host tensors
(``offload.host_sizes``), or its SSD swap files where the host RAM levels cannot hold its
masters and moments (``offload.state_homes``). So each level's figure is what the stack's own counters report
once placed (``stack.stats()["levels"][i]["resident_bytes"]`` and ``peak_bytes``), and the
host and disk bytes of ``offload_optimizer`` are its ``stats()["host_bytes"]`` and ``["disk_bytes"]``.

Level 0 holds the resident part, the resident blocks and the slots: laid out anew
(``Plan.level_bytes[0]``) when the model comes from another device, or counted as the
storages already there when the model is on the compute device (as the stack adopts them).

A step with streamed blocks is traced as the stack runs it: after each call of a streamed
block autocast's cache of weight casts is cleared (``releasing_casts``), as the stack clears
it once the block's slot is released. A training step streams blocks only where the stack
trains them (``ModelPlan.check_training``): checkpointed, no FP4 master weights, AdamW
offloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from apt_model.errors import VBConfigError
from apt_model.i18n import tr
from apt_model.optimization.checkpointing import find_blocks, is_checkpointed
from apt_model.optimization.config import VGPUConfig, VGPULevel, parse_vgpu_config
from apt_model.storage import human_bytes, tensors_nbytes
from apt_model.vgpu.layout import Layout
from apt_model.vgpu.levels import HostArena, HostLevel, HostMemory, capacity_bytes
from apt_model.vgpu.offload import host_sizes, state_homes, swap_bytes
from apt_model.vgpu.placement import Plan, make_plan
from apt_model.vgpu.streaming import outermost, partition

STEP_BYTES = 4  # the fp32 step counter the offloaded AdamW keeps per parameter, beside its arena


class PlacementError(VBConfigError):
    """The levels cannot hold the model (``make_plan``'s reason)."""


def parse_levels(levels: Any) -> VGPUConfig:
    """VGPU levels as ``vgpu_config`` takes them (a ``VGPUConfig``, ``{"levels": [...],
    "prefetch_depth": n}``, or the list of levels alone), validated by the configuration's
    own rule; the devices need not exist on this machine."""
    if isinstance(levels, (list, tuple)):
        levels = {"levels": list(levels)}
    return parse_vgpu_config(levels, "levels", this_machine=False)


class _MetaMemory(HostMemory):
    """Host buffers on the meta device: the arena's arithmetic without the memory."""

    def __init__(self) -> None:
        super().__init__(pin=False)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device="meta")


@dataclass(frozen=True)
class LevelUse:
    """One level: its device ("cpu", "ssd" or the compute device), capacity and the bytes the
    stack holds there once placed (its ``resident_bytes`` and ``peak_bytes``)."""

    level: int
    device: str
    capacity: int
    held: int


@dataclass(frozen=True)
class Placement:
    """What the VGPU stack puts where for one step (bytes): ``levels`` (Level 0 first), the
    blocks streamed of all, the prefetch depth and Level 0 slots, the pinned staging buffers
    that SSD reads land in (CUDA), the offloaded optimizer's host bytes (fp32 masters,
    transfer buffers, AdamW moments: its arena; ``offload_steps`` its step counters;
    ``offload_disk`` its swap files on the SSD, for the masters and moments the host RAM levels
    cannot hold; all 0 unless a training step offloads it) and ``device_peak``: the step's peak on the compute
    device, Level 0's holdings plus the step's own tensors (activations, transient
    gradients, KV cache, logits)."""

    levels: tuple[LevelUse, ...]
    blocks: int
    streamed: int
    depth: int
    slots: int
    slot_bytes: int
    staging: int
    offloaded: int
    offload_steps: int
    offload_disk: int
    device_peak: int

    @property
    def host_bytes(self) -> int:
        """Host RAM below Level 0: host levels, staging buffers and the offloaded optimizer."""
        return (sum(lv.held for lv in self.levels[1:] if lv.device == "cpu") + self.staging
                + self.offloaded + self.offload_steps)

    @property
    def disk_bytes(self) -> int:
        """SSD swap files: the SSD levels' and the offloaded optimizer's."""
        return sum(lv.held for lv in self.levels[1:] if lv.device == "ssd") + self.offload_disk

    def lines(self) -> list[str]:
        """The placement as table lines."""
        out = [tr(f"  VGPU: {self.blocks} 个块, 常驻 {self.blocks - self.streamed}, 流式 {self.streamed}"
                  f" (预取深度 {self.depth}, Level 0 槽位 {self.slots} × {human_bytes(self.slot_bytes)})",
                  f"  VGPU: {self.blocks} blocks, {self.blocks - self.streamed} resident, {self.streamed} streamed"
                  f" (prefetch depth {self.depth}, Level 0 slots {self.slots} × {human_bytes(self.slot_bytes)})")]
        for lv in self.levels:
            out.append(f"    L{lv.level} {lv.device:<10}{human_bytes(lv.held):>12} / {human_bytes(lv.capacity)}")
        if self.staging:
            out.append(tr(f"    SSD 读取暂存 (锁页){human_bytes(self.staging):>12}",
                          f"    SSD staging (pinned){human_bytes(self.staging):>12}"))
        if self.offloaded:
            out.append(tr(f"    卸载的优化器 (主机){human_bytes(self.offloaded + self.offload_steps):>12}"
                          " (fp32 主权重 + AdamW 状态)",
                          f"    offloaded optimizer (host){human_bytes(self.offloaded + self.offload_steps):>12}"
                          " (fp32 masters + AdamW state)"))
        if self.offload_disk:
            out.append(tr(f"    卸载的优化器 (SSD){human_bytes(self.offload_disk):>12} (放不进主机内存层级的 fp32 主权重 + AdamW 状态)",
                          f"    offloaded optimizer (SSD){human_bytes(self.offload_disk):>12}"
                          " (fp32 masters + AdamW state the host RAM levels cannot hold)"))
        out.append(tr(f"  设备峰值{human_bytes(self.device_peak):>12} (Level 0 + 本步的激活等); 主机 "
                      f"{human_bytes(self.host_bytes)}, 磁盘 {human_bytes(self.disk_bytes)}",
                      f"  device peak{human_bytes(self.device_peak):>12} (Level 0 + the step's activations etc.); "
                      f"host {human_bytes(self.host_bytes)}, disk {human_bytes(self.disk_bytes)}"))
        return out


def _clear_casts(module: nn.Module, args: Any, output: Any) -> None:
    torch.clear_autocast_cache()  # outside autocast the cache is empty


class ModelPlan:
    """A model laid out and planned over ``config``'s levels, as the stack would: ``plan``
    (``PlacementError`` with ``make_plan``'s reason when the levels cannot hold it). ``moved``: the model
    comes to Level 0 from another device (else its tensors stay and are counted there)."""

    def __init__(self, model: nn.Module, config: VGPUConfig, *, checkpoint_blocks: tuple[str, ...],
                 moved: bool) -> None:
        self.model = model
        self.config = config
        self.specs: Sequence[VGPULevel] = config.levels
        self.moved = moved
        self.modules = outermost(find_blocks(model, checkpoint_blocks))
        groups, rest = partition(model, self.modules)
        self.blocks = [Layout(g) for g in groups]
        self.rest = Layout(rest)
        try:
            self.plan: Plan = make_plan([b.nbytes for b in self.blocks], self.rest.nbytes,
                                        [capacity_bytes(s) for s in self.specs], config.prefetch_depth)
        except VBConfigError as exc:
            raise PlacementError(str(exc)) from None
        self.model_bytes = tensors_nbytes((*model.parameters(), *model.buffers()))

    @property
    def streamed_modules(self) -> list[nn.Module]:
        """The blocks the plan streams."""
        return [self.modules[i] for i in self.plan.streamed]

    def smallest_level0(self) -> int:
        """The Level 0 bytes of the plan that streams the most: the resident part and one slot
        (prefetch depth 0)."""
        return self.rest.nbytes + max((b.nbytes for b in self.blocks), default=0)

    def check_training(self, *, offload: bool) -> None:
        """Raise ``PlacementError`` unless the stack can train the blocks the plan streams: each
        recomputed in backward (activation checkpointing; its slot's weights are saved for
        nothing), and its weights stepped by the offloaded AdamW (``offload``; it writes them
        home). FP4 layers with master weights stream those (each use quantizes them)."""
        streamed = self.streamed_modules
        if not streamed:
            return
        if not all(is_checkpointed(self.model, block) for block in streamed):
            raise PlacementError(tr(
                f"训练时要流式 {len(streamed)} 个块, 需要激活检查点 (memory 或 full 模式, 或模型自己的 gradient checkpointing)",
                f"training {len(streamed)} streamed blocks needs activation checkpointing (mode memory or full, or "
                "the model's own gradient checkpointing)"))
        if not offload:
            raise PlacementError(tr(
                "训练流式的块需要卸载的 AdamW (vb.offload_optimizer) 把新权重写回其所在层级",
                "training streamed blocks needs the offloaded AdamW (vb.offload_optimizer) to write their new "
                "weights home"))

    def _level0(self) -> int:
        if self.moved:
            return self.plan.level_bytes[0]
        resident = [self.rest] + [b for b, home in zip(self.blocks, self.plan.homes, strict=True) if not home]
        return sum(layout.storage_bytes() for layout in resident) + self.plan.slots * self.plan.slot_bytes

    def _lower(self) -> list[LevelUse]:
        memory = _MetaMemory()
        out = []
        for i, spec in enumerate(self.specs[1:], 1):
            homed = [b.nbytes for b, home in zip(self.blocks, self.plan.homes, strict=True) if home == i]
            held = self.plan.level_bytes[i]
            if spec.device == "cpu":
                level = HostLevel(i, spec, memory, homed)
                for nbytes in homed:
                    level.allocate(nbytes)
                held = level.counters.resident_bytes
            out.append(LevelUse(i, spec.device, capacity_bytes(spec), held))
        return out

    @contextlib.contextmanager
    def releasing_casts(self) -> Iterator[None]:
        """While open, autocast's cache of weight casts is cleared after each call of a streamed
        block (its recomputation in backward too), as the stack does when it releases the
        block's slot."""
        hooks = [m.register_forward_hook(_clear_casts, always_call=True) for m in self.streamed_modules]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def placement(self, traced_peak: int, *, device_type: str, offload: bool) -> Placement:
        """The placement for a step whose traced peak (every model tensor resident) is
        ``traced_peak``; ``offload``: the step's optimizer is offloaded (its host bytes)."""
        level0 = self._level0()
        lower = self._lower()
        plan = self.plan
        on_disk = any(lv.device == "ssd" and lv.held for lv in lower)
        staging = plan.slots * plan.slot_bytes if device_type == "cuda" and on_disk else 0
        levels = (LevelUse(0, self.specs[0].device, capacity_bytes(self.specs[0]), level0), *lower)
        offloaded, disk, steps = self._offloaded([lv.held for lv in levels], staging) if offload else (0, 0, 0)
        return Placement(
            levels=levels, blocks=len(self.blocks), streamed=len(plan.streamed), depth=plan.depth, slots=plan.slots,
            slot_bytes=plan.slot_bytes, staging=staging, offloaded=offloaded, offload_steps=steps, offload_disk=disk,
            device_peak=traced_peak - self.model_bytes + level0)

    def _offloaded(self, held: list[int], staging: int) -> tuple[int, int, int]:
        """``offload_optimizer`` over every trainable parameter, beside the stack's ``held``
        bytes per level and ``staging`` bytes: its host arena, its swap files and its step
        counters (``PlacementError`` when the SSD levels cannot hold its state)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            homes = state_homes(params, self.specs, held, staging)
        except VBConfigError as exc:
            raise PlacementError(str(exc)) from None
        sizes = [n for p, home in zip(params, homes, strict=True) for n in host_sizes(p, state=home is None)]
        arena = HostArena(_MetaMemory(), sizes)
        for nbytes in sizes:  # taken in the optimizer's order
            arena.take_bytes(nbytes)
        disk = sum(swap_bytes(p) for p, home in zip(params, homes, strict=True) if home is not None)
        return arena.held_bytes, disk, STEP_BYTES * len(params)
