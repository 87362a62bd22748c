"""The DTensor adapter of class parallelism: logits that are a ``DTensor`` sharded on the classes, ``Shard(-1)`` on a
1-D device mesh, go to the ``shard=`` path (:mod:`fastlt.distributed.class_parallel`) with the shard read off the
DTensor (``torch.chunk``'s layout: :meth:`fastlt.distributed.ClassShard.chunked`). Not ``loss_parallel``, which is
cross-entropy only. The loss comes back a plain replicated tensor; the gradient reaches the DTensor's local columns
through ``to_local`` (a ``Shard(-1)`` gradient, no collective).
"""

from __future__ import annotations

from torch import Tensor

from .class_shard import ClassShard, chunked_bounds

__all__ = ["is_dtensor", "from_dtensor"]


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (no import of torch.distributed for a plain
    tensor)."""
    if type(x) is Tensor or not isinstance(x, Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(x, DTensor)


def _class_sharded(name: str, x) -> tuple:
    from torch.distributed.tensor import Shard

    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{name} must be a DTensor on a 1-D device mesh (the class shards), got a {mesh.ndim}-D mesh")
    (placement,) = x.placements
    if not isinstance(placement, Shard) or placement.dim not in (-1, x.dim() - 1):
        raise ValueError(f"{name} must be a DTensor sharded on its last (class) dimension, Shard(-1), got "
                         f"placements {tuple(x.placements)}")
    return mesh


def from_dtensor(logits, target) -> tuple[Tensor, Tensor, ClassShard]:
    """``(local_logits, target, shard)`` of class-sharded DTensor ``logits`` (N, C): the rank's (N, shard.size)
    columns (differentiable), the targets as a plain tensor (a replicated DTensor's local value, or the tensor
    given, the same on every rank), and the :class:`ClassShard` (torch.chunk's layout over the mesh's group)."""
    if logits.dim() != 2:
        raise ValueError(f"class-sharded DTensor logits must be (N, C), got shape {tuple(logits.shape)}")
    mesh = _class_sharded("logits", logits)
    if is_dtensor(target):
        from torch.distributed.tensor import Replicate

        if any(not isinstance(p, Replicate) for p in target.placements):
            raise ValueError(f"a DTensor target must be replicated, got placements {tuple(target.placements)}")
        target = target.to_local()
    C = logits.shape[1]
    rank, world = mesh.get_local_rank(), mesh.size()
    start, stop = chunked_bounds(C, world)[rank]
    local = logits.to_local()
    if local.shape[1] != stop - start:  # a layout other than torch.chunk's (not made by DTensor's own ops)
        raise ValueError(f"rank {rank} holds {local.shape[1]} of the DTensor's {C} classes, not torch.chunk's "
                         f"{stop - start}")
    return local, target, ClassShard(start, stop, C, mesh.get_group())
