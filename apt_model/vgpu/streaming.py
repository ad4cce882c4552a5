"""The VGPU stack on a model: placement by the plan, and blocks streamed into Level 0 slots.

:func:`attach` lays out each repeated block's tensors (:mod:`~apt_model.vgpu.layout`), plans
(:mod:`~apt_model.vgpu.placement`), copies the streamed blocks to their homes (pinned host
RAM, or swap files), the rest of the model and the resident blocks into Level 0, and
allocates the Level 0 slots. Then forward hooks on every block, attached from outside (the
model's code and classes are untouched):

* before a streamed block runs, its bytes are in a slot (fetched ahead, or now: a miss), its
  tensors are pointed at the slot, and on CUDA the compute stream waits on the copy's event
  (only there; the wait is measured);
* after it ran, its tensors point at its home again and the slot is free for the next
  block: fetches go ``depth`` blocks ahead, cyclically, so the last blocks of one forward
  prefetch the first of the next (``generate()`` runs the blocks in the same order every
  step). On CUDA copies run on a side stream; elsewhere they run synchronously.

The order is the registration order until the first forward shows the real one; a block
used out of that order is fetched on demand (a miss), so a wrong guess costs time, never
results. Between uses a streamed block's tensors show its home (pinned host memory, or the
memory-mapped swap file), so ``state_dict()`` reads the real weights. :func:`detach` puts
every tensor back on the device the model was on, byte for byte.

Training (a forward that records gradients for a streamed block): the block must run under
activation checkpointing (non-reentrant ``torch.utils.checkpoint``: VB's memory and full
modes, or Hugging Face's ``gradient_checkpointing_enable``), so its forward saves nothing
that points into a slot; without it the first weight saved from a slot is refused. Its
trainable weights must be stepped by :func:`~apt_model.vgpu.offload.offload_optimizer`,
which writes the new weights into their home. In backward the block is fetched again when
the gradient of its output arrives (before checkpointing recomputes its forward), blocks are
prefetched in reverse order, and its slot stays bound until the gradients of its inputs and
of its parameters are computed; its parameters' gradients then leave the device through the
offloaded optimizer's hooks. A slot copy whose home bytes changed since (a weight update,
``load_state_dict``) is fetched again.

FP4 layers (:class:`~apt_model.fp4.layer.FP4Linear`) stream what they hold: a frozen layer its
packed weight (4.5 or 4.25 bits a weight: serving), a layer with a master weight that
Parameter in the model's dtype (training, e.g. full mode). The latter is quantized at each use
from the slot and never kept (:meth:`~apt_model.fp4.layer.FP4Linear.keep_packed`): the
training forward quantizes per call anyway, and for inference a kept packed copy would stay on
the device beside the plan, stale once the offloaded optimizer writes the new weight home. The
quantization reads the slot's bytes on the device, far faster than they crossed from their
home, so keeping nothing costs little where the weight streams anyway.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node, get_gradient_edge, saved_tensors_hooks
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from apt_model.accelerator import host_memory_info, resolve_device
from apt_model.errors import VBConfigError, VBUnsupportedError
from apt_model.i18n import tr
from apt_model.storage import human_bytes, storage_key
from apt_model.vgpu.layout import Layout, Slot, tensor_slots
from apt_model.vgpu.levels import (
    LEVEL_DEVICES,
    DeviceLevel,
    DiskLevel,
    HostLevel,
    HostMemory,
    LevelSpec,
    capacity_bytes,
    swap_dir,
)
from apt_model.vgpu.placement import Plan, make_plan
from apt_model.vgpu.stats import AccessCounters, DeviceTimings

STACK_ATTR = "_vb_vgpu"


class _Use:
    """One forward of a streamed block that autograd may run backward through: the gradient
    edges (nodes) of its inputs that require grad, the gradient accumulators of its streamed
    parameters in this forward's graph, and the graph task whose backward reached it (-1:
    none yet)."""

    __slots__ = ("__weakref__", "accumulators", "block", "guard", "inputs", "nodes", "task")

    def __init__(self, block: int, inputs: list[Tensor], guard: saved_tensors_hooks | None) -> None:
        self.block = block
        self.inputs = inputs  # until the forward ends, then their nodes
        self.nodes: list[Node] = []
        self.accumulators: list[Node] = []
        self.guard = guard
        self.task = -1


@dataclass
class _Session:
    """A streamed block's backward in one graph task: its slot stays bound until ``pending``
    gradients (of its inputs' and its parameters' uses in this backward) are computed;
    ``counted``: the parameters' gradient accumulators counted in ``pending`` (each runs once
    in a backward, however many uses share it)."""

    task: int
    pending: int = 0
    counted: set[int] = field(default_factory=set)


@dataclass
class _Call:
    """One call of a block under way: whether it holds the block's slot, recomputes it inside
    backward, records gradients (and then its use)."""

    pinned: bool = False
    recompute: bool = False
    training: bool = False
    use: _Use | None = None


@dataclass
class _Block:
    module: nn.Module
    layout: Layout
    home: int = 0  # level index; 0: resident
    home_flat: Tensor | None = None  # its bytes at home (host buffer or mapped swap file)
    params: list[nn.Parameter] = field(default_factory=list)  # all of the module's
    streamed: list[nn.Parameter] = field(default_factory=list)  # those laid out in its slot
    calls: list[_Call] = field(default_factory=list)  # its calls under way
    session: _Session | None = None


@dataclass
class _Slot:
    buffer: Tensor  # Level 0 bytes for one block
    staging: Tensor | None = None  # host bytes an SSD read lands in before the copy (CUDA)
    block: int | None = None  # whose bytes it holds (valid once ``ready`` has passed)
    users: int = 0
    ready: Any = None  # CUDA event: the copy into it is done
    free: Any = None  # CUDA event: the compute stream is done with it
    versions: tuple[int, ...] = ()  # its block's tensors' version counters when fetched
    stale: bool = False  # its block's home changed while it was in use: drop it when released


def _unpack(t: Tensor) -> Tensor:
    return t


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _tensors(*trees: Any) -> list[Tensor]:
    """The tensors in nested tuples, lists, dicts and model outputs, each once."""
    return list({id(t): t for t in tree_leaves(trees) if isinstance(t, Tensor)}.values())


def outermost(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """``blocks`` without those nested in another one (each module once)."""
    inner = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
    unique = {id(b): b for b in blocks}
    return [b for b in unique.values() if id(b) not in inner]


def _keep_packed(block: nn.Module, keep: bool) -> None:
    """``keep_packed(keep)`` on ``block``'s modules that have it (FP4 layers: a weight derived
    from the master weight and kept between calls): off while the block streams (a master
    weight is quantized at each use, see the module doc), on again when it is unplaced."""
    for module in block.modules():
        keep_packed = getattr(module, "keep_packed", None)
        if callable(keep_packed):
            keep_packed(keep)


def _compute_device(spec: LevelSpec) -> torch.device:
    if spec.device == "ssd":
        raise VBConfigError(tr("vgpu_config.levels[0] 是计算设备 (如 cuda:0 或 cpu)，不能是 ssd",
                               "vgpu_config.levels[0] is the compute device (e.g. cuda:0 or cpu), not ssd"))
    return resolve_device(spec.device)


def _origin(model: nn.Module) -> torch.device:
    """The one device holding all of ``model``'s tensors."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise VBConfigError(tr(
            f"VGPU 需要模型的张量都在同一设备上 (不在 meta 上)，现在在: {sorted(map(str, devices))}",
            f"VGPU needs all of the model's tensors on one device (not meta); they are on "
            f"{sorted(map(str, devices))}"))
    return next(iter(devices))


def partition(model: nn.Module, blocks: list[nn.Module]) -> tuple[list[list[Slot]], list[Slot]]:
    """The tensor attributes of each block, and of the rest of the model; a storage shared
    between blocks, or with the rest, stays with the rest (resident)."""
    in_blocks = {id(sub) for b in blocks for sub in b.modules()}
    groups = [tensor_slots(b.modules()) for b in blocks]
    rest = tensor_slots(m for m in model.modules() if id(m) not in in_blocks)
    owners: dict[tuple, set[int]] = {}
    for g, slots in enumerate([*groups, rest]):
        for slot in slots:
            owners.setdefault(storage_key(slot.get()), set()).add(g)
    shared = {key for key, gs in owners.items() if len(gs) > 1}
    for g, slots in enumerate(groups):
        rest.extend(s for s in slots if storage_key(s.get()) in shared)
        groups[g] = [s for s in slots if storage_key(s.get()) not in shared]
    return groups, rest


class VGPUStack:
    """The levels, the plan and the streaming hooks of one model (see the module doc)."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], levels: Sequence[LevelSpec],
                 depth: int | None = None) -> None:
        """Stream ``blocks`` of ``model`` over ``levels`` (Level 0 first: the compute device);
        ``depth``: blocks fetched ahead (None: automatic). The levels and a given SSD directory
        are checked now; the model is placed at its first forward (or by :meth:`place`), so
        what is placed is the model as it is then (e.g. FP4 layers frozen since)."""
        for i, spec in enumerate(levels[1:], 1):
            if spec.device not in LEVEL_DEVICES:
                raise VBConfigError(tr(f"vgpu_config.levels[{i}]: Level 0 以下只能是 cpu 或 ssd，收到 {spec.device}",
                                       f"vgpu_config.levels[{i}]: levels below Level 0 are cpu or ssd, got {spec.device}"))
            if spec.device == "ssd" and spec.path:
                swap_dir(spec, 0)
        self.model = model
        self.device = _compute_device(levels[0])
        self.specs = list(levels)
        self.depth_setting = depth
        self._cuda = self.device.type == "cuda"
        self.modules = outermost(blocks)
        self.placed = False
        self.offloaded: set[nn.Parameter] = set()  # parameters whose updates an offloaded optimizer writes home
        self._hooks = [model.register_forward_pre_hook(self._on_model_call)]
        for i, module in enumerate(self.modules):
            self._hooks.append(module.register_forward_pre_hook(functools.partial(self._before, i), with_kwargs=True))
            self._hooks.append(module.register_forward_hook(functools.partial(self._after, i), with_kwargs=True,
                                                            always_call=True))

    def place(self) -> None:
        """Plan and place the model now (nothing if placed already): one-line
        ``VBConfigError`` / ``VBDataError`` before anything moves when the levels cannot hold
        it or the SSD directory is unusable."""
        if self.placed:
            return
        self.origin = _origin(self.model)
        if self.origin.type != "cpu" and self.origin != self.device:
            raise VBConfigError(tr(
                f"vgpu_config.levels[0] 是 {self.device}，但模型在 {self.origin} 上: Level 0 须是模型计算所在的设备",
                f"vgpu_config.levels[0] is {self.device} but the model is on {self.origin}: Level 0 must be "
                "the device the model computes on"))
        self._moved = self.origin != self.device  # the resident part moves to Level 0 (from host RAM)
        groups, rest = partition(self.model, self.modules)
        self.blocks = [_Block(m, Layout(g)) for m, g in zip(self.modules, groups, strict=True)]
        self.rest = Layout(rest)
        self.plan: Plan = make_plan([b.layout.nbytes for b in self.blocks], self.rest.nbytes,
                                    [capacity_bytes(s) for s in self.specs], self.depth_setting)
        self._check_room()
        self.host_memory = HostMemory(pin=self._cuda)
        self.level0 = DeviceLevel(self.specs[0], self.device)
        self.lower: list[HostLevel | DiskLevel] = []
        for i, spec in enumerate(self.specs[1:], 1):
            if spec.device == "cpu":
                homed = [b.layout.nbytes for b, home in zip(self.blocks, self.plan.homes, strict=True) if home == i]
                self.lower.append(HostLevel(i, spec, self.host_memory, homed))
            else:
                self.lower.append(DiskLevel(i, spec, swap_dir(spec, self.plan.level_bytes[i])))
        self.access = AccessCounters()
        self._timings = DeviceTimings(self.access)
        self.slots: list[_Slot] = []
        self._slot_of: dict[int, _Slot] = {}
        self._param_hooks: dict[nn.Parameter, RemovableHandle] = {}  # on streamed parameters' gradients
        try:
            self._place()
        except BaseException:
            self._release()
            raise
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._slot_storages = {s.buffer.untyped_storage().data_ptr() for s in self.slots}
        self._dirty: set[int] = set()  # blocks whose home an optimizer step is writing
        self._home_index: dict[nn.Parameter, tuple[int, int]] = {}  # -> (block, index in its layout)
        for i, b in enumerate(self.blocks):
            if not b.home:
                continue
            for k, slot in enumerate(b.layout.slots):
                p = slot.get()
                if slot.is_param and p not in self._home_index:
                    self._home_index[p] = (i, k)
                    b.streamed.append(p)
        self._order = list(range(len(self.blocks)))
        self._seen: list[int] | None = []
        self._windows()
        self.placed = True

    def held_bytes(self) -> tuple[list[int], int]:
        """What the placed stack holds: bytes on each level (Level 0 first), and in the host
        staging buffers that SSD reads land in."""
        levels = [self.level0.counters.resident_bytes, *(level.counters.resident_bytes for level in self.lower)]
        return levels, sum(level.staging_bytes for level in self.lower if isinstance(level, DiskLevel))

    def unplace(self) -> None:
        """Every tensor back where the model had it, the levels freed; the hooks stay, and the
        next forward places the model again (as it is then)."""
        if not self.placed:
            return
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._release()
        self.placed = False

    def _on_model_call(self, module: nn.Module, args: Any) -> None:
        self.place()
        if not _in_backward():  # sessions left open by a backward that failed
            for i, b in enumerate(self.blocks):
                if b.session is not None:
                    self._end_session(i)

    # ---- placement ----------------------------------------------------------------------------

    def _check_room(self) -> None:
        """Host RAM for the host levels, checked before anything moves."""
        need = sum(held for spec, held in zip(self.specs[1:], self.plan.level_bytes[1:], strict=True)
                   if spec.device == "cpu")
        available, _ = host_memory_info()
        if self.origin.type == "cpu":  # the model's own host memory is freed as it moves
            available += self.rest.payload_bytes + sum(b.layout.payload_bytes for b in self.blocks)
        if need > available:
            raise VBConfigError(tr(
                f"VGPU 主机内存层级需要 {human_bytes(need)}，本机可用 {human_bytes(available)}",
                f"the VGPU host RAM level needs {human_bytes(need)}; {human_bytes(available)} is available"))

    def _resident_layouts(self) -> list[Layout]:
        return [self.rest] + [b.layout for b in self.blocks if not b.home]

    def _place(self) -> None:
        """Streamed blocks to their homes first (freeing Level 0 if the model was there), then
        the rest and the resident blocks into Level 0 (left in place, and counted, if the
        model is on the compute device already), then the slots."""
        for i, b in enumerate(self.blocks):
            b.home = self.plan.homes[i]
            b.params = list(b.module.parameters())
            if b.home == 0:
                continue
            _keep_packed(b.module, False)
            level = self.lower[b.home - 1]
            n = b.layout.nbytes
            b.home_flat = level.allocate(n) if isinstance(level, HostLevel) else level.store(i, n)
            b.layout.gather(b.home_flat)
            b.layout.bind_flat(b.home_flat)
            level.counters.bytes_in += n
            if not self._moved:
                self.level0.counters.bytes_out += n
        for layout in self._resident_layouts():
            if self._moved:
                flat = self.level0.allocate(layout.nbytes)
                layout.gather(flat)
                layout.bind_flat(flat)
                self.level0.counters.bytes_in += layout.nbytes
            else:
                self.level0.adopt(layout.storage_bytes())
        staged = self._cuda and any(isinstance(self.lower[b.home - 1], DiskLevel)
                                    for b in self.blocks if b.home)
        for _ in range(self.plan.slots):
            staging = None
            if staged:
                staging = self.host_memory.empty(self.plan.slot_bytes)
                disk = next(level for level in self.lower if isinstance(level, DiskLevel))
                disk.staging_bytes += staging.untyped_storage().nbytes()
            self.slots.append(_Slot(self.level0.allocate(self.plan.slot_bytes), staging))

    def detach(self) -> None:
        """Put every tensor back where the model had it, byte for byte, free the levels'
        buffers and swap files, and remove the hooks."""
        self.unplace()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _release(self) -> None:
        """Every tensor back on the original device (copied from wherever it is bound now),
        the levels' buffers and files freed."""
        for i, b in enumerate(self.blocks):
            if b.home_flat is None:
                continue
            if isinstance(self.lower[b.home - 1], DiskLevel):
                self.lower[b.home - 1].check(i)
            b.layout.materialize(self.origin)
            b.home_flat = None
            _keep_packed(b.module, True)
        if self._moved:
            for layout in self._resident_layouts():
                layout.materialize(self.origin)
        for hook in self._param_hooks.values():
            hook.remove()
        self._param_hooks.clear()
        for b in self.blocks:
            b.streamed.clear()
            b.calls.clear()
            b.session = None
        self.slots.clear()
        self._slot_of.clear()
        self.level0.close()
        for level in self.lower:
            level.close()

    # ---- streaming ----------------------------------------------------------------------------

    def _windows(self) -> None:
        """For each block, the streamed blocks to hold from its start and after its end: in
        inference over the execution order, cyclically (``generate()`` repeats it); in training
        over the order followed by the backward's (the same reversed), cyclically."""
        order = self._order
        n = len(order)
        train = order + order[::-1]
        width = min(self.plan.slots, sum(1 for b in self.blocks if b.home))

        def ahead(seq: list[int], q: int) -> list[int]:
            out: list[int] = []
            for k in range(len(seq)):
                b = seq[(q + k) % len(seq)]
                if self.blocks[b].home and b not in out:
                    out.append(b)
                if len(out) == width:
                    break
            return out

        self._from = {b: ahead(order, q) for q, b in enumerate(order)}
        self._after_end = {b: ahead(order, q + 1) for q, b in enumerate(order)}
        self._train_from = {b: ahead(train, q) for q, b in enumerate(order)}
        self._train_after = {b: ahead(train, q + 1) for q, b in enumerate(order)}
        self._back_from = {b: ahead(train, 2 * n - 1 - q) for q, b in enumerate(order)}
        self._back_after = {b: ahead(train, 2 * n - q) for q, b in enumerate(order)}

    def _observe(self, i: int) -> None:
        """Learn the execution order from the first uses (a block seen again ends the lesson)."""
        if self._seen is None:
            return
        again = i in self._seen
        if not again:
            self._seen.append(i)
        if again or len(self._seen) == len(self.blocks):
            learned = self._seen + [b for b in self._order if b not in self._seen]
            self._seen = None
            if learned != self._order:
                self._order = learned
                self._windows()

    def _name(self, i: int) -> str:
        return f"{i} ({type(self.blocks[i].module).__name__})"

    def _check_use(self, i: int) -> None:
        if torch.compiler.is_compiling() or (self._cuda and torch.cuda.is_current_stream_capturing()):
            raise VBUnsupportedError(tr("VGPU 流式块不能在 torch.compile 或 CUDA 图捕获中运行",
                                        "VGPU streamed blocks cannot run under torch.compile or CUDA graph capture"))
        self.blocks[i].layout.check_bound(f"block {self._name(i)}")

    def _check_training(self, i: int) -> None:
        """Refuse to train a streamed block whose trainable weights no offloaded optimizer
        writes home (a plain optimizer would step them where they are bound now)."""
        if any(p.requires_grad and p not in self.offloaded for p in self.blocks[i].streamed):
            raise VBUnsupportedError(tr(
                f"VGPU: 块 {self._name(i)} 的权重从下层级流入，训练它们需要 optimizer = vb.offload_optimizer(model, optimizer) "
                "(新权重写回其所在层级)，或冻结这些权重",
                f"VGPU: block {self._name(i)} streams from a lower level; training its weights needs "
                "optimizer = vb.offload_optimizer(model, optimizer) (it writes the new weights to their home), "
                "or freeze them"))

    def _guard(self, i: int) -> saved_tensors_hooks | None:
        """Where no saved-tensor hooks are active around the call (checkpointing inside the
        block's forward, or none at all), hooks that refuse the first tensor of a Level 0 slot
        saved for backward: it would outlive the slot's use. None where hooks are active
        (checkpointing around the call, or activations saved to the host)."""
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return None
        return saved_tensors_hooks(functools.partial(self._refuse_slot_save, i), _unpack)

    def _refuse_slot_save(self, i: int, t: Tensor) -> Tensor:
        if t.device == self.device and t.untyped_storage().data_ptr() in self._slot_storages:
            raise VBUnsupportedError(tr(
                f"VGPU: 训练流式块 {self._name(i)} 需要激活检查点 (非重入的 torch.utils.checkpoint): 它的前向为反向保存了 "
                "Level 0 槽位中的权重；请使用 VB 的 memory 或 full 模式，或 model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False})",
                f"VGPU: training streamed block {self._name(i)} needs activation checkpointing (non-reentrant "
                "torch.utils.checkpoint): its forward saved a weight in a Level 0 slot for backward; use VB's memory "
                "or full mode, or model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})"))
        return t

    def _before(self, i: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.place()
        b = self.blocks[i]
        call = _Call()
        b.calls.append(call)
        if _in_backward():  # checkpointing recomputes the block
            call.recompute = True
            if b.home:
                self._recompute(i)
                call.pinned = True
            return
        self._observe(i)
        inputs = [t for t in _tensors(args, kwargs) if t.requires_grad] if torch.is_grad_enabled() else []
        call.training = torch.is_grad_enabled() and (bool(inputs) or any(p.requires_grad for p in b.params))
        window = (self._train_from if call.training else self._from)[i]
        if not b.home:
            self.access.hits += 1
            self._prefetch(window)
            return
        self._check_use(i)
        if call.training:
            self._check_training(i)
            for p in b.streamed:
                if p.requires_grad and p not in self._param_hooks:
                    self._param_hooks[p] = p.register_post_accumulate_grad_hook(functools.partial(self._on_param_grad, i))
        self._pin(i, window)
        call.pinned = True
        if call.training:
            call.use = _Use(i, inputs, self._guard(i))
            if call.use.guard is not None:
                call.use.guard.__enter__()

    def _after(self, i: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self.placed:
            return
        b = self.blocks[i]
        if not b.calls:  # placed during this call (the first forward of a block run on its own)
            return
        call = b.calls.pop()
        if call.use is not None:
            if call.use.guard is not None:
                call.use.guard.__exit__(None, None, None)
            self._await_backward(call.use, output)
        if call.pinned:
            self._unpin(i)
            if torch.is_autocast_enabled(self.device.type):
                torch.clear_autocast_cache()  # casts of the slot's weights: no longer used
        if not call.recompute:
            self._prefetch((self._train_after if call.training else self._after_end)[i])

    def _recompute(self, i: int) -> None:
        """A streamed block called inside backward: checkpointing recomputing it while its
        backward holds it in a slot (its session)."""
        b = self.blocks[i]
        slot = self._slot_of.get(i)
        if b.session is None or slot is None or not slot.users:
            raise VBUnsupportedError(tr(
                f"VGPU: 流式块 {self._name(i)} 在反向中被调用而其反向未开始: 不支持重入式检查点；"
                "请使用 torch.utils.checkpoint(..., use_reentrant=False)",
                f"VGPU: streamed block {self._name(i)} was called inside backward outside its own backward: "
                "reentrant checkpointing is not supported; use torch.utils.checkpoint(..., use_reentrant=False)"))
        slot.users += 1

    def _versions(self, i: int) -> tuple[int, ...]:
        """The version counters of block ``i``'s streamed parameters (in-place writes bump them)."""
        return tuple(p._version for p in self.blocks[i].streamed)

    def _pin(self, i: int, window: list[int]) -> None:
        """Block ``i`` into a slot (fetched ahead, or now: a miss), its tensors bound to it, and
        held there until :meth:`_unpin`; then prefetch ``window``."""
        if i in self._dirty:
            raise VBUnsupportedError(tr(
                f"VGPU: 块 {self._name(i)} 的新权重正在写回其所在层级 (optimizer.step() 尚未调用)；"
                "请在下一次前向之前调用 optimizer.step()",
                f"VGPU: the new weights of block {self._name(i)} are being written home (optimizer.step() has not "
                "run yet): call optimizer.step() before the next forward"))
        b = self.blocks[i]
        slot = self._slot_of.get(i)
        if slot is not None and not slot.users and slot.versions != self._versions(i):
            self._drop(slot)  # written through its tensors since it was fetched (load_state_dict...)
            slot = None
        demand = slot is None
        if demand:
            slot = self._free_slot(window, demand=True)
            self._fetch(i, slot, demand=True)
        self._arrive(slot, demand)
        slot.users += 1
        if slot.users == 1:
            b.layout.bind_flat(slot.buffer[:b.layout.nbytes])
        self._prefetch(window)

    def _unpin(self, i: int) -> None:
        """One holder of block ``i``'s slot less; the last one binds its tensors home again."""
        b = self.blocks[i]
        slot = self._slot_of[i]
        slot.users -= 1
        if slot.users:
            return
        b.layout.bind_flat(b.home_flat)
        if self._cuda:
            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(self.device))
        if slot.stale:
            self._drop(slot)

    def _drop(self, slot: _Slot) -> None:
        """Forget the block an idle slot holds (its copy is out of date)."""
        del self._slot_of[slot.block]
        slot.block = None
        slot.stale = False

    # ---- backward -----------------------------------------------------------------------------

    def _await_backward(self, use: _Use, output: Any) -> None:
        """After a training forward of a streamed block: its backward starts when the gradient
        of one of its outputs arrives (a pre-hook on the nodes that made them) and ends when
        the gradients of its inputs and parameters are computed (hooks on each)."""
        nodes = {id(t.grad_fn): t.grad_fn for t in _tensors(output) if t.grad_fn is not None}
        inputs, use.inputs = use.inputs, []
        if not nodes:
            return
        for node in nodes.values():
            node.register_prehook(functools.partial(self._on_output_grad, use))
        use.nodes = [get_gradient_edge(t).node for t in inputs]
        # The accumulators this forward's graph holds, read while the parameters are bound to the
        # slot: rebinding a parameter to another device (its home) drops the parameter's link to
        # them, and a later get_gradient_edge would make a new accumulator outside the graph.
        use.accumulators = [get_gradient_edge(p).node for p in self.blocks[use.block].streamed
                            if p.requires_grad and p in self._param_hooks]
        ref = weakref.ref(use)  # the graph holds the use through the pre-hooks, not through these
        for t in inputs:
            t.register_hook(functools.partial(self._on_input_grad, ref))

    def _on_output_grad(self, use: _Use, grad_outputs: Any) -> None:
        """Block ``use.block``'s backward starts (before checkpointing recomputes its forward):
        the block into a slot, held by its session; blocks before it prefetched."""
        task = torch._C._current_graph_task_id()
        if use.task == task or not self.placed:
            return
        use.task = task
        i = use.block
        b = self.blocks[i]
        if b.session is not None and b.session.task != task:
            self._end_session(i)
        if b.session is None:
            self._pin(i, self._back_from[i])
            b.session = _Session(task)
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._backward_done, i, b.session))
        session = b.session
        for node in use.accumulators:
            if id(node) not in session.counted and torch._C._will_engine_execute_node(node):
                session.counted.add(id(node))
                session.pending += 1
        session.pending += sum(map(torch._C._will_engine_execute_node, use.nodes))

    def _on_input_grad(self, ref: weakref.ref, grad: Tensor) -> None:
        use = ref()
        if use is not None and use.task == torch._C._current_graph_task_id():
            self._count_down(use.block)

    def _on_param_grad(self, i: int, p: nn.Parameter) -> None:
        if self.placed:
            self._count_down(i)

    def _count_down(self, i: int) -> None:
        s = self.blocks[i].session
        if s is None or s.task != torch._C._current_graph_task_id():
            return
        s.pending -= 1
        if s.pending <= 0:
            self._end_session(i)

    def _backward_done(self, i: int, session: _Session) -> None:
        """The end of the backward that opened ``session``: close it if still open (a block
        whose gradients went nowhere the hooks see)."""
        if self.placed and self.blocks[i].session is session:
            self._end_session(i)

    def _end_session(self, i: int) -> None:
        self.blocks[i].session = None
        self._unpin(i)
        self._prefetch(self._back_after[i])

    # ---- for the offloaded optimizer ------------------------------------------------------------

    def home_view(self, p: nn.Parameter) -> Tensor | None:
        """Streamed parameter ``p`` as it lies at its home (host RAM or the mapped swap file),
        whatever it is bound to now; None where ``p`` does not stream (or nothing is placed)."""
        if not self.placed or p not in self._home_index:
            return None
        i, k = self._home_index[p]
        b = self.blocks[i]
        return b.layout.view_in(b.home_flat, k)

    def writing(self, p: nn.Parameter) -> None:
        """An optimizer starts writing streamed ``p``'s new value into its home (counted in the
        home level's bytes in): its block's Level 0 copy is dropped (now, or when its use
        ends), and the block is not fetched until :meth:`written`."""
        i = self._home_index[p][0]
        self._dirty.add(i)
        self.lower[self.blocks[i].home - 1].counters.bytes_in += p.nbytes
        slot = self._slot_of.get(i)
        if slot is not None:
            if slot.users:
                slot.stale = True
            else:
                self._drop(slot)

    def written(self) -> None:
        """The writes announced by :meth:`writing` are done: the first blocks of the next
        forward are prefetched."""
        self._dirty.clear()
        if self.placed:
            self._prefetch(self._from[self._order[0]])

    def _free_slot(self, window: list[int], demand: bool = False) -> _Slot | None:
        """An idle slot: empty, else holding a block outside ``window``; on ``demand`` also the
        one holding the window's last block. None if there is none (raises on ``demand``)."""
        idle = [s for s in self.slots if not s.users]
        for slot in idle:
            if slot.block is None:
                return slot
        for slot in idle:
            if slot.block not in window:
                return slot
        if demand:
            if not idle:
                raise VBUnsupportedError(tr(
                    f"VGPU: 全部 {len(self.slots)} 个 Level 0 槽位都在使用中 (块嵌套过深)",
                    f"VGPU: all {len(self.slots)} Level 0 slots are in use (blocks nested too deep)"))
            return max(idle, key=lambda s: window.index(s.block))
        return None

    def _prefetch(self, window: list[int]) -> None:
        for j in window:
            if j in self._slot_of or j in self._dirty:
                continue
            slot = self._free_slot(window)
            if slot is None:
                return
            self._fetch(j, slot, demand=False)

    def _fetch(self, j: int, slot: _Slot, demand: bool) -> None:
        """Copy block ``j`` from its home into ``slot`` (on the side stream on CUDA)."""
        b = self.blocks[j]
        n = b.layout.nbytes
        if slot.block is not None:
            self.access.demotions += 1
            del self._slot_of[slot.block]
        slot.block = j
        slot.versions = self._versions(j)
        self._slot_of[j] = slot
        self.access.promotions += 1
        self.access.prefetches += not demand
        home = self.lower[b.home - 1]
        level0 = self.level0.counters
        level0.bytes_in += n
        home.counters.bytes_out += n
        dst = slot.buffer[:n]
        disk = isinstance(home, DiskLevel)
        if not self._cuda:
            start = time.perf_counter()
            if disk:
                home.read(j, dst)
            else:
                dst.copy_(b.home_flat)
            seconds = time.perf_counter() - start
            home.counters.timed(n, seconds)
            level0.timed(n, seconds)
            self.access.stall_s += seconds
            return
        if slot.free is not None:
            self._copy_stream.wait_event(slot.free)
        source = b.home_flat
        if disk:
            if slot.ready is not None:
                slot.ready.synchronize()  # the staging buffer's last copy has left
            start = time.perf_counter()
            home.read(j, slot.staging)
            home.counters.timed(n, time.perf_counter() - start)
            source = slot.staging[:n]
        with torch.cuda.stream(self._copy_stream):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(source, non_blocking=True)
            end.record()
        slot.ready = end
        self._timings.copy((level0,) if disk else (level0, home.counters), n, begin, end)

    def _arrive(self, slot: _Slot, demand: bool) -> None:
        """The compute reaches a block in ``slot``: on CUDA its stream waits for the copy
        (timed by events); on the CPU the copy is done, a hit unless fetched on ``demand``."""
        if not self._cuda:
            if demand:
                self.access.misses += 1
            else:
                self.access.hits += 1
            return
        stream = torch.cuda.current_stream(self.device)
        arrived, resumed = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        arrived.record(stream)
        stream.wait_event(slot.ready)
        resumed.record(stream)
        self._timings.use(slot.ready, arrived, resumed, demand)
        self._timings.poll(wait=False)

    # ---- statistics ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per level: capacity, bytes held now and at peak, bytes in and out, achieved GB/s
        against the configured speed; Level 0 also hits, misses, promotions, demotions and
        stall time; and the plan (only ``placed`` False before the first forward)."""
        if not self.placed:
            return {"placed": False, "blocks": len(self.modules)}
        if self._cuda:
            self._timings.poll(wait=True)
        levels = [{**self.level0.counters.to_dict(), **self.access.to_dict()}]
        for level in self.lower:
            entry = level.counters.to_dict()
            if isinstance(level, DiskLevel):
                entry["path"] = str(level.folder or level.directory)
                entry["staging_bytes"] = level.staging_bytes
            levels.append(entry)
        return {
            "placed": True,
            "blocks": len(self.blocks),
            "resident_blocks": len(self.blocks) - len(self.plan.streamed),
            "streamed_blocks": len(self.plan.streamed),
            "depth": self.plan.depth,
            "slots": self.plan.slots,
            "levels": levels,
        }


def attach(model: nn.Module, blocks: Sequence[nn.Module], levels: Sequence[LevelSpec],
           depth: int | None = None) -> VGPUStack:
    """Place ``model`` over ``levels`` and stream ``blocks`` (see :class:`VGPUStack`)."""
    if stack_of(model) is not None:
        raise VBConfigError(tr("此模型已有VGPU堆叠", "this model already has a VGPU stack"))
    stack = VGPUStack(model, blocks, levels, depth)
    object.__setattr__(model, STACK_ATTR, stack)
    return stack


def stack_of(model: nn.Module) -> VGPUStack | None:
    return getattr(model, STACK_ATTR, None)


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (nothing if ``model`` has no stack)."""
    stack = stack_of(model)
    if stack is not None:
        stack.detach()
        object.__delattr__(model, STACK_ATTR)
