"""A world of ranks simulated in one process, for tests: the real data-parallel code runs once per rank, and its
all-reduces are answered from the other ranks' contributions.

:meth:`SimulatedWorld.run` calls ``fn(group)`` for every rank in turn, several times: a call's k-th all-reduce
returns the reduced value when every rank's k-th contribution is known from an earlier round, else it records the
rank's contribution and returns a placeholder (the rest of that round is discarded). A loss with K all-reduces
takes K + 1 rounds; the last round's results are the ranks' true ones. ``fn`` must therefore be deterministic (give
GCL an explicit seed) and may run its backward inside (only the last round's gradients count). An exception raised
after a placeholder was returned is ignored (that round is discarded); any other propagates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SimulatedWorld", "RankGroup"]

_REDUCE = {"sum": lambda ts: torch.stack(ts).sum(0), "max": lambda ts: torch.stack(ts).amax(0),
           "gather": torch.stack}


class RankGroup:
    """What a loss sees as its process group on one simulated rank (all-reduces and all-gathers)."""

    def __init__(self, rank: int, size: int, known: list[Tensor], pending: dict):
        self.rank, self.size = rank, size
        self._known, self._pending, self._calls = known, pending, 0
        self.placeholder_given = False  # this round is discarded (an error after it is the placeholder's doing)

    def simulated_rank_and_size(self) -> tuple[int, int]:
        return self.rank, self.size

    def simulated_all_gather(self, t: Tensor) -> Tensor:
        """The ranks' ``t`` stacked, (size, *t.shape) (a placeholder of that shape in a discarded round)."""
        return self.simulated_all_reduce(t, "gather")

    def simulated_all_reduce(self, t: Tensor, op: str) -> Tensor:
        k = self._calls
        self._calls += 1
        if k < len(self._known):
            value = self._known[k]
            if op == "gather":
                value = value[0]
            if value.shape != t.shape or value.dtype != t.dtype:
                raise RuntimeError(f"rank {self.rank}: collective #{k} of {tuple(t.shape)} {t.dtype} does not match "
                                   f"the other ranks' {tuple(value.shape)} {value.dtype}")
            return self._known[k].clone()
        if k == len(self._known):
            self._pending[self.rank] = (t.detach().clone(), op)
        self.placeholder_given = True
        placeholder = t.detach().clone()  # this round is discarded
        return placeholder.expand(self.size, *t.shape).clone() if op == "gather" else placeholder


class SimulatedWorld:
    """``size`` ranks in one process. ``run(fn)`` -> the list of ``fn(group)`` over the ranks (see the module)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self.all_reduces = 0  # collectives per rank of the last run

    def run(self, fn: Callable[[RankGroup], object], max_rounds: int = 16) -> list:
        known: list[Tensor] = []
        for _ in range(max_rounds):
            pending: dict = {}
            results = [self._call(fn, RankGroup(r, self.size, known, pending)) for r in range(self.size)]
            if not pending:
                self.all_reduces = len(known)
                return results
            if len(pending) != self.size:
                raise RuntimeError(f"all-reduce #{len(known)} reached by ranks {sorted(pending)} only, not by all "
                                   f"{self.size}")
            (_, op), *_ = pending.values()
            parts = [pending[r][0] for r in range(self.size)]
            if any(pending[r][1] != op for r in range(self.size)) or any(p.shape != parts[0].shape for p in parts):
                raise RuntimeError(f"all-reduce #{len(known)} differs between the ranks (op or shape)")
            known.append(_REDUCE[op](parts))
        raise RuntimeError(f"more than {max_rounds - 1} all-reduces")

    @staticmethod
    def _call(fn, group: RankGroup):
        try:
            return fn(group)
        except Exception:
            if group.placeholder_given:  # computed from a placeholder: the round is discarded anyway
                return None
            raise
