"""Training with offloaded optimizer state: fp32 masters and AdamW moments in host RAM or SSD swap files.

:func:`offload_optimizer` takes over a ``torch.optim.AdamW`` and returns an
:class:`OffloadedAdamW` (an ``AdamW`` itself: same ``param_groups`` dicts, so lr schedulers
and ``group["lr"] = ...`` work) that the user's loop keeps calling unchanged. For each
offloaded parameter the host holds its fp32 master, ``exp_avg``, ``exp_avg_sq`` and ``step``
(page-locked when the compute device is CUDA, pageable with one warning where pinning is
refused) and one transfer buffer in the parameter's dtype; the compute device holds only the
parameter itself, the compute copy (bf16, or fp32 for an fp32 model).

* As soon as a parameter's gradient is final (``register_post_accumulate_grad_hook``) it is
  copied into the transfer buffer (on CUDA on a side stream after an event of the compute
  stream; elsewhere synchronously) and the device gradient is freed: ``p.grad`` of an
  offloaded parameter is None after ``backward()``.
* Its AdamW step runs on the host, in one background thread, with torch's fused CPU AdamW
  (the fastest of torch's CPU implementations, ``bench/cpu_adamw.py``; bit for bit
  ``torch.optim.AdamW(fused=True)`` on CPU tensors): started from the hook, so it overlaps
  the backward of earlier blocks; with ``max_grad_norm`` it starts in ``step()``, once the
  norm of all gradients is known (``torch.nn.utils.clip_grad_norm_``'s arithmetic). The
  updated master is cast into the transfer buffer and copied back into the parameter (a
  second side stream on CUDA). A parameter of a block that a VGPU stack streams
  (:mod:`.streaming`) has no place on the device between uses: its new weight is written
  into its home (host RAM or the swap file), and the stack fetches it from there.
* Gradient accumulation: with ``accumulate=n`` the gradients of ``n`` backwards are summed
  on the host (the device's arithmetic, in the parameter's dtype) and the steps start in
  the ``n``-th one; ``step()`` after fewer backwards steps what came.
* ``step()`` waits for those steps (on CUDA the compute stream waits on the copies' events;
  the wait is timed) and steps the other parameters on their device as ``AdamW`` would.

Where the levels (a VGPU stack's, or those given) have an SSD level and the host RAM levels,
beside what the stack keeps there, cannot hold every master and moment, the masters and
moments of as many parameters as needed (the last ones, :func:`state_homes`) live in swap
files on the SSD level instead, one a parameter, decided once before anything moves. They are
memory-mapped and stepped in place by the same fused AdamW: the page cache reads them
ahead and writes them back while other parameters step, with no staging copy in host RAM
(explicit reads and writes would need one per parameter and serialize read, step, write);
the transfer and staging buffers stay in host RAM. Each step first checks its swap file
(a deleted or truncated one is a clear error, not a crash on a missing page).

Refused with one line: other optimizers, ``amsgrad`` / ``maximize`` / ``capturable`` /
``differentiable``, a backward after the overlapped steps started (more than ``accumulate``
before ``step()``), changing hyperparameters between an overlapped backward and ``step()``,
and ``zero_grad()`` between them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adam import adam
from torch.utils.weak import WeakIdKeyDictionary

from apt_model.accelerator import host_memory_info
from apt_model.errors import VBConfigError, VBUnsupportedError
from apt_model.i18n import tr
from apt_model.storage import human_bytes
from apt_model.vgpu.levels import (
    DiskLevel,
    HostArena,
    HostMemory,
    LevelSpec,
    capacity_bytes,
    host_aligned,
    swap_dir,
)
from apt_model.vgpu.streaming import VGPUStack, stack_of

UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")
_OWNER = WeakIdKeyDictionary()  # parameter -> the OffloadedAdamW that offloads it


@dataclass
class OffloadCounters:
    """What the offloaded optimizer did: bytes of gradients copied off the device and of
    weights copied back, seconds of host AdamW steps, seconds the compute waited for them
    (on CUDA the compute stream's wait, by events; elsewhere the host's wait in ``step()``)."""

    steps: int = 0
    grad_bytes_off: int = 0
    weight_bytes_back: int = 0
    weight_bytes_home: int = 0  # new weights of streamed parameters written into their home
    host_step_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class _Host:
    """One offloaded parameter's host side."""

    master: Tensor
    transfer: Tensor  # the parameter's dtype: where its gradient lands and its new weight leaves
    staged: Tensor | None = None  # (CUDA, accumulating) where a later gradient lands before it is added
    landed: int = 0  # gradients come off since the last ``step()``
    grad_ready: Any = None  # CUDA event: the gradient's copy is done
    adding: Future | None = None  # (CUDA) the host sum of the last gradient that came off
    back: Any = None  # CUDA event: the new weight's copy is done
    future: Future | None = None
    hyper: tuple = ()  # the hyperparameters its pending step used
    home: Tensor | None = None  # a streamed parameter's home bytes, where its pending step writes
    swap: tuple[DiskLevel, int] | None = None  # the SSD level and swap file holding its master and moments


def _hyper(group: dict[str, Any]) -> tuple[float, float, float, float, float]:
    beta1, beta2 = group["betas"]
    return float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"])


def _adamw(params: list[Tensor], grads: list[Tensor], state: Sequence[dict[str, Tensor]],
           hyper: tuple[float, float, float, float, float], **implementation: Any) -> None:
    """One AdamW step of ``params`` (torch's own ``adam`` with decoupled weight decay)."""
    lr, beta1, beta2, eps, weight_decay = hyper
    adam(params, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [],
         [s["step"] for s in state], amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
         eps=eps, maximize=False, decoupled_weight_decay=True, **implementation)


def _master_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _state_sizes(p: Tensor) -> list[int]:
    """Bytes of ``p``'s master, exp_avg and exp_avg_sq, in that order."""
    return [p.numel() * _master_dtype(p).itemsize] * 3


def host_sizes(p: Tensor, staged: bool = False, state: bool = True) -> list[int]:
    """Bytes of ``p``'s host tensors in the order they are taken: master, exp_avg, exp_avg_sq
    (when ``state``: they live in host RAM), the transfer buffer, and the staging buffer of
    accumulated gradients on CUDA when ``staged``."""
    return [*(_state_sizes(p) if state else ()), p.nbytes, *([p.nbytes] * staged)]


def swap_bytes(p: Tensor) -> int:
    """Bytes of the swap file holding ``p``'s master and moments (each aligned as in host RAM)."""
    return sum(map(host_aligned, _state_sizes(p)))


def state_homes(params: Sequence[Tensor], specs: Sequence[LevelSpec], held: Sequence[int], staging: int,
                staged: bool = False) -> list[int | None]:
    """Where the offloaded optimizer keeps each of ``params``' master and moments: None for
    host RAM, else the index of the SSD level whose swap file holds them. From the levels
    ``specs`` (Level 0 first) less what a VGPU stack holds on each (``held``) and in staging
    buffers (``staging``): host RAM for each parameter, in order, while the host RAM levels
    have room beside the transfer (and ``staged``: staging) buffers, which stay there; then
    the first SSD level with room. Without an SSD level all stay in host RAM. One-line
    ``VBConfigError`` when the SSD levels cannot hold the rest."""
    ssd = [i for i, spec in enumerate(specs) if i and spec.device == "ssd"]
    if not ssd:
        return [None] * len(params)
    host = (sum(capacity_bytes(spec) - held[i] for i, spec in enumerate(specs) if i and spec.device == "cpu")
            - staging - sum(host_aligned(n) for p in params for n in host_sizes(p, staged, state=False)))
    room = {i: capacity_bytes(specs[i]) - held[i] for i in ssd}
    homes: list[int | None] = []
    for k, p in enumerate(params):
        need = swap_bytes(p)
        if need <= host:
            host -= need
            homes.append(None)
            continue
        level = next((i for i in ssd if room[i] >= need), None)
        if level is None:
            left = sum(map(swap_bytes, params[k:]))
            have = max(host, 0) + sum(max(r, 0) for r in room.values())
            short = human_bytes(max(left - have, need - max(room.values())))
            raise VBConfigError(tr(
                f"VGPU 卸载的优化器的 fp32 主权重与 AdamW 状态还需 {human_bytes(left)}，主机内存与 SSD 层级在 VGPU "
                f"堆叠之外只剩 {human_bytes(have)}: 缺 {short}",
                f"the VGPU offloaded optimizer's fp32 masters and AdamW state need {human_bytes(left)} more; the "
                f"host RAM and SSD levels have {human_bytes(have)} left beside the VGPU stack: short by {short}"))
        room[level] -= need
        homes.append(level)
    return homes


class OffloadedAdamW(torch.optim.AdamW):
    """``AdamW`` whose offloaded parameters keep their master and state in host RAM (or SSD
    swap files) and are stepped on the host (see the module doc). Build it with
    :func:`offload_optimizer`."""

    def __init__(self, optimizer: torch.optim.AdamW, offloaded: Sequence[nn.Parameter], device: torch.device,
                 max_grad_norm: float | None = None, order: Sequence[nn.Parameter] = (),
                 stack: VGPUStack | None = None, accumulate: int = 1,
                 swaps: Sequence[DiskLevel | None] = ()) -> None:
        """Take over ``optimizer``'s groups and state; offload ``offloaded``, computed with on
        ``device``; clip to ``max_grad_norm``, the norm summed over parameters in ``order``
        (the model's; others after), as ``clip_grad_norm_(model.parameters())`` sums it; write
        the new weights of parameters that ``stack`` streams into their home; sum the
        gradients of ``accumulate`` backwards per step; keep the master and moments of
        ``offloaded[k]`` in a swap file of ``swaps[k]`` (None, or no ``swaps``: host RAM).
        A failure to reserve the swap files (a full disk) leaves ``optimizer`` as it was."""
        torch.optim.Optimizer.__init__(self, optimizer.param_groups, optimizer.defaults)
        self._order = list(dict.fromkeys([*order, *(p for g in self.param_groups for p in g["params"])]))
        self.max_grad_norm = max_grad_norm
        self.overlap = max_grad_norm is None
        self.accumulate = accumulate
        self.counters = OffloadCounters()
        self.device = device
        self._cuda = self.device.type == "cuda"
        self._stack = stack
        staged = self._cuda and accumulate > 1
        swaps = list(swaps) or [None] * len(offloaded)
        self.memory = HostMemory(pin=self._cuda)
        self._arena = HostArena(self.memory, [n for p, disk in zip(offloaded, swaps, strict=True)
                                              for n in host_sizes(p, staged, state=disk is None)])
        self._disks = list({id(disk): disk for disk in swaps if disk is not None}.values())
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        try:
            made = [self._take(p, disk, k, staged) for k, (p, disk) in enumerate(zip(offloaded, swaps, strict=True))]
        except BaseException:
            for disk in self._disks:
                disk.close()
            raise
        self._host: dict[nn.Parameter, _Host] = {}
        taken = {p: optimizer.state.pop(p) for p in offloaded if p in optimizer.state}
        self.state.update(optimizer.state)  # the resident parameters' state, as it is
        for p, (host, state) in zip(offloaded, made, strict=True):
            self._host[p] = host
            self.state[p] = state
            self._load_host(p, taken.get(p))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgpu-adamw")
        self._wide: Tensor | None = None  # the worker's widened gradient (_step_on_host)
        self._d2h = torch.cuda.Stream(self.device) if self._cuda else None
        self._h2d = torch.cuda.Stream(self.device) if self._cuda else None
        self._waits: list[tuple[Any, Any]] = []  # CUDA events around the compute stream's waits
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in offloaded]
        for p in offloaded:
            _OWNER[p] = self
        if stack is not None:
            stack.offloaded.update(offloaded)

    def _take(self, p: nn.Parameter, disk: DiskLevel | None, key: int, staged: bool) -> tuple[_Host, dict[str, Tensor]]:
        """``p``'s host side and AdamW state (uninitialized): master and moments from the host
        arena, or carved from a new swap file ``key`` of ``disk``; the buffers from the arena."""
        dtype = _master_dtype(p)
        if disk is None:
            master, exp_avg, exp_avg_sq = (self._arena.take(p.shape, dtype) for _ in range(3))
        else:
            flat = disk.store(key, swap_bytes(p))
            sizes = _state_sizes(p)
            starts = itertools.accumulate(map(host_aligned, sizes[:-1]), initial=0)
            master, exp_avg, exp_avg_sq = (flat[s:s + n].view(dtype).view(p.shape) for s, n in zip(starts, sizes, strict=True))
        host = _Host(master=master, transfer=self._arena.take(p.shape, p.dtype),
                     staged=self._arena.take(p.shape, p.dtype) if staged else None,
                     swap=None if disk is None else (disk, key))
        return host, {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    # ---- gradients off, steps on the host, weights back ---------------------------------------

    def _on_grad(self, p: nn.Parameter) -> None:
        """``p``'s gradient is final: copy it off (summed with those of earlier backwards since
        the last step), free it, and start its step in the ``accumulate``-th backward
        (overlapped)."""
        host = self._host[p]
        if host.future is not None:
            raise VBUnsupportedError(tr(
                f"VGPU 卸载的优化器: optimizer.step() 之前的第 {host.landed + 1} 次 backward，而主机步骤已开始；"
                "梯度累积请写 vb.offload_optimizer(model, optimizer, accumulate=每步的 backward 次数)",
                f"VGPU offloaded optimizer: backward {host.landed + 1} before optimizer.step(), after the host steps "
                "started; for gradient accumulation pass vb.offload_optimizer(model, optimizer, "
                "accumulate=backwards per step)"))
        grad = p.grad
        if self._cuda:
            first = not host.landed
            if not first and host.adding is not None:
                host.adding.result()  # the staging buffer is free again
            into = host.transfer if first else host.staged
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._d2h):
                into.copy_(grad, non_blocking=True)
                host.grad_ready = torch.cuda.Event()
                host.grad_ready.record()
            grad.record_stream(self._d2h)
            if not first:
                host.adding = self._pool.submit(self._add, host, host.grad_ready)
        elif host.landed:
            host.transfer.add_(grad)
        else:
            host.transfer.copy_(grad)
        self.counters.grad_bytes_off += grad.nbytes
        p.grad = None
        host.landed += 1
        if self.overlap and host.landed == self.accumulate:
            self._submit(p, host)

    @staticmethod
    def _add(host: _Host, ready: Any) -> None:
        """(Worker thread) sum a gradient that landed in the staging buffer."""
        ready.synchronize()
        host.transfer.add_(host.staged)

    def _settle(self, host: _Host) -> None:
        """Wait until the gradients that came off for ``host`` are summed in its transfer buffer."""
        if host.adding is not None:
            host.adding.result()
            host.adding = None
        if host.grad_ready is not None:
            host.grad_ready.synchronize()

    def _submit(self, p: nn.Parameter, host: _Host) -> None:
        host.hyper = _hyper(self._group_of[p])
        host.home = self._stack.home_view(p) if self._stack is not None else None
        if host.home is not None:
            self._stack.writing(p)
        host.future = self._pool.submit(self._host_step, p, host)

    def _host_step(self, p: nn.Parameter, host: _Host) -> None:
        """(Worker thread) AdamW on the host, then the new weight back into ``p`` (or into its
        home, for a streamed parameter). Runs after the sums of ``host``'s gradients (one
        worker, first in first out)."""
        start = time.perf_counter()
        _check_swap(host)
        if host.grad_ready is not None:
            host.grad_ready.synchronize()
        narrow = host.home if host.home is not None else host.transfer  # the new weight in p's dtype
        self._step_on_host(host, self.state[p], narrow)
        self.counters.host_step_s += time.perf_counter() - start
        if host.home is not None:
            self.counters.weight_bytes_home += host.home.nbytes
            return
        source = host.transfer if host.transfer.dtype != host.master.dtype else host.master
        with torch.no_grad():
            if self._cuda:
                with torch.cuda.device(self.device), torch.cuda.stream(self._h2d):
                    p.copy_(source, non_blocking=True)
                    host.back = torch.cuda.Event()
                    host.back.record()
            else:
                p.copy_(source)
        self.counters.weight_bytes_back += p.nbytes

    def _step_on_host(self, host: _Host, state: dict[str, Tensor], narrow: Tensor) -> None:
        """(Worker thread) AdamW on ``host``'s master with the gradient in its transfer buffer,
        and the new weight into ``narrow`` (the home, or the transfer buffer unless the master
        is already in p's dtype). A narrower gradient (bf16) is widened into one fp32 buffer
        the worker keeps (as large as the largest parameter so far; a fresh one per call would
        cost page faults; a working buffer, not counted in ``stats()["host_bytes"]``): faster
        than slicing it (``bench/cpu_adamw.py``, BENCHMARKS.md)."""
        master, grad = host.master, host.transfer
        if grad.dtype != master.dtype:
            if self._wide is None or self._wide.dtype != master.dtype or self._wide.numel() < master.numel():
                self._wide = None  # the smaller one goes before the larger one is taken
                self._wide = torch.empty(master.numel(), dtype=master.dtype)
            wide = self._wide[:master.numel()].view(master.shape)
            wide.copy_(grad)
            grad = wide
        _adamw([master], [grad], [state], host.hyper, fused=True)
        if host.home is not None or narrow.dtype != master.dtype:
            narrow.copy_(master)

    def _landed(self) -> list[tuple[nn.Parameter, _Host]]:
        return [(p, host) for p, host in self._host.items() if host.landed]

    def host_grad(self, p: nn.Parameter) -> Tensor | None:
        """Offloaded ``p``'s gradient summed on the host since the last ``step()``, while its
        step has not started (with ``max_grad_norm``, or before the ``accumulate``-th
        backward); None otherwise. Read it, do not keep it: the buffer is reused."""
        host = self._host[p]
        if not host.landed or host.future is not None:
            return None
        self._settle(host)
        return host.transfer

    def _clip(self, landed: list[tuple[nn.Parameter, _Host]]) -> None:
        """Scale every gradient as ``clip_grad_norm_(all parameters, max_grad_norm)`` would."""
        for _, host in landed:
            self._settle(host)
        grads = [self._host[p].transfer if p in self._host else p.grad for p in self._order
                 if (self._host[p].landed if p in self._host else p.grad is not None)]
        if grads:  # clip_grads_with_norm_'s arithmetic, on gradients that are no parameter's .grad
            total = torch.nn.utils.get_total_norm(grads)
            coef = torch.clamp(float(self.max_grad_norm) / (total + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(coef.to(grad.device))

    def _finish(self, landed: list[tuple[nn.Parameter, _Host]]) -> None:
        """Wait for the host steps of ``landed``, and make the compute stream wait for their
        copies (timed)."""
        start = time.perf_counter()
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        if stream is not None:
            arrived = torch.cuda.Event(enable_timing=True)
            arrived.record(stream)
        changed = None
        for p, host in landed:
            host.future.result()
            host.future = None
            host.landed = 0
            host.adding = None
            if stream is not None and host.home is None:
                stream.wait_event(host.back)
            if host.hyper != _hyper(self._group_of[p]):
                changed = (host.hyper, _hyper(self._group_of[p]))
        if stream is not None:
            resumed = torch.cuda.Event(enable_timing=True)
            resumed.record(stream)
            self._waits.append((arrived, resumed))
        else:
            self.counters.wait_s += time.perf_counter() - start
        if changed is not None:
            raise VBUnsupportedError(tr(
                f"VGPU 卸载的优化器: (lr, beta1, beta2, eps, weight_decay) 在 backward 与 optimizer.step() 之间被修改 "
                f"({changed[0]} → {changed[1]})；主机步骤已在 backward 中按旧值执行，请在 backward 之前设置 (学习率调度器即如此)",
                f"VGPU offloaded optimizer: (lr, beta1, beta2, eps, weight_decay) changed between backward and "
                f"optimizer.step() ({changed[0]} → {changed[1]}); the host steps already ran during backward with "
                "the old ones: set them before backward (as lr schedulers do)"))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Finish the host steps of the offloaded parameters (their weights are current on the
        device for the next forward) and step the others where they are, as ``AdamW``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        landed = self._landed()
        if not self.overlap:
            self._clip(landed)
        for p, host in landed:
            if host.future is None:  # clipped, or fewer backwards than ``accumulate``
                self._submit(p, host)
        self._finish(landed)
        if self._stack is not None and any(host.home is not None for _, host in landed):
            self._stack.written()
        self.counters.steps += 1
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            self._init_group(group, params, grads, [], [], [], [])
            if params:
                _adamw(params, grads, [self.state[p] for p in params], _hyper(group),
                       foreach=group["foreach"], fused=group["fused"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad`` for the parameters on their device; offloaded gradients
        have already left (their ``.grad`` is None). Between a backward and ``step()`` the
        gradients that came off are dropped, unless their steps already ran (overlapped)."""
        landed = self._landed()
        if any(host.future is not None for _, host in landed):
            raise VBUnsupportedError(tr(
                "VGPU 卸载的优化器: backward 之后、optimizer.step() 之前调用了 zero_grad()；主机步骤已在 backward 中执行，"
                "无法丢弃这些梯度",
                "VGPU offloaded optimizer: zero_grad() between backward and optimizer.step(); the host steps "
                "already ran during backward and these gradients cannot be dropped"))
        for _, host in landed:
            self._settle(host)
            host.landed = 0
        super().zero_grad(set_to_none)

    # ---- state ---------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Finish the pending host steps; check every swap file."""
        for host in self._host.values():
            if host.future is not None:
                host.future.result()
            _check_swap(host)

    def state_dict(self) -> dict[str, Any]:
        """``AdamW.state_dict()`` gathered from host RAM and swap files (pending host steps finished first);
        a parameter whose dtype is not its master's also saves its fp32 ``master``."""
        self._drain()
        out = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for p, host in self._host.items():
            if p.dtype != host.master.dtype:
                i = index[id(p)]
                out["state"][i] = {**out["state"][i], "master": host.master}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an ``AdamW`` state (this class's or a plain ``AdamW``'s): offloaded
        parameters' state is copied into their host tensors (or swap files), the others' moved to their
        device. A state without ``master`` takes it from the parameter as it is now (load
        the model's weights first)."""
        self._drain()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)):
            raise ValueError(tr("优化器状态的参数组与本优化器不符", "the optimizer state's parameter groups do not match this optimizer's"))
        saved_state = state_dict["state"]
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            for p, i in zip(group["params"], saved["params"], strict=True):
                if p in self._host:
                    self._load_host(p, saved_state.get(i))
                elif i in saved_state:
                    step_device = p.device if group["fused"] else torch.device("cpu")
                    self.state[p] = {k: v.to(step_device, copy=True) if k == "step" else v.to(p.device, p.dtype, copy=True)
                                     for k, v in saved_state[i].items()}
                else:
                    self.state.pop(p, None)
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _load_host(self, p: nn.Parameter, saved: dict[str, Tensor] | None) -> None:
        """``p``'s host state from ``saved`` (None: a fresh one), its master from ``saved``
        or from ``p``."""
        state = self.state[p]
        if saved is None:
            state["step"].zero_()
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        else:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                state[key].copy_(saved[key])
        self._host[p].master.copy_(saved["master"] if saved is not None and "master" in saved else p.detach())

    # ---- statistics ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The counters (CUDA waits folded in once the device passed them), the offloaded
        parameters' count and bytes on the device, the host bytes held and whether pinned,
        the bytes of the swap files holding masters and moments on the SSD."""
        if self._waits:
            torch.cuda.synchronize(self.device)
            self.counters.wait_s += sum(a.elapsed_time(r) for a, r in self._waits) / 1e3
            self._waits.clear()
        c = self.counters
        return {"params": len(self._host), "param_bytes": sum(p.nbytes for p in self._host),
                "host_bytes": self._arena.held_bytes, "disk_bytes": sum(d.counters.resident_bytes for d in self._disks),
                "pinned": self.memory.pin, "overlap": self.overlap,
                "accumulate": self.accumulate, "steps": c.steps, "grad_bytes_off": c.grad_bytes_off,
                "weight_bytes_back": c.weight_bytes_back, "weight_bytes_home": c.weight_bytes_home,
                "host_step_s": c.host_step_s, "wait_s": c.wait_s}

    def release(self) -> None:
        """Stop offloading: remove the hooks (pending steps finished first; a failure of theirs
        is ``step()``'s to report, e.g. a truncated swap file); the parameters keep their last
        weights and can be given to another optimizer."""
        wait([host.future for host in self._host.values() if host.future is not None])
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for p in self._host:
            _OWNER.pop(p, None)
        if self._stack is not None:
            self._stack.offloaded.difference_update(self._host)
        self._pool.shutdown()


def _check_swap(host: _Host) -> None:
    if host.swap is not None:
        host.swap[0].check(host.swap[1])


def _check(model: nn.Module, optimizer: torch.optim.Optimizer, offloaded: list[nn.Parameter],
           stack: VGPUStack | None, accumulate: int,
           levels: Sequence[LevelSpec]) -> tuple[torch.device, list[DiskLevel | None]]:
    """One-line errors for what is not supported or does not fit, before anything moves; the
    compute device of ``offloaded`` and where each one's master and moments live (None: host
    RAM, else the SSD level holding them: :func:`state_homes` over the stack's levels, or
    ``levels`` without a stack)."""
    if type(optimizer) is not torch.optim.AdamW:
        raise VBUnsupportedError(tr(
            f"VGPU 卸载优化器状态只支持 torch.optim.AdamW，收到 {type(optimizer).__module__}.{type(optimizer).__name__}",
            f"VGPU offloads the state of torch.optim.AdamW only; got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}"))
    for i, group in enumerate(optimizer.param_groups):
        for flag in UNSUPPORTED_FLAGS:
            if group.get(flag):
                raise VBUnsupportedError(tr(f"VGPU 卸载的 AdamW 不支持 {flag}=True (参数组 {i})",
                                            f"the VGPU offloaded AdamW does not support {flag}=True (param group {i})"))
    if not isinstance(accumulate, int) or accumulate < 1:
        raise VBConfigError(tr(f"VGPU 卸载的优化器: accumulate 须为正整数，收到 {accumulate!r}",
                               f"VGPU offloaded optimizer: accumulate must be a positive integer, got {accumulate!r}"))
    if not offloaded:
        raise VBConfigError(tr("VGPU: 没有要卸载的参数 (优化器中需要梯度的模型参数)",
                               "VGPU: no parameters to offload (model parameters in the optimizer that require grad)"))
    # a placed stack holds the whole model in Level 0, but streamed blocks show their home
    devices = {stack.device} if stack is not None else {p.device for p in offloaded}
    if len(devices) != 1:
        raise VBConfigError(tr(f"VGPU: 卸载的参数需在同一设备上，现在在 {sorted(map(str, devices))}",
                               f"VGPU: offloaded parameters must be on one device; they are on {sorted(map(str, devices))}"))
    taken = [p for p in offloaded if p in _OWNER]
    if taken:
        raise VBConfigError(tr("VGPU: 这些参数已由另一个卸载的优化器管理；先对它调用 release()",
                               "VGPU: these parameters are already offloaded by another optimizer; call its release() first"))
    device = devices.pop()
    staged = device.type == "cuda" and accumulate > 1
    specs = stack.specs if stack is not None else list(levels)
    held, staging = stack.held_bytes() if stack is not None else ([0] * len(specs), 0)
    homes = state_homes(offloaded, specs, held, staging, staged)
    need = sum(sum(host_sizes(p, staged, state=home is None)) for p, home in zip(offloaded, homes, strict=True))
    available, _ = host_memory_info()
    if need > available:
        raise VBConfigError(tr(f"VGPU 卸载的优化器需要 {human_bytes(need)} 主机内存，本机可用 {human_bytes(available)}",
                               f"the VGPU offloaded optimizer needs {human_bytes(need)} of host RAM; "
                               f"{human_bytes(available)} is available"))
    disks = {i: DiskLevel(i, specs[i], swap_dir(specs[i], sum(swap_bytes(p) for p, home in
                                                              zip(offloaded, homes, strict=True) if home == i)))
             for i in dict.fromkeys(home for home in homes if home is not None)}
    return device, [None if home is None else disks[home] for home in homes]


def offload_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                      params: Iterable[nn.Parameter] | None = None,
                      max_grad_norm: float | None = None, accumulate: int = 1,
                      levels: Sequence[LevelSpec] = ()) -> OffloadedAdamW:
    """Take over ``optimizer`` (a ``torch.optim.AdamW`` over ``model``'s parameters): the
    returned :class:`OffloadedAdamW` replaces it in the loop. ``params``: which to offload
    (default: every parameter of ``model`` in the optimizer that requires grad); the
    optimizer's state of those moves to the host. ``max_grad_norm``: clip all gradients to
    this norm in ``step()`` (what ``clip_grad_norm_`` on the device gradients would do; the
    offloaded ones are no longer there). ``accumulate``: backwards per ``step()`` (gradient
    accumulation). A model with a VGPU stack is placed now; the parameters it streams are
    trained through their home. Masters and moments that the host RAM levels cannot hold go
    to swap files on an SSD level of the stack's levels (or of ``levels``, for a model without
    a stack). One-line errors for what is not supported or does not fit."""
    stack = stack_of(model)
    if stack is not None:
        stack.place()
    in_optimizer = {p for g in optimizer.param_groups for p in g["params"]}
    chosen = set(params) if params is not None else None
    order = [p for p in model.parameters() if p in in_optimizer]
    offloaded = [p for p in order if p.requires_grad and (chosen is None or p in chosen)]
    device, swaps = _check(model, optimizer, offloaded, stack, accumulate, levels)
    return OffloadedAdamW(optimizer, offloaded, device, max_grad_norm, order, stack, accumulate, swaps)
