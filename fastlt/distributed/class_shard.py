"""Which classes a rank holds under class parallelism: :class:`ClassShard` (docs/design.md, "Scaling past one GPU").

A shard is a contiguous range ``[start, stop)`` of the ``num_classes`` global classes, on each rank of ``group``
(a ``torch.distributed`` process group, or a simulated one). The balanced default gives every rank
``ceil(C / 8 / W)`` or one fewer blocks of 8 classes (the Philox group of GCL's noise, so every shard starts on a
multiple of 8; trailing ranks may hold fewer classes, or none); :meth:`ClassShard.chunked` is ``torch.chunk``'s
(and DTensor ``Shard``'s) layout; any explicit range works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._validation import is_int
from .collectives import rank_and_size

__all__ = ["ClassShard", "balanced_bounds", "chunked_bounds", "COMBINES"]

COMBINES = ("all_reduce", "gather")


def _int(name: str, value, low: int) -> int:
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def balanced_bounds(num_classes: int, world: int, align: int = 8) -> list[tuple[int, int]]:
    """``[(start, stop)]`` per rank: blocks of ``align`` classes dealt out evenly, the first ranks taking one more
    block when they do not divide (the last block may be short; trailing shards may be empty)."""
    _int("num_classes", num_classes, 0)
    _int("world", world, 1)
    _int("align", align, 1)
    blocks = -(-num_classes // align)
    per, extra = divmod(blocks, world)
    bounds, start = [], 0
    for r in range(world):
        stop = min(num_classes, start + (per + (r < extra)) * align)
        bounds.append((start, stop))
        start = stop
    return bounds


def chunked_bounds(num_classes: int, world: int) -> list[tuple[int, int]]:
    """``torch.chunk``'s layout (DTensor ``Shard``): ``ceil(C / W)`` classes per rank, the last ones fewer or none."""
    _int("num_classes", num_classes, 0)
    _int("world", world, 1)
    size = -(-num_classes // world)
    return [(min(num_classes, r * size), min(num_classes, (r + 1) * size)) for r in range(world)]


@dataclass(frozen=True)
class ClassShard:
    """This rank's classes ``[start, stop)`` of ``num_classes``, on the process group ``group`` whose ranks together
    hold every class once (contiguous, in rank order). Build it with :meth:`balanced` or :meth:`chunked`, or give
    the range (the caller's own layout: the ranks' ranges must tile ``[0, num_classes)``; not checked, which would
    cost a collective).

    ``combine``: how the ranks' row partials meet. 'all_reduce' (default): one MAX of N and one SUM of 3N floats.
    'gather': one all-gather of every rank's 5N floats, combined in rank order on every rank, so the loss is the
    same bits on every rank whatever order the collective reduces in (W times the bytes received)."""

    start: int
    stop: int
    num_classes: int
    group: Any
    combine: str = "all_reduce"

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        _int("num_classes", self.num_classes, 1)
        _int("start", self.start, 0)
        _int("stop", self.stop, self.start)
        if self.stop > self.num_classes:
            raise ValueError(f"stop must be <= num_classes = {self.num_classes}, got {self.stop}")
        if self.group is None:
            raise ValueError("group must be a process group (torch.distributed) over the class shards")

    @property
    def size(self) -> int:
        """The number of classes this rank holds (its logits' width)."""
        return self.stop - self.start

    @classmethod
    def balanced(cls, num_classes: int, group, align: int = 8, *, combine: str = "all_reduce") -> ClassShard:
        """The balanced split of :func:`balanced_bounds` for this rank of ``group``."""
        rank, world = rank_and_size(group)
        start, stop = balanced_bounds(num_classes, world, align)[rank]
        return cls(start, stop, num_classes, group, combine)

    @classmethod
    def chunked(cls, num_classes: int, group, *, combine: str = "all_reduce") -> ClassShard:
        """``torch.chunk``'s split (:func:`chunked_bounds`), the layout of a DTensor sharded on the classes."""
        rank, world = rank_and_size(group)
        start, stop = chunked_bounds(num_classes, world)[rank]
        return cls(start, stop, num_classes, group, combine)

    def __repr__(self) -> str:
        extra = "" if self.combine == "all_reduce" else f", combine={self.combine!r}"
        return f"ClassShard(start={self.start}, stop={self.stop}, num_classes={self.num_classes}{extra})"
