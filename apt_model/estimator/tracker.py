"""Live-storage accounting through a ``TorchDispatchMode``.

Every tensor an operator returns is looked at once: a storage not seen before counts its
bytes from then on, and stops counting when the storage itself is freed (a weak reference
to the storage object, whose callback runs when the last tensor or view holding it goes).
The peak is the largest sum of live bytes. The same tracker runs on real tensors and on
fake ones, so a traced step and a real CPU step are counted by one rule.

What it cannot see: memory a kernel allocates and frees inside itself (workspaces), and
allocator caching; both are below the dispatcher. An allocator's rounding it can count: with
``block_bytes`` (:func:`cuda_block_bytes` for a CUDA target) each storage counts the block the
allocator would give it, as ``torch.cuda.max_memory_allocated`` counts it.

Gradient accumulation in backward: autograd sums two gradients of one tensor in place into
the first when it holds the last reference to it, but not for a tensor subclass (the fake
tensors of a trace) nor while a dispatch mode (this tracker) is active: those get ``a + b``.
So an ``add`` in backward (grad mode off) of two like tensors counts its result only after
the frees that follow it: when the first operand goes at once (the engine's buffer let it
go), the sum takes its place, as the in-place add of a run without the tracker would;
otherwise it counts as the new tensor it is.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 1 << 20


def cuda_block_bytes(nbytes: int) -> int:
    """The bytes PyTorch's CUDA caching allocator (default settings) counts as allocated for a
    request of ``nbytes`` served from a fresh segment: rounded up to 512 bytes; a request of 10
    MiB or more gets a segment rounded up to 2 MiB, split off only when more than 1 MiB would
    be left (so an 11 MiB tensor counts 12 MiB). Reused cached blocks can differ."""
    if nbytes == 0:
        return 0
    rounded = max(512, -(-nbytes // 512) * 512)
    if rounded < 10 * MIB:
        return rounded
    segment = -(-rounded // (2 * MIB)) * (2 * MIB)
    return segment if segment - rounded <= MIB else rounded


class MemoryTracker(TorchDispatchMode):
    """Counts live storage bytes; ``peak`` and ``snapshot_at_peak`` cover the time since the
    last ``reset_peak``, ``phase_peak(name)`` each phase set by ``phase``.

    Storages are named by a serial number given when first seen, never reused, so a
    snapshot taken at a peak can be classified later (``serial_of``) without confusing a
    freed storage with a newer one at the same address.
    """

    def __init__(self, block_bytes: Callable[[int], int] | None = None) -> None:
        """``block_bytes``: what a storage of n bytes counts (the allocator's block; n when None)."""
        super().__init__()
        self._block_bytes = block_bytes
        self._live: dict[int, tuple[int, int]] = {}  # storage address -> (serial, bytes)
        self._refs: dict[int, weakref.ref] = {}
        self._serial = 0
        self.current = 0
        self.peak = 0
        self.snapshot_at_peak: dict[int, int] = {}  # serial -> bytes, live at ``peak``
        self._phase = ""
        self._phase_peaks: dict[str, tuple[int, dict[int, int]]] = {}
        self._stale = False  # a new peak whose snapshot is not taken yet
        self._sum: weakref.ref | None = None  # an accumulated gradient's storage, counted at _settle
        self._site_of: dict[int, str] = {}  # serial -> where it was allocated (``site``)
        self.sites: list[str] = []  # the labels open now (innermost last), e.g. a block's

    # ---- counting -----------------------------------------------------------------------------

    def add(self, tensors: Iterable[Any]) -> None:
        """Count the storages of the tensors among ``tensors`` (others are ignored)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._add_storage(tensor.untyped_storage())

    def _add_storage(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._live:
            return
        self._serial += 1
        self._site_of[self._serial] = self.sites[-1] if self.sites else self._phase
        nbytes = storage.nbytes() if self._block_bytes is None else self._block_bytes(storage.nbytes())
        self._live[key] = (self._serial, nbytes)
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._stale = True
        phase_peak = self._phase_peaks.get(self._phase)
        if phase_peak is not None and self.current > phase_peak[0]:
            self._phase_peaks[self._phase] = (self.current, {})
            self._stale = True

    def _free(self, key: int) -> None:
        if self._stale:  # going down from a peak: take its snapshot now
            self._take_snapshots()
        _serial, nbytes = self._live.pop(key)
        del self._refs[key]
        self.current -= nbytes

    def _take_snapshots(self) -> None:
        live = dict(self._live.values())
        if self.current == self.peak:
            self.snapshot_at_peak = live
        phase_peak = self._phase_peaks.get(self._phase)
        if phase_peak is not None and phase_peak[0] == self.current:
            self._phase_peaks[self._phase] = (self.current, live)
        self._stale = False

    # ---- phases and queries -------------------------------------------------------------------

    def phase(self, name: str) -> None:
        """Start phase ``name``: later allocations count toward its own peak too."""
        self._settle()
        if self._stale:
            self._take_snapshots()
        self._phase = name
        self._phase_peaks[name] = (self.current, dict(self._live.values()))

    def reset_peak(self) -> None:
        """Forget the peaks so far: the peak starts again from the bytes live now."""
        self._settle()
        self.peak = self.current
        self.snapshot_at_peak = dict(self._live.values())
        self._phase_peaks.clear()
        self._stale = False

    def finish(self) -> None:
        """Take the snapshot of a peak still in progress (call before reading the snapshots)."""
        self._settle()
        if self._stale:
            self._take_snapshots()

    def phase_peak(self, name: str) -> tuple[int, dict[int, int]]:
        """``(peak bytes, serial -> bytes live then)`` of phase ``name`` ((0, {}) if it never ran)."""
        return self._phase_peaks.get(name, (0, {}))

    def serial_of(self, tensor: torch.Tensor) -> int | None:
        """The serial of ``tensor``'s storage, None when it is not counted."""
        self._settle()
        entry = self._live.get(tensor.untyped_storage()._cdata)
        return None if entry is None else entry[0]

    def site_of(self, serial: int) -> str:
        """Where storage ``serial`` was allocated: the innermost of ``sites`` open then, else
        the phase ("" before the first)."""
        return self._site_of.get(serial, "")

    def live_serials(self) -> dict[int, int]:
        """serial -> bytes of every storage live now."""
        self._settle()
        return dict(self._live.values())

    def _settle(self) -> None:
        """Count the accumulated gradient held back by ``__torch_dispatch__`` (if still alive)."""
        if self._sum is not None:
            storage, self._sum = self._sum(), None
            if storage is not None:
                self._add_storage(storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._settle()
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.add.Tensor and not kwargs and _accumulates(args, out):
            self._sum = weakref.ref(out.untyped_storage())
            return out
        self.add(tree_leaves(out))
        return out


def _accumulates(args: tuple[Any, ...], out: Any) -> bool:
    """Whether ``out = args[0] + args[1]`` may be autograd summing two gradients of one tensor
    in backward, which it does in place into ``args[0]`` in a run without the tracker."""
    if len(args) != 2 or torch.is_grad_enabled() or torch._C._current_graph_task_id() == -1:
        return False
    first, second = args
    return (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and isinstance(out, torch.Tensor)
            and first.shape == second.shape == out.shape and first.dtype == out.dtype
            and first.is_contiguous() and first.untyped_storage().nbytes() == out.untyped_storage().nbytes())
