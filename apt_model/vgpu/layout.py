"""Where a group of module tensors lives: their bytes as one flat buffer, and rebinding.

A :class:`Layout` covers the parameters and buffers of some modules (a transformer block, or
the resident rest of a model). Tensors that share storage (tied weights, the views a fused
FP4 group hands its members) share one *segment*; segments are laid end to end, each aligned
to :data:`ALIGN` bytes, in a flat ``uint8`` buffer of :attr:`Layout.nbytes`. Moving the group
between levels is then one contiguous copy, and :meth:`Layout.bind` points every tensor at
its bytes in any buffer, through the modules' own ``_apply`` (what ``.to()`` uses, so
modules that keep derived views, such as fused FP4 groups, relink them). Parameters stay the
same ``nn.Parameter`` objects; dtypes and bytes never change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from apt_model.errors import VBUnsupportedError
from apt_model.i18n import tr
from apt_model.storage import storage_key, tensors_nbytes

ALIGN = 256  # bytes; a multiple of every element size, and of the kernels' alignment needs

Base = tuple[Tensor, int]  # a uint8 buffer and the byte offset of a segment in it


@dataclass(frozen=True)
class Slot:
    """One tensor attribute: ``module._parameters[name]`` or ``module._buffers[name]``."""

    module: nn.Module
    is_param: bool
    name: str

    def get(self) -> Tensor | None:
        table = self.module._parameters if self.is_param else self.module._buffers
        return table.get(self.name)


def tensor_slots(modules: Iterable[nn.Module]) -> list[Slot]:
    """Every non-empty parameter and buffer attribute of ``modules`` (not recursing)."""
    out = []
    for module in modules:
        for name, t in module._parameters.items():
            if t is not None:
                out.append(Slot(module, True, name))
        for name, t in module._buffers.items():
            if t is not None:
                out.append(Slot(module, False, name))
    return out


@dataclass(frozen=True)
class _View:
    slot: Slot
    segment: int
    offset: int  # bytes from the segment's start
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bytes_of(t: Tensor) -> Tensor:
    """The whole storage behind ``t`` as a flat ``uint8`` tensor."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _view(base: Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
          stride: tuple[int, ...]) -> Tensor:
    """A ``dtype`` tensor over ``base`` (a flat ``uint8`` tensor) starting ``offset`` bytes in."""
    start = base.storage_offset() + offset
    return torch.empty(0, dtype=dtype, device=base.device).set_(
        base.untyped_storage(), start // dtype.itemsize, shape, stride)


class Layout:
    """The tensors of ``slots`` as aligned segments of one flat buffer (see the module doc).

    ``owners`` are the modules whose ``_apply`` rebinds them (each called without recursing).
    """

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = list(slots)
        owners: dict[int, nn.Module] = {}
        extents: dict[tuple[torch.device, int], list[int]] = {}
        for slot in self.slots:
            owners.setdefault(id(slot.module), slot.module)
            t = slot.get()
            start = t.storage_offset() * t.element_size()
            end = start + _span(t)
            lo_hi = extents.setdefault(storage_key(t), [start, end])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], start), max(lo_hi[1], end)
        self.owners = list(owners.values())
        index = {key: i for i, key in enumerate(extents)}
        lows = [lo - lo % ALIGN for lo, _ in extents.values()]
        self.segment_sizes = [hi - low for (_, hi), low in zip(extents.values(), lows, strict=True)]
        self.offsets = []
        total = 0
        for size in self.segment_sizes:
            self.offsets.append(total)
            total += _align(size)
        self.nbytes = total
        self.views: list[_View] = []
        for slot in self.slots:
            t = slot.get()
            i = index[storage_key(t)]
            self.views.append(_View(slot, i, t.storage_offset() * t.element_size() - lows[i], t.dtype,
                                    tuple(t.shape), tuple(t.stride())))
        self._first_view = {v.segment: v for v in reversed(self.views)}
        self._bound = [_where(slot.get()) for slot in self.slots]

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data (the segments without their alignment padding)."""
        return sum(self.segment_sizes)

    def storage_bytes(self) -> int:
        """Bytes of the storages its tensors are bound to now, each storage counted once."""
        return tensors_nbytes(slot.get() for slot in self.slots)

    def segment(self, i: int) -> Tensor:
        """Segment ``i``'s bytes where its tensors are bound now, as a flat ``uint8`` tensor."""
        view = self._first_view[i]
        t = view.slot.get()
        start = t.storage_offset() * t.element_size() - view.offset
        return _bytes_of(t)[start:start + self.segment_sizes[i]]

    def gather(self, flat: Tensor, non_blocking: bool = False) -> None:
        """Copy every segment from where it is bound now into ``flat`` (this layout's buffer)."""
        for i, size in enumerate(self.segment_sizes):
            flat[self.offsets[i]:self.offsets[i] + size].copy_(self.segment(i), non_blocking=non_blocking)

    def view_in(self, flat: Tensor, k: int) -> Tensor:
        """Tensor ``k`` (of ``slots``) as it lies in ``flat`` (a buffer laid out by this layout):
        a new tensor over those bytes, whatever the tensor itself is bound to now."""
        v = self.views[k]
        return _view(flat, self.offsets[v.segment] + v.offset, v.dtype, v.shape, v.stride)

    def bind_flat(self, flat: Tensor) -> None:
        """Point every tensor at its bytes in ``flat`` (a buffer laid out by this layout)."""
        self.bind([(flat, offset) for offset in self.offsets])

    def materialize(self, device: torch.device) -> None:
        """Give every segment storage of its own on ``device``, copied from where it is now
        (as a plain model holds its tensors)."""
        bases = []
        for i, size in enumerate(self.segment_sizes):
            own = torch.empty(size, dtype=torch.uint8, device=device)
            own.copy_(self.segment(i))
            bases.append((own, 0))
        self.bind(bases)

    def bind(self, bases: Sequence[Base]) -> None:
        """Point every tensor at segment ``i``'s bytes in ``bases[i]`` (buffer, byte offset)."""
        # keyed by id, holding the tensor itself: a tensor freed during the walk cannot lend
        # its id to another one (FP4Linear's _apply passes a fresh probe tensor through fn)
        targets: dict[int, tuple[Tensor, Tensor]] = {}
        for v in self.views:
            base, offset = bases[v.segment]
            t = v.slot.get()
            targets[id(t)] = (t, _view(base, offset + v.offset, v.dtype, v.shape, v.stride))

        def fn(t: Tensor) -> Tensor:
            old, new = targets.get(id(t), (None, t))
            return new if old is t else t

        with torch.no_grad():
            for module in self.owners:
                module._apply(fn, recurse=False)
        self._bound = [_where(slot.get()) for slot in self.slots]

    def check_bound(self, what: str) -> None:
        """Fail clearly if a tensor was moved or replaced since the last ``bind`` (``.to()``,
        ``load_state_dict(assign=True)``...): the stack would no longer know where it is."""
        for slot, where in zip(self.slots, self._bound, strict=True):
            t = slot.get()
            if t is None or _where(t) != where:
                raise VBUnsupportedError(tr(
                    f"{what} 的张量 '{slot.name}' 在VGPU放置后被移动或替换 (如 .to() 或 load_state_dict(assign=True))；"
                    "请先 vb.restore(model)",
                    f"tensor '{slot.name}' of {what} was moved or replaced after VGPU placement (e.g. by "
                    ".to() or load_state_dict(assign=True)); call vb.restore(model) first"))


def _where(t: Tensor) -> tuple[tuple[torch.device, int], int]:
    """Where ``t``'s data is: its storage and offset (no data pointer: fake tensors have none)."""
    return storage_key(t), t.storage_offset()


def _span(t: Tensor) -> int:
    """Bytes from ``t``'s first element to just past its last (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()
