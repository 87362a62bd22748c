"""Data-parallel losses that equal one big batch (``dp_group=``; docs/design.md, "Scaling past one GPU").

Under DDP/FSDP each rank holds ``N_r`` rows of the global batch. With ``dp_group`` a loss returns, on every rank, the
loss of the concatenated batch, and its gradient on the rank's own rows is scaled so that DDP's averaging gives the
single-process gradient:

- 'mean' / 'sum': the rank sums its rows (the kernels' fused 'sum') and its denominator ``sum_i w_{y_i}``; one SUM
  all-reduce of the two gives the global sum and the global weighted mean (per-rank means averaged would be
  wrong for class weights, ignored rows or uneven batches);
- 'none': the rank's rows, unchanged (the caller reduces them);
- LADE: LADER's column statistics (column log-sum-exp, per-class target sums and counts, the valid rows) and
  PriorCE's sum and denominator: one MAX and one SUM all-reduce (~12 C bytes), then LADER of the global batch;
- GCL's noise: rank r's rows draw noise rows ``r * rows_per_rank + i`` (no collective), so ranks seeded alike
  draw the noise of one process on the concatenated batch and never share it.

Statistics and collectives run in fp32 (float64 stays float64), through functional collectives (traced by
``torch.compile``), with no host sync. The global loss gets the gradient ``size * d loss / d (local inputs)``
(:func:`fastlt.distributed.collectives.world_gradient`): DDP's averaging over the ranks then yields exactly the
gradient of the global loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference as R
from .._backend import in_loss_dtype, loss_dtype, use_triton
from .._operator import check_lade_args
from .._validation import is_int
from ..noise import check_noise_rows
from .collectives import carried, global_logsumexp, global_sum, rank_and_size, stat_dtype, world_gradient

__all__ = ["global_batch_loss", "global_lade_loss", "noise_row_offset", "mean_denominator", "batch_dependent",
           "split_warning", "kernels_direct", "warn_without_group", "resolve_dp_group"]


def noise_row_offset(rank: int, rows: int, rows_per_rank: int | None) -> int:
    """The global index of rank ``rank``'s first row: ``rank * rows_per_rank`` (default: the local ``rows``, right
    for equal batches; pass the loader's batch size when the last batch is short)."""
    if rows_per_rank is None:
        check_noise_rows(rank * rows, rows, " of this rank (rank x its rows)")
        return rank * rows
    if not is_int(rows_per_rank) or rows_per_rank < 1:
        raise ValueError(f"rows_per_rank must be a positive int (the per-rank batch size), got {rows_per_rank!r}")
    if rows > rows_per_rank:
        raise ValueError(f"rows_per_rank={rows_per_rank} is smaller than this rank's batch of {rows} rows: the "
                         "ranks' noise rows would overlap")
    check_noise_rows(rank * rows_per_rank, rows, " of this rank (rank x rows_per_rank)")
    return rank * rows_per_rank


def mean_denominator(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """``sum_i w_{y_i}`` over the rows whose target is not ``ignore_index`` (``w = 1`` without weights), 0-dim; the
    number of rows for class-probability targets (``F.cross_entropy``'s 'mean' over them)."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=dtype, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return torch.where(valid, weight.to(dtype)[safe], torch.zeros((), dtype=dtype, device=target.device)).sum()


def _check_reduction(reduction) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def global_batch_loss(local: Callable[[dict], Tensor], logits: Tensor, target: Tensor, fields: dict, group, *,
                      weight: Tensor | None, rows_per_rank: int | None = None) -> Tensor:
    """The adjusted cross-entropy (any preset, logits or head) of the global batch: ``local(fields)`` computes the
    rank's loss for the operator's ``fields`` (by name; the reduction and the noise row offset are set here).
    ``logits``: the rank's (N_r, C) input (features for a head), for its row count and dtype; ``target`` (N_r,);
    ``weight``: the (C,) class weights of the loss (for the 'mean' denominator) or None."""
    group = resolve_dp_group(group)
    reduction = fields.get("reduction", "mean")
    _check_reduction(reduction)
    rank, size = rank_and_size(group)
    fields = {**fields, "noise_row_offset": noise_row_offset(rank, logits.shape[0], rows_per_rank)}
    if reduction == "none":
        return local(fields)
    if logits.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(logits.device.type):
        # the rank's sum in fp32: in half precision it overflowed fp16 (a 'mean' of 5000 over 32 rows gave NaN on
        # two ranks) or took one more rounding than one process's loss
        rows = local({**fields, "reduction": "none"})
        out_dtype, row_sum = rows.dtype, rows.float().sum()
    else:
        row_sum = local({**fields, "reduction": "sum"})
        out_dtype = row_sum.dtype
    denom = mean_denominator(target, weight, fields.get("ignore_index", -100), stat_dtype(logits.dtype))
    total, denom = global_sum([row_sum, denom], group)
    loss = _mean(total, denom) if reduction == "mean" else total
    return world_gradient(loss, size).to(out_dtype)  # the dtype one process returns (autocast's for a head)


def _mean(total: Tensor, denom: Tensor) -> Tensor:
    """``total / denom``; NaN with a zero gradient where ``denom`` is 0 (no valid row in the global batch: one
    process's 'mean' there), not the ``0 * inf`` that the kernels' rows (coefficient 0) would get from ``1 / 0``."""
    some = denom > 0
    value = total / torch.where(some, denom, torch.ones_like(denom))
    return torch.where(some, value, torch.full_like(value, float("nan")))


def global_lade_loss(logits: Tensor, target: Tensor, prior: Tensor, alpha: float, remine_lambda: float, group, *,
                     weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                     label_smoothing: float = 0.0, triton: bool = False) -> Tensor:
    """LADE of the global batch, ``PriorCE + alpha * LADER``, every rank holding (N_r, C) ``logits``: the rank's
    PriorCE sum and LADER statistics (the kernels' one pass when ``triton``, else the reference's), one MAX and one
    SUM all-reduce, then LADER from the global statistics (:func:`fastlt.reference.lader_from_statistics`)."""
    group = resolve_dp_group(group)
    from .._validation import as_index_target, as_kernel_target

    target = as_kernel_target(target) if triton else as_index_target(target, keep_int32=False)
    check_lade_args(logits, target, prior, alpha, remine_lambda, reduction)
    if triton:
        from .._glue import lade_statistics_triton

        row_sum, stats = lade_statistics_triton(logits, target, prior, weight=weight, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing)
    else:
        z = in_loss_dtype(logits)
        z = z.to(stat_dtype(z.dtype))  # the rank's sum in float32 (bf16 rounded it per rank)
        row_sum = R.adjusted_cross_entropy(z, target, log_prior=R._log_of_prior(prior, z.dtype), weight=weight,
                                           ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
        stats = R.lader_statistics(z, target, ignore_index)
    rank, size = rank_and_size(group)
    denom = mean_denominator(target, weight, ignore_index, stat_dtype(logits.dtype))
    col_lse, (target_sum, count, valid, total, denom) = global_logsumexp(
        stats.col_lse, group, stats.target_sum, stats.count, stats.valid, row_sum, denom)
    prior_ce = _mean(total, denom) if reduction == "mean" else total
    # LADER's own terms in the prior are alike on every rank: their gradient divided by the world size, which
    # world_gradient multiplies back (a learnable prior got W times it once DDP averaged)
    lader = R.lader_from_statistics(R.LaderStatistics(col_lse, target_sum, count, valid),
                                    carried(prior, prior.detach(), 1.0 / size) if prior.requires_grad else prior,
                                    remine_lambda)
    return world_gradient(prior_ce + alpha * lader, size).to(loss_dtype(logits))


def batch_dependent(weight, reduction: str) -> bool:
    """Whether a cross-entropy's value depends on how the batch is split over ranks: a class-weighted mean."""
    return weight is not None and reduction == "mean"


def split_warning(weight, reduction: str) -> str | None:
    """What a cross-entropy (a loss or a head) warns about under several ranks without ``dp_group``: its value
    depends on the batch split (a class-weighted mean); None when it does not."""
    return "a class-weighted 'mean'" if batch_dependent(weight, reduction) else None


def resolve_dp_group(dp_group):
    """``dp_group`` as a call takes it: the string ``'world'`` is ``torch.distributed``'s default group, looked up at
    the call (``dist.group.WORLD`` is None until ``init_process_group``: a loss made before it and given
    ``dist.group.WORLD`` held None, no group, and silently computed each rank's own loss); anything else as it is
    (a process group, None, False)."""
    if not isinstance(dp_group, str):
        return dp_group
    if dp_group != "world":
        raise ValueError(f"dp_group must be a process group, 'world' (the default group), None or False, got "
                         f"{dp_group!r}")
    if not (_DIST and dist.is_initialized()):
        raise RuntimeError("dp_group='world' is torch.distributed's default group, which does not exist yet: call "
                           "torch.distributed.init_process_group before the loss")
    return dist.group.WORLD


def kernels_direct(inputs, backend: str, dp_group, shard, warning: str | None) -> bool:
    """Whether a call of a loss module (or a head) goes to the kernels' glue as it is: plain 2-D tensor ``inputs``
    (logits (N, C), or a head's features: no DTensor, no positions to flatten), no class shard, no data-parallel
    group (None or False), and the kernels chosen for them. The module then calls the glue itself: the same checks
    and kernels without the functions' dispatch (a small step is host-bound). ``warning``: what to warn about, as the
    dispatch would, when several ranks run without ``dp_group`` (a loss that depends on the batch split:
    :func:`split_warning`, :func:`warn_without_group`); None when the loss does not."""
    if (type(inputs) is not Tensor or inputs.dim() != 2 or shard is not None
            or (dp_group is not None and dp_group is not False) or not use_triton(backend, inputs)):
        return False
    if dp_group is None and warning is not None:
        warn_without_group(warning)
    return True


_WARNED = False
_DIST = dist.is_available()  # (False where torch is built without torch.distributed)


def warn_without_group(what: str) -> None:
    """Warn once per process when ``torch.distributed`` runs more than one rank and a loss whose value depends on
    the batch (``what``) is used without ``dp_group``: each rank then computes its own batch's loss."""
    global _WARNED
    # a LADE step asks this every call: the answer for one process (no process group) first, in one call
    if _WARNED or not (_DIST and dist.is_initialized()) or torch.compiler.is_compiling() or dist.get_world_size() < 2:
        return
    _WARNED = True
    import warnings

    warnings.warn(f"{what} under torch.distributed with {dist.get_world_size()} ranks and no dp_group: each rank "
                  "computes the loss of its own rows only (LADE's column statistics, a class-weighted mean's "
                  "denominator), which is not the loss of the global batch. Pass dp_group= (e.g. "
                  "torch.distributed.group.WORLD) for the global-batch loss, or dp_group=False to keep the per-rank "
                  "loss and silence this warning.", UserWarning, stacklevel=4)

