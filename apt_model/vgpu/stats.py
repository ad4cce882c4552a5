"""The VGPU stack's counters: bytes held and moved per level, and Level 0's accesses.

Every figure counts a real event: an allocation or file the stack holds, a copy it issued
(timed by the clock on the CPU, by CUDA events on a GPU, read once the device has passed
them), a block use. A Level 0 *hit* is a use of a block whose data was already in Level 0
when the compute reached it; on CUDA that is decided on the device's clock (the copy's end
event before the compute stream's arrival), and the *stall* is the time the compute stream
then waited for the copy. On the CPU copies run synchronously, so their whole time is stall.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class LevelCounters:
    """One level: its budget, the bytes it holds now and at most, and bytes moved in and out.

    ``transfer_bytes`` / ``transfer_s`` time the level's streaming link: copies into Level 0,
    reads out of a lower level; ``achieved_gbps`` compares them with ``speed_gbps``.
    """

    index: int
    device: str
    capacity_bytes: int
    speed_gbps: float
    resident_bytes: int = 0
    peak_bytes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    transfer_bytes: int = 0
    transfer_s: float = 0.0

    def hold(self, nbytes: int) -> None:
        self.resident_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def release(self, nbytes: int) -> None:
        self.resident_bytes -= nbytes

    def timed(self, nbytes: int, seconds: float) -> None:
        self.transfer_bytes += nbytes
        self.transfer_s += seconds

    @property
    def achieved_gbps(self) -> float | None:
        return self.transfer_bytes / self.transfer_s / 1e9 if self.transfer_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.index, "device": self.device, "capacity_bytes": self.capacity_bytes,
            "resident_bytes": self.resident_bytes, "peak_bytes": self.peak_bytes,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "speed_gbps": self.speed_gbps, "achieved_gbps": self.achieved_gbps,
        }


@dataclass
class AccessCounters:
    """Level 0's block uses and the copies that served them."""

    hits: int = 0
    misses: int = 0
    promotions: int = 0  # blocks copied into Level 0 (prefetched or on demand)
    prefetches: int = 0  # of which ahead of use
    demotions: int = 0  # blocks whose Level 0 copy was overwritten by another block's
    stall_s: float = 0.0

    @property
    def hit_rate(self) -> float | None:
        uses = self.hits + self.misses
        return self.hits / uses if uses else None

    def to_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "promotions": self.promotions, "prefetches": self.prefetches,
                "demotions": self.demotions, "stall_s": self.stall_s}


class DeviceTimings:
    """CUDA events recorded by the stack, turned into counters once the device passed them."""

    def __init__(self, access: AccessCounters) -> None:
        self.access = access
        self._copies: deque[tuple[tuple[LevelCounters, ...], int, Any, Any]] = deque()
        self._uses: deque[tuple[Any, Any, Any, bool]] = deque()

    def copy(self, levels: tuple[LevelCounters, ...], nbytes: int, start: Any, end: Any) -> None:
        """A copy of ``nbytes`` over the link of ``levels`` between events ``start`` and ``end``."""
        self._copies.append((levels, nbytes, start, end))

    def use(self, ready: Any, arrived: Any, resumed: Any, demand: bool) -> None:
        """A use: the copy's end event ``ready``, the compute stream's events before and after
        it waited; ``demand``: fetched at the use (a miss whatever the clock says)."""
        self._uses.append((ready, arrived, resumed, demand))

    def poll(self, wait: bool) -> None:
        """Fold in the events the device has passed (all of them, waiting, if ``wait``)."""
        while self._copies and (wait or self._copies[0][3].query()):
            levels, nbytes, start, end = self._copies.popleft()
            end.synchronize()
            for level in levels:
                level.timed(nbytes, start.elapsed_time(end) / 1e3)
        while self._uses and (wait or self._uses[0][2].query()):
            ready, arrived, resumed, demand = self._uses.popleft()
            resumed.synchronize()
            if not demand and ready.elapsed_time(arrived) >= 0:
                self.access.hits += 1
            else:
                self.access.misses += 1
            self.access.stall_s += max(0.0, arrived.elapsed_time(resumed)) / 1e3
