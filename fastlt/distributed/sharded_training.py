"""Training with class-sharded heads (:mod:`fastlt.distributed.sharded_heads`): what DDP, gradient clipping,
checkpoints and inference need to know about parameters that differ from rank to rank.

- DDP must not average a sharded head's parameters (each rank holds other classes): :func:`exclude_from_ddp`
  before wrapping; a sharded head raises in its forward when DDP manages its parameters (:func:`check_outside_ddp`).
  With FSDP, wrap the backbone only and keep the head beside it.
- :func:`clip_grad_norm_`: the global norm of replicated and sharded gradients (one SUM all-reduce of a float).
- Mixed precision: ``torch.amp.GradScaler`` decides on each rank from that rank's gradients, so ranks could step
  differently; use ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler(process_group=shard.group)``,
  which all-reduces the inf check over the group (a plain scaler with bf16 autocast needs no scaling at all).
- :func:`gather_full_weight`: the (C, D) weight (and bias) on every rank, for export and checkpoints.
- :func:`sharded_topk`: the top k over every class.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .class_parallel import check_shard_options, check_shard_target
from .class_shard import ClassShard
from .collectives import all_gather, all_reduce, rank_and_size

__all__ = ["check_head_shard", "check_outside_ddp", "exclude_from_ddp", "clip_grad_norm_", "gather_full_weight",
           "sharded_topk"]


def check_head_shard(shard, num_classes: int, dp_group) -> None:
    """A head's ``shard``: a :class:`ClassShard` over ``num_classes``, not with ``dp_group``."""
    check_shard_target(shard, None)
    if shard.num_classes != num_classes:
        raise ValueError(f"the shard describes {shard.num_classes} classes but num_classes = {num_classes}")
    check_shard_options(dp_group)


def _sharded_heads(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "shard", None), ClassShard)]


def exclude_from_ddp(model: nn.Module) -> list[str]:
    """Mark the parameters and buffers of every class-sharded module of ``model`` (a fastlt head with ``shard=``)
    for ``DistributedDataParallel`` to leave alone (neither broadcast at wrapping nor averaged); call it before
    ``DistributedDataParallel(model)``. Returns the names marked."""
    names = [f"{prefix}.{n}" if prefix else n for prefix, m in _sharded_heads(model)
             for n, _ in list(m.named_parameters()) + list(m.named_buffers())]
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(set(names) | set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))))
    return names


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DDP wrapper -> the heads found outside it


def check_outside_ddp(module: nn.Module) -> None:
    """Raise when the ``DistributedDataParallel`` whose forward is running manages a parameter of ``module`` (a
    class-sharded head: DDP would average different classes' rows; checked once per DDP wrapper, the set of the
    parameters it manages being fixed when it wraps), or when FSDP has taken its parameters (FSDP's flattened
    views, or FSDP2's / tensor parallel's DTensors)."""
    if torch.compiler.is_compiling():
        return
    from .dtensor import is_dtensor

    for name, p in module.named_parameters():
        if getattr(p, "_fsdp_flattened", False) or is_dtensor(p):
            raise ValueError(f"a class-sharded head's parameter {name!r} is managed by FSDP (or is a DTensor): each "
                             "rank's rows are other classes; wrap the backbone only and keep the head beside it")
    from torch.nn.parallel import DistributedDataParallel

    active = getattr(DistributedDataParallel, "_active_ddp_module", None)
    if active is None or module in _CHECKED.get(active, ()):  # checked at this DDP's first step
        return
    managed = {id(p) for p in getattr(active, "_module_parameters", ())}
    if any(id(p) in managed for p in module.parameters()):
        raise ValueError("a class-sharded head's parameters are inside DistributedDataParallel, which would average "
                         "the rows of different classes: call fastlt.distributed.exclude_from_ddp(model) before "
                         "wrapping, or keep the head outside DDP")
    _CHECKED.setdefault(active, weakref.WeakSet()).add(module)


def clip_grad_norm_(replicated: Iterable[Tensor], sharded: Iterable[Tensor], max_norm: float, group,
                    norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a model whose ``sharded`` parameters differ between the ranks of
    ``group`` (a sharded head's) and whose ``replicated`` ones are the same (after DDP's averaging): the norm of
    all of them together, the same on every rank (one all-reduce: SUM of the shards' squares, MAX for
    ``norm_type=inf``). Scales the gradients in place by ``min(1, max_norm / (norm + 1e-6))``; returns the norm
    (fp32)."""
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
    rep = [p.grad for p in replicated if p.grad is not None]
    sh = [p.grad for p in sharded if p.grad is not None]
    dev = (rep + sh)[0].device if rep + sh else torch.device("cpu")
    inf = norm_type == math.inf

    def part(grads):
        """Over ``grads``: the largest |g| (inf) or the sum of squares, in fp32; 0 for none."""
        each = [g.detach().float() for g in grads if g.numel()]
        if not each:
            return torch.zeros((), device=dev)
        if inf:
            return torch.stack([g.abs().amax() for g in each]).amax()
        return torch.stack([g.square().sum() for g in each]).sum()

    if inf:
        total = torch.maximum(all_reduce(part(sh), "max", group), part(rep))
    else:
        total = (all_reduce(part(sh), "sum", group) + part(rep)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in rep + sh:
        g.mul_(coef.to(g.dtype))
    return total


def gather_full_weight(head: nn.Module) -> dict[str, Tensor]:
    """The full parameters of a class-sharded head (``weight`` (C, D), ``bias`` (C,) when it has one) on every rank
    of its shard's group, in class order: a state dict for export or a checkpoint, loadable into the same head
    built without ``shard=``. One all-gather of the shard sizes and one of the rows (padded to the largest shard);
    synchronises with the host (not for the training step)."""
    shard = getattr(head, "shard", None)
    if not isinstance(shard, ClassShard):
        raise ValueError("gather_full_weight takes a head built with shard=")
    sizes = all_gather(torch.tensor([shard.size], device=head.weight.device), shard.group).reshape(-1).tolist()
    out = {}
    for name in ("weight", "bias"):
        local = getattr(head, name, None)
        if local is None:
            continue
        pad = local.new_zeros((max(sizes), *local.shape[1:]))
        pad[:shard.size] = local.detach()
        every = all_gather(pad, shard.group)
        out[name] = torch.cat([every[r, :n] for r, n in enumerate(sizes)])
    if out["weight"].shape[0] != shard.num_classes:
        raise ValueError(f"the shards of the group hold {out['weight'].shape[0]} rows, not {shard.num_classes}: "
                         "their ranges do not tile the classes")
    return out


@torch.no_grad()
def sharded_topk(local_logits, features: Tensor, k: int, shard: ClassShard, *, gather_inputs: bool):
    """The top ``k`` over every class of a class-sharded head: ``local_logits(rows)`` gives (rows, shard.size)
    logits of this rank's classes; each rank's top min(k, size), one all-gather of (values, global indices) padded
    to k with -inf, and the top k of those. ``gather_inputs``: each rank passes its own rows (gathered, and this
    rank's rows returned); else the same rows on every rank."""
    rank, world = rank_and_size(shard.group)
    rows = all_gather(features, shard.group).reshape(-1, features.shape[1]) if gather_inputs else features
    z = local_logits(rows)
    kk = min(k, shard.size)
    v, i = torch.topk(z.float(), kk, dim=1) if kk else (z.new_empty((rows.shape[0], 0), dtype=torch.float32),
                                                         z.new_empty((rows.shape[0], 0), dtype=torch.long))
    values = torch.full((rows.shape[0], k), -math.inf, device=z.device)
    index = torch.full((rows.shape[0], k), -1, dtype=torch.long, device=z.device)
    values[:, :kk], index[:, :kk] = v, i + shard.start
    every_v, every_i = all_gather(values, shard.group), all_gather(index, shard.group)  # (W, rows, k)
    top_v, pos = torch.topk(every_v.permute(1, 0, 2).reshape(rows.shape[0], -1), k, dim=1)
    top_i = every_i.permute(1, 0, 2).reshape(rows.shape[0], -1).gather(1, pos)
    if gather_inputs:
        n = features.shape[0]
        top_v, top_i = top_v[rank * n:(rank + 1) * n], top_i[rank * n:(rank + 1) * n]
    return torch.return_types.topk((top_v.to(z.dtype), top_i))
