"""Who this process is among the data-parallel ranks, and the one seed they share: what the distributed samplers
(:class:`fastlt.data.ClassBalancedSampler`, :class:`fastlt.data.CBENSampler`) need, as torch's
``DistributedSampler`` does it."""

from __future__ import annotations

from numbers import Integral

import torch

from .._validation import is_int

__all__ = ["replicas", "shared_seed", "SEED_LIMIT"]

SEED_LIMIT = 2**63 - 2**20  # seed + epoch must stay an int64 for torch.Generator.manual_seed


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``: the given ones, else those of the initialised default process group, else
    ``(1, 0)``. Raises ``ValueError`` for a rank outside ``[0, num_replicas)``, or a ``num_replicas > 1`` without a
    rank when ``torch.distributed`` is not initialised."""
    dist = _distributed()
    for name, v in (("num_replicas", num_replicas), ("rank", rank)):
        if v is not None and not is_int(v):
            raise TypeError(f"{name} must be an int or None, got {type(v).__name__}")
    num_replicas, rank = (None if v is None else int(v) for v in (num_replicas, rank))
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist is not None else 1
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if rank is None:
        if dist is None and num_replicas > 1:
            raise ValueError(f"num_replicas={num_replicas} needs rank= when torch.distributed is not initialised")
        rank = dist.get_rank() if dist is not None else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


def shared_seed(seed: int | None, num_replicas: int) -> int | None:
    """The seed every rank draws its epochs from: ``seed`` itself (an int in [0, 2^63 - 2^20)); else, with several
    ranks, rank 0's draw from torch's generator, broadcast once (``broadcast_object_list``: any backend); else
    None (one process: its generator). Every rank draws (and drops all but rank 0's), so generators seeded alike
    stay in step: GCL's noise seeds, drawn from them, stay the same on every rank."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2^63 - 2^20), got {seed!r}")
        return int(seed)  # (a numpy int too)
    if num_replicas == 1:
        return None
    dist = _distributed()
    if dist is None:
        raise ValueError("num_replicas > 1 without torch.distributed needs seed= (the same int on every rank)")
    drawn = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # on every rank: their generators stay in step
    box = [drawn if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])
