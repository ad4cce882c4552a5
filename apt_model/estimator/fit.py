"""Will it fit? The free memory of a device, the one fitting rule (a stated margin kept back),
the least aggressive mode that fits, and the largest batch that fits, all from traced steps.

One rule everywhere (``vb estimate --memory``, ``auto_estimate``, the launchers' check):
a step fits when its estimated peak is at most ``(1 - FIT_MARGIN)`` of the memory there is.
The margin stands for what the trace does not see: allocator caching and fragmentation,
kernel workspaces, and on the CPU the process's own code and libraries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from apt_model import accelerator
from apt_model.estimator.estimate import Estimate, Traced
from apt_model.estimator.levels import PlacementError
from apt_model.i18n import tr
from apt_model.optimization.config import MODES, MOST_AGGRESSIVE, VBConfig, VGPULevel
from apt_model.storage import human_bytes
from apt_model.vgpu.levels import MIB, copy_gbps
from apt_model.vgpu.placement import AUTO_DEPTHS

FIT_MARGIN = 0.10
LINK_PROBE_BYTES = 64 * 2**20  # a timed host-to-device copy: the VGPU plan's link speed


def free_memory(device: torch.device) -> int:
    """The bytes a run on ``device`` can take now: the device's free memory; on the CPU (or
    where the backend cannot say) the available system RAM."""
    info = accelerator.device_memory_info(device)
    return info[0] if info is not None else accelerator.host_memory_info()[0]


def usable(free: int) -> int:
    """What the fitting rule lets a step take of ``free`` bytes."""
    return int(free * (1 - FIT_MARGIN))


def room(free: int) -> str:
    """``free`` bytes and what the fitting rule lets a step take of them, in words."""
    return tr(f"可用 {human_bytes(free)}, 留出 {FIT_MARGIN:.0%} 余量后 {human_bytes(usable(free))}",
              f"{human_bytes(free)} free, {human_bytes(usable(free))} after a {FIT_MARGIN:.0%} margin")


def fits(est: Estimate, free: int) -> bool:
    """Whether ``est`` fits in ``free`` bytes with the margin kept back."""
    return est.peak_bytes <= usable(free)


def largest_batch(step: Callable[[int], Estimate], free: int, too_big: int,
                  too_big_peak: int | None = None) -> int:
    """The largest batch whose step (``step(batch)``) fits in ``free`` bytes, knowing that
    ``too_big`` does not (its peak ``too_big_peak``, traced when not given); 0 when batch 1
    does not fit either.

    A bracketed search. Memory is the larger of a fixed part (weights, optimizer state) and
    a part affine in the batch (activations), so the line through the two smallest batches
    known not to fit, followed down to the limit, lands on the answer or just above it; the
    first such pair is ``too_big`` and the middle of the bracket. When a try does not halve
    the bracket the next one is the middle. Each try is one traced step.
    """
    limit = usable(free)
    if step(1).peak_bytes > limit:
        return 0
    low, high = 1, too_big
    if too_big_peak is None:
        too_big_peak = step(too_big).peak_bytes
    failing = [(too_big, too_big_peak)]  # (batch, peak) not fitting, smallest first
    halved = False  # the first try is the middle
    while high - low > 1:
        span = high - low
        if halved and len(failing) > 1 and failing[1][1] > failing[0][1]:
            (b1, p1), (b2, p2) = failing[:2]
            guess = b1 - int((p1 - limit) * (b2 - b1) / (p2 - p1))
            guess = min(max(guess, low + 1), high - 1)
        else:
            guess = (low + high) // 2
        peak = step(guess).peak_bytes
        if peak <= limit:
            low = guess
        else:
            high = guess
            failing.insert(0, (guess, peak))
        halved = (high - low) * 2 <= span
    return low


@dataclass(frozen=True)
class ModeChoice:
    """The least aggressive mode that fits (``mode``; None when none does), the peak of each
    mode tried (in ``MODES`` order, up to the one that fits; none for a mode whose weights the
    VGPU levels cannot hold) and the free memory."""

    mode: str | None
    peaks: dict[str, int]
    free: int
    training: bool

    def reason(self) -> str:
        """Why: each mode tried with its peak, against the free memory and the margin."""
        if not self.peaks:
            return tr("VGPU 层级放不下任何模式的权重, 或要流式的块在该模式下无法训练",
                      "the VGPU levels hold no mode's weights, or stream blocks that mode cannot train")
        tried = ", ".join(f"{mode} {human_bytes(peak)}" for mode, peak in self.peaks.items())
        step = tr("一步训练", "a training step") if self.training else tr("一步解码", "a decode step")
        return tr(f"{step}的峰值: {tried}; {room(self.free)}", f"peak of {step}: {tried}; {room(self.free)}")


def choose_mode(target: Any, *, free: int, batch: int = 1, seq: int | None = None, training: bool = True,
                optimizer: str = "adamw", device: str | None = None, base: VBConfig | None = None,
                known: Mapping[str, int] | None = None, levels: Any = None) -> ModeChoice:
    """Trace ``target``'s step in each mode of ``MODES``, least aggressive first, and stop at
    the first that fits in ``free`` bytes (arguments as for ``estimate``; ``known``: peaks of
    this step already traced, by mode, not traced again). With ``levels`` a mode whose
    weights the levels cannot hold, or whose streamed blocks the stack cannot train, is passed
    over (no peak)."""
    peaks: dict[str, int] = {}
    for mode in MODES:
        if known is not None and mode in known:
            peaks[mode] = known[mode]
        else:
            try:
                traced = Traced(target, mode=mode, training=training, device=device, base=base, levels=levels)
                peaks[mode] = traced.step(batch=batch, seq=seq, optimizer=optimizer).peak_bytes
            except PlacementError:
                continue
        if peaks[mode] <= usable(free):
            return ModeChoice(mode, peaks, free, training)
    return ModeChoice(None, peaks, free, training)


def smallest_fit(target: Any, *, free: int, batch: int, seq: int | None, training: bool, optimizer: str,
                 device: str | None, base: VBConfig | None, known: Mapping[str, int] | None = None,
                 levels: Any = None) -> str | None:
    """The smallest change that makes ``target``'s step fit in ``free`` bytes, in words: the
    least aggressive mode that fits at this batch, else the largest batch that fits in the
    most aggressive mode; None when not even batch 1 fits there. ``known``: peaks of this
    step already traced, by mode; ``levels``: VGPU levels (as for ``choose_mode``)."""
    choice = choose_mode(target, free=free, batch=batch, seq=seq, training=training, optimizer=optimizer,
                         device=device, base=base, known=known, levels=levels)
    if choice.mode is not None:
        return tr(f"模式 {choice.mode}, batch {batch}", f"mode {choice.mode} with batch {batch}")
    if MOST_AGGRESSIVE not in choice.peaks:  # the levels cannot hold its weights
        return None
    traced = Traced(target, mode=MOST_AGGRESSIVE, training=training, device=device, base=base, levels=levels)
    best = largest_batch(lambda b: traced.step(batch=b, seq=seq, optimizer=optimizer), free, batch,
                         choice.peaks[MOST_AGGRESSIVE])
    return tr(f"模式 {MOST_AGGRESSIVE}, batch {best}", f"mode {MOST_AGGRESSIVE} with batch {best}") if best else None


@dataclass(frozen=True)
class VGPUChoice:
    """A mode and the VGPU levels it fits with (``levels``: ``vgpu_config`` as the
    configuration takes it), the step's estimate over them, and the free memory it was sized
    against (device, host)."""

    mode: str
    levels: dict[str, Any]
    estimate: Estimate
    free: int
    host_free: int

    def reason(self) -> str:
        """What goes where, in words."""
        placement = self.estimate.placement
        levels = ", ".join(f"L{lv.level} {lv.device} {human_bytes(lv.held)}/{human_bytes(lv.capacity)}"
                           for lv in placement.levels)
        offloaded = (tr(f", 优化器状态与 fp32 主权重在主机 ({human_bytes(placement.offloaded)})",
                        f", optimizer state and fp32 masters on the host ({human_bytes(placement.offloaded)})")
                     if placement.offloaded else "")
        if placement.offload_disk:
            offloaded += tr(f" 与 SSD ({human_bytes(placement.offload_disk)})",
                            f" and the SSD ({human_bytes(placement.offload_disk)})")
        if placement.streamed and self.estimate.training:
            offloaded += tr(", 流式的块在反向中重算 (激活检查点)",
                            ", streamed blocks recomputed in backward (activation checkpointing)")
        return tr(f"{placement.streamed}/{placement.blocks} 个块流式, {levels}{offloaded}; 设备峰值 "
                  f"{human_bytes(self.estimate.peak_bytes)}, {room(self.free)}; 主机 "
                  f"{human_bytes(placement.host_bytes)}, {room(self.host_free)}",
                  f"{placement.streamed}/{placement.blocks} blocks streamed, {levels}{offloaded}; device peak "
                  f"{human_bytes(self.estimate.peak_bytes)}, {room(self.free)}; host "
                  f"{human_bytes(placement.host_bytes)}, {room(self.host_free)}")


def _level(capacity: int, device: str, speed: float) -> dict[str, Any]:
    return {"capacity_mb": capacity / MIB, "device": device, "speed_gbps": round(speed, 1)}


def choose_vgpu(target: Any, *, free: int, host_free: int, batch: int = 1, seq: int | None = None,
                training: bool = True, device: torch.device, base: VBConfig | None = None,
                disk: tuple[VGPULevel, ...] = ()) -> VGPUChoice | None:
    """The least aggressive mode of ``MODES`` that fits with a VGPU plan, and the plan: Level 0
    = what the fitting rule leaves of ``free`` device bytes once the step's own tensors
    (activations, transient gradients, runtime) are counted; Level 1 = host RAM, what it
    leaves of ``host_free`` beside the offloaded optimizer (on a CPU device, beside Level 0
    too: the same memory); then the ``disk`` levels (a configured SSD), where the offloaded
    optimizer's masters and moments go once Level 1 is full. Levels 0 and 1 share
    one link, host to device, whose speed is measured (``copy_gbps``) once a plan is found.
    A training step offloads AdamW, and streams blocks only in a mode whose blocks the stack
    can train streamed (``ModelPlan.check_training``: checkpointing), which makes ``memory``
    and ``full`` the modes of ``MODES`` that stream in training. None when no mode fits."""
    host_room = usable(host_free) - (usable(free) if device.type == "cpu" else 0)
    if host_room <= 0:
        return None
    disk_levels = [asdict(level) for level in disk]
    for mode in MODES:
        traced = Traced(target, mode=mode, training=training, device=str(device), base=base,
                        levels=[_level(2**60, str(device), 1.0), _level(2**60, "cpu", 1.0)])
        found = _place(traced, traced.step(batch=batch, seq=seq), str(device), free, host_room, disk_levels)
        if found is None:
            continue
        placed, level0, level1 = found
        link = copy_gbps(torch.device("cpu"), device, max(MIB, min(LINK_PROBE_BYTES, placed.placement.levels[0].held)))
        levels = {"levels": [_level(level0, str(device), link), _level(level1, "cpu", link), *disk_levels]}
        return VGPUChoice(mode, levels, placed, free, host_free)
    return None


def _place(traced: Traced, resident: Estimate, device: str, free: int, host_room: int,
           disk_levels: list[dict[str, Any]]) -> tuple[Estimate, int, int] | None:
    """``traced``'s step (``resident``: traced with every block in Level 0) placed over a Level 0
    on ``device`` that it fits in with the step's own tensors, Level 1 = ``host_room`` less the
    offloaded optimizer (its step counters only, with ``disk_levels``: its masters and moments
    share Level 1 and spill to the SSD), and ``disk_levels``: the step placed, and the bytes of Levels 0 and 1;
    None when no such plan exists.

    The step's own tensors depend on the plan (a streamed block releases its weight casts):
    they are least when every block streams. Level 0 starts at what the fitting rule leaves
    beside those, and shrinks by each plan's excess, its step traced, until one fits."""
    placement = resident.placement
    # With an SSD level the offloaded optimizer's masters and moments live within Level 1's
    # capacity, the rest in swap files (``state_homes``): Level 1 is then all the host room.
    level1 = host_room - placement.offload_steps - (0 if disk_levels else placement.offloaded)
    own = resident.peak_bytes - placement.levels[0].held
    vb_plan = traced.vb_plan
    try:  # the plan that streams the most: one slot beside the resident part
        fewest = traced.placed(resident, {"levels": [_level(vb_plan.smallest_level0(), device, 1.0),
                                                     _level(2**60, "cpu", 1.0)], "prefetch_depth": 0})
        own = min(own, fewest.peak_bytes - fewest.placement.levels[0].held)
    except PlacementError:  # this step cannot stream its blocks
        pass
    level0 = usable(free) - own
    for _ in range(len(vb_plan.blocks) + len(AUTO_DEPTHS) + 1):
        if level0 <= 0 or level1 <= 0:
            return None
        try:
            placed = traced.placed(resident, [_level(level0, device, 1.0), _level(level1, "cpu", 1.0), *disk_levels])
        except PlacementError:  # the levels cannot hold the model, or this step cannot stream
            return None
        if placed.placement.host_bytes > host_room:
            return None
        excess = placed.peak_bytes - usable(free)
        if excess <= 0:
            return placed, level0, level1
        level0 -= excess
    return None
