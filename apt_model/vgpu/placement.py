"""The plan: which blocks stay in Level 0, which stream from which lower level, and how many
Level 0 slots the streamed ones share.

Level 0 holds the resident rest of the model (embeddings, norms, head), the resident blocks
and ``depth + 1`` slots the size of the largest streamed block: one for the block that runs,
``depth`` for blocks fetched ahead. Every block is used once per forward, so none is worth
more than another: the plan keeps as many blocks resident as fit beside the slots (the first
ones in execution order), with the deepest prefetch it can have (the automatic depth tries
:data:`AUTO_DEPTHS` in turn), and gives each streamed block the first lower level with room.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apt_model.errors import VBConfigError
from apt_model.i18n import tr
from apt_model.storage import human_bytes

AUTO_DEPTHS = (2, 1, 0)


@dataclass(frozen=True)
class Plan:
    """Where each block lives: ``homes[i]`` is block ``i``'s level (0: resident)."""

    homes: tuple[int, ...]
    depth: int
    slots: int
    slot_bytes: int
    level_bytes: tuple[int, ...]
    """Bytes each level holds under the plan (Level 0: rest, resident blocks and slots)."""

    @property
    def streamed(self) -> list[int]:
        return [i for i, home in enumerate(self.homes) if home > 0]


def _fill(sizes: Sequence[int], capacities: Sequence[int]) -> tuple[list[int], int]:
    """Each size's level (1-based below Level 0), first fit in level order, and the bytes
    missing for the first size that fits nowhere (0 when all fit)."""
    room = list(capacities)
    homes = []
    for size in sizes:
        level = next((j for j, free in enumerate(room) if free >= size), None)
        if level is None:
            return homes, size - max(room, default=0)
        room[level] -= size
        homes.append(level + 1)
    return homes, 0


def make_plan(block_bytes: Sequence[int], rest_bytes: int, capacities: Sequence[int],
              depth: int | None = None) -> Plan:
    """The plan for blocks of ``block_bytes`` (in execution order) beside ``rest_bytes`` of
    resident tensors, over levels of ``capacities`` bytes (Level 0 first); ``depth`` None:
    automatic. Raises ``VBConfigError`` naming the shortfall when nothing fits."""
    n = len(block_bytes)
    lower = capacities[1:]
    shortfall: tuple[str, str] | None = None
    for d in AUTO_DEPTHS if depth is None else (depth,):
        for resident in range(n, -1, -1):
            streamed = block_bytes[resident:]
            slots = min(d + 1, len(streamed))
            slot_bytes = max(streamed, default=0)
            level0 = rest_bytes + sum(block_bytes[:resident]) + slots * slot_bytes
            if level0 > capacities[0]:
                continue
            homes, missing = _fill(streamed, lower)
            if missing:
                need, have = sum(streamed), sum(lower)
                gap = max(need - have, missing)
                shortfall = (
                    f"VGPU 计划需在下层级放置 {human_bytes(need)} (最大块 {human_bytes(max(streamed))})，"
                    f"下层级共 {human_bytes(have)}: 缺 {human_bytes(gap)}",
                    f"the VGPU plan must place {human_bytes(need)} below Level 0 (largest block "
                    f"{human_bytes(max(streamed))}) but levels 1+ hold {human_bytes(have)}: short by "
                    f"{human_bytes(gap)}")
                break  # fewer resident blocks only needs more room below
            held = [level0] + [sum(s for s, h in zip(streamed, homes, strict=True) if h == j)
                               for j in range(1, len(capacities))]
            return Plan(homes=(0,) * resident + tuple(homes), depth=d if streamed else 0,
                        slots=slots, slot_bytes=slot_bytes, level_bytes=tuple(held))
    if shortfall is None:  # not even the rest and the fewest slots fit in Level 0
        fewest = min(AUTO_DEPTHS if depth is None else (depth,)) + 1
        need = rest_bytes + min(fewest, n) * max(block_bytes, default=0)
        shortfall = (
            f"VGPU Level 0 ({human_bytes(capacities[0])}) 放不下常驻部分 ({human_bytes(rest_bytes)}) "
            f"加块槽位: 缺 {human_bytes(need - capacities[0])}",
            f"VGPU Level 0 ({human_bytes(capacities[0])}) cannot hold the resident part "
            f"({human_bytes(rest_bytes)}) plus the block slots: short by {human_bytes(need - capacities[0])}")
    raise VBConfigError(tr(*shortfall))
