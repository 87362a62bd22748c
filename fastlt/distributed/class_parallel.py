"""Class-parallel losses (``shard=``): each rank holds the logits of its classes only, (N, shard.size), and the
targets of all N rows (global class ids, the same on every rank of ``shard.group``). Every rank returns the loss of
the full (N, C) logits, and the gradient of its own columns (docs/design.md, "Scaling past one GPU").

Per row, the rank's partials of its classes: the max ``m_r`` of the adjusted logits, ``e_r = sum_j exp(a_ij - m)``,
the target's ``a_{i,y_i}`` (0 off its owner), and ``Q_r = sum_j w_j a_ij`` (label smoothing); one MAX all-reduce of
the row maxima (N fp32) and one SUM all-reduce of ``[e, a_y, Q]`` (3N fp32), and the loss is finished from the
global row statistics exactly as one process would (label smoothing over the global C, the focal factor from the
global LSE, class weights from the replicated (C,) vector). No collective in backward: each rank's gradient is the
row kernel's on its columns (``col_base = shard.start``). Class vectors stay (C,) and replicated; GCL's noise of
element (i, j) is drawn by the rank holding column j from (seed, global row, global class), so a common seed gives
the single-process noise. LADE: its column statistics are complete per shard (every rank sees all N rows of its
classes), and LADER's per-class sum is one more float in the SUM.

Both backends: the reference (autograd through :func:`fastlt.distributed.collectives.global_sum`) and the kernels
(``fastlt::shard_partials``, the collectives, ``fastlt::shard_finish`` whose registered backward is the row kernel's
gradient). Collectives are functional (``torch.compile`` traces them), no host sync. ``shard.combine='gather'``
replaces the two all-reduces by one all-gather of the partials, combined in rank order (the same bits on every
rank).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _operator as O
from .. import reference as R
from .._backend import in_loss_dtype, loss_dtype
from .._custom_ops import define, input_grads, save_inputs, saved_inputs
from .._kernel_modules import kernel_module
from .._operator import AdjustedCEArgs
from ..noise import call_seed, gcl_noise
from .class_shard import ClassShard
from .collectives import all_reduce, carried, gathered_partials, global_sum, moved_to_max, stat_dtype

# the kernels (stand-ins that raise at their first use where Triton is missing: fastlt._kernel_modules)
launch = kernel_module("fastlt.kernels.launch")

__all__ = ["sharded_cross_entropy", "sharded_lade_loss", "check_shard", "check_shard_options", "check_shard_target",
           "shared_input"]


def check_shard_options(dp_group=None, *, noise=None, grad_in_forward: bool = False,
                        lade_backend: str | None = None) -> None:
    """What ``shard=`` does not combine with, for the logits losses, the heads and their modules: ``dp_group``
    (a 2-D layout), explicit ``noise``, ``grad_in_forward``, and LADE on the kernels (``lade_backend='triton'``)."""
    if dp_group is not None and dp_group is not False:
        raise NotImplementedError("shard= together with dp_group= (a 2-D layout) is not supported yet; "
                                  "gather_inputs=True gives a data-parallel backbone with a class-parallel head")
    if grad_in_forward:
        raise ValueError("grad_in_forward=True is not available with shard= (the forward needs the collectives "
                         "before any gradient)")
    if noise is not None:
        raise ValueError("noise= is not available with shard=; GCL draws the noise of each rank's columns from seed=")
    if lade_backend == "triton":
        raise NotImplementedError("LADE with shard= runs the reference path (backend='auto' or 'torch')")


def check_shard_target(shard, target) -> None:
    """``shard`` a :class:`ClassShard`, and class indices as targets (class probabilities are not sharded yet)."""
    if not isinstance(shard, ClassShard):
        raise TypeError(f"shard must be a fastlt.distributed.ClassShard, got {type(shard).__name__}")
    if isinstance(target, Tensor) and target.is_floating_point():
        raise ValueError("class-probability targets are not supported with shard= yet; pass class indices")


def check_shard(shard, logits: Tensor, target: Tensor) -> None:
    """``shard`` a :class:`ClassShard` whose size is the logits' width; class indices (N,) as targets."""
    check_shard_target(shard, target)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError("class-parallel logits must be (N, shard.size) local logits")
    if logits.shape[1] != shard.size:
        raise ValueError(f"the local logits hold {logits.shape[1]} classes but the shard holds {shard.size} "
                         f"(classes [{shard.start}, {shard.stop}) of {shard.num_classes})")


def _global_proxy(logits: Tensor, shard: ClassShard) -> Tensor:
    """A stand-in for the global (N, C) logits, for the operator's checks (a broadcast scalar: no memory)."""
    return logits.new_empty((1, 1)).expand(logits.shape[0], shard.num_classes)


def _local_targets(target: Tensor, shard: ClassShard, ignore_index: int):
    """``(valid, local, safe_global, y_local)``: rows not ignored, rows whose target this rank holds, the targets
    with ignored rows at 0, and the local column of a held target (0 elsewhere)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    local = valid & (safe >= shard.start) & (safe < shard.stop)
    y_local = torch.where(local, safe - shard.start, torch.zeros_like(safe))
    return valid, local, safe, y_local


# --- the reference path ---------------------------------------------------------------------------------------

def _local_adjusted(logits: Tensor, target: Tensor, f: dict, shard: ClassShard, local, y_local) -> Tensor:
    """The adjusted logits of this rank's columns (the reference's arithmetic: in at least float32)."""
    s0, s1 = shard.start, shard.stop
    N, Cl = logits.shape
    a = logits.to(stat_dtype(logits.dtype))
    if f.get("log_prior") is not None:
        a = a + f.get("tau", 1.0) * f["log_prior"][s0:s1].to(a.dtype)
    cloud, noise_mul = f.get("cloud"), f.get("noise_mul", 0.0)
    if cloud is not None and noise_mul != 0.0:
        seed = f.get("seed")
        e = gcl_noise(call_seed(seed, logits.device), N, Cl, logits.device,
                      row_offset=f.get("noise_row_offset", 0), col_offset=s0)
        cdt = torch.promote_types(a.dtype, torch.float32)
        a = a - (noise_mul * cloud[s0:s1].to(cdt) * e.to(cdt)).to(a.dtype)
    margin = f.get("margin")
    if margin is not None:
        m = margin[torch.where(local, y_local + s0, torch.zeros_like(y_local))].to(a.dtype) if isinstance(
            margin, Tensor) else torch.full((N,), float(margin), dtype=a.dtype, device=a.device)
        onehot = torch.nn.functional.one_hot(y_local, Cl).to(a.dtype) if Cl else a.new_zeros((N, 0))
        a = a - (m * local.to(a.dtype))[:, None] * onehot
    if f.get("scale", 1.0) != 1.0:
        a = a * f["scale"]
    return a


def _owned(vector: Tensor | None, shard: ClassShard) -> Tensor | None:
    """The (C,) class ``vector`` (same values) with a gradient into this rank's classes only: a term every rank
    computes alike from it (the target's weight, the weights' sum) then adds over the ranks to its gradient once,
    as the terms of the rank's own columns do (the weight's gradient was the whole on every rank: W times it)."""
    if vector is None or not vector.requires_grad:
        return vector
    mine = torch.zeros(vector.shape[0], dtype=torch.bool, device=vector.device)
    mine[shard.start:shard.stop] = True
    return torch.where(mine, vector, vector.detach())


def _finish(M, e, a_y, q, target, valid, safe, f: dict, C: int, dtype, shard: ClassShard) -> Tensor:
    """The loss from the global row statistics (fp32 or wider), as the reference computes it."""
    eps, gamma, weight = f.get("label_smoothing", 0.0), f.get("gamma", 0.0), _owned(f.get("weight"), shard)
    lse = M + torch.log(e)
    ce = lse - a_y
    w_y = torch.ones_like(ce) if weight is None else weight.to(ce.dtype)[safe]
    loss = (1.0 - eps) * w_y * ce
    if eps > 0:
        w_sum = float(C) if weight is None else weight.to(ce.dtype).sum()
        loss = loss + (eps / C) * (w_sum * lse - q)
    if gamma != 0:
        loss = loss * R.focal_power((-torch.expm1(-ce.detach())).clamp(min=0), gamma)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    loss, w_y = torch.where(valid, loss, zero), torch.where(valid, w_y, zero)
    reduction = f.get("reduction", "mean")
    out = loss if reduction == "none" else (loss.sum() if reduction == "sum" else loss.sum() / w_y.sum())
    return out.to(dtype)


def _reference_partials(logits, target, f, shard, extra=None):
    """``(M, e, a_y, Q, extra...)`` global (autograd into the local logits), and what :func:`_finish` needs."""
    ignore = f.get("ignore_index", -100)
    valid, local, safe, y_local = _local_targets(target, shard, ignore)
    a = _local_adjusted(logits, target, f, shard, local, y_local)
    sdt = stat_dtype(a.dtype)
    a = R._without_ignored_rows(a.to(sdt), valid)
    N, Cl = a.shape
    m_local = a.detach().amax(1) if Cl else a.new_full((N,), -math.inf)
    a_y = torch.where(local, a.gather(1, y_local[:, None])[:, 0] if Cl else a.new_zeros(N), a.new_zeros(()))
    weight = f.get("weight")
    q = (a if weight is None else a * weight[shard.start:shard.stop].to(sdt)).sum(1)
    sums = [a_y, q, *(extra or [])]
    if shard.combine == "gather":
        M, e, sums = _gathered(a, m_local, sums, shard.group)
    else:
        M = all_reduce(m_local, "max", shard.group)
        e, *sums = global_sum([torch.exp(a - M[:, None]).sum(1), *sums], shard.group)
    a_y, q, *more = sums
    return (M, e, a_y, q, more), (valid, safe)


def _gathered(a: Tensor, m_local: Tensor, sums: list[Tensor], group):
    """``combine='gather'``: :func:`fastlt.distributed.collectives.gathered_partials`, with the gradient of this
    rank's parts (as :func:`fastlt.distributed.collectives.global_sum`)."""
    finite = torch.isfinite(m_local)
    e_local = torch.exp(a - torch.where(finite, m_local, 0.0)[:, None]).sum(1)
    M, e, totals = gathered_partials(m_local, e_local, sums, group=group)
    mine = e_local * torch.where(finite, torch.exp(m_local - M), 0.0)
    return M, carried(mine, e), [carried(t, v) for t, v in zip(sums, totals, strict=True)]


def sharded_cross_entropy(logits: Tensor, target: Tensor, fields: dict, shard: ClassShard, *,
                          triton: bool = False) -> Tensor:
    """The adjusted cross-entropy of the full (N, C) logits from this rank's (N, shard.size) columns; ``fields``
    the operator's parameters by name (full (C,) class vectors). Returns the loss in the logits' dtype (float32
    under autocast), the same on every rank of ``shard.group``."""
    check_shard(shard, logits, target)
    O.check_operator_args(_global_proxy(logits, shard), target, fields)
    if triton:
        return _sharded_triton(logits, target, fields, shard)
    logits = in_loss_dtype(logits)
    (M, e, a_y, q, _), (valid, safe) = _reference_partials(logits, target, fields, shard)
    return _finish(M, e, a_y, q, target, valid, safe, fields, shard.num_classes, logits.dtype, shard)


def sharded_lade_loss(logits: Tensor, target: Tensor, prior: Tensor, alpha: float, remine_lambda: float,
                      shard: ClassShard, *, weight=None, ignore_index: int = -100, reduction: str = "mean",
                      label_smoothing: float = 0.0) -> Tensor:
    """LADE of the full (N, C) logits from this rank's columns (reference path): PriorCE sharded as
    :func:`sharded_cross_entropy`, LADER's column statistics complete per shard (all N rows of its classes) and
    its per-class sum added over the ranks in the same SUM all-reduce."""
    check_shard(shard, logits, target)
    logits = in_loss_dtype(logits)
    proxy = _global_proxy(logits, shard)
    O.check_lade_args(proxy, target, prior, alpha, remine_lambda, reduction)
    fields = dict(log_prior=R._log_of_prior(prior, logits.dtype), tau=1.0, weight=weight, ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=label_smoothing)
    O.check_operator_args(proxy, target, fields)
    valid, local, safe, y_local = _local_targets(target, shard, ignore_index)
    s0, s1 = shard.start, shard.stop
    z = logits.to(stat_dtype(logits.dtype))
    onehot = (torch.nn.functional.one_hot(y_local, shard.size).to(z.dtype) if shard.size else z.new_zeros(z.shape))
    onehot = onehot * local[:, None].to(z.dtype)
    stats = R.LaderStatistics(col_lse=R._masked_logsumexp(z, valid), target_sum=R._target_sums(z, onehot),
                              count=onehot.sum(0), valid=valid.sum().to(z.dtype))
    part = R.lader_from_statistics(stats, prior[s0:s1], remine_lambda, num_classes=shard.num_classes)
    (M, e, a_y, q, (lader,)), _ = _reference_partials(logits, target, fields, shard, extra=[part])
    prior_ce = _finish(M, e, a_y, q, target, valid, safe, fields, shard.num_classes, z.dtype, shard)
    return (prior_ce + alpha * lader).to(loss_dtype(logits))


# --- the kernels: two custom ops around the collectives ----------------------------------------------------------

@define("fastlt::shard_partials", "Tensor logits, Tensor target, int col_base, int num_classes", [AdjustedCEArgs],
        "Tensor")
def shard_partials_op(logits, target, col_base, num_classes, *flat):
    """(5, N) fp32 partials of this rank's classes: row max, sum exp(a - max), the target's a (0 off its owner),
    sum_j w_j (a_j - max), sum_j w_j (:func:`fastlt.kernels.launch.chunk_partials`). Not differentiable (the finish
    op is)."""
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    N = logits.shape[0]
    part = torch.empty((launch.PARTIAL_PLANES, N, 1), dtype=torch.float32, device=logits.device)
    if logits.shape[1] == 0:  # an empty shard takes part with nothing
        part[0].fill_(-math.inf)
        part[1:].zero_()
    launch.chunk_partials(logits, target, args, part, 0, col_base=col_base, num_classes=num_classes)
    return part[:, :, 0]


@shard_partials_op.register_fake
def _(logits, target, col_base, num_classes, *flat):
    return logits.new_empty((launch.PARTIAL_PLANES, logits.shape[0]), dtype=torch.float32)


@define("fastlt::shard_finish", "Tensor logits, Tensor target, Tensor partials, int col_base, int num_classes",
        [AdjustedCEArgs], "(Tensor, Tensor, Tensor)")
def shard_finish_op(logits, target, partials, col_base, num_classes, *flat):
    """``(loss, row_stats, row_coef)`` from the (5, N) global partials (row max, sum-exp and smoothing sum relative
    to it, target logit, the smoothing weights); its registered backward is the row kernel's gradient of the local
    columns."""
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    part = partials[:, :, None].contiguous()
    if args.reduction == "none":
        loss, row_stats, row_coef = launch.combine_partials(part, target, args, num_classes)
        return loss, row_stats, row_coef
    out = torch.empty((), dtype=torch.float32, device=logits.device)
    _, row_stats, row_coef = launch.combine_partials(part, target, args, num_classes, out=out)
    return out, row_stats, row_coef


@shard_finish_op.register_fake
def _(logits, target, partials, col_base, num_classes, *flat):
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    N = logits.shape[0]
    loss = logits.new_empty((N,) if args.reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty((2, N), dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


def _setup_finish(ctx, inputs, output):
    _, row_stats, row_coef = output
    save_inputs(ctx, inputs, row_stats, row_coef)


def _finish_backward(ctx, grad_loss, *unused):
    (logits, target, _, col_base, num_classes, *flat), (row_stats, row_coef) = saved_inputs(ctx)
    grad = shard_grad_op(logits, target, row_stats, row_coef, grad_loss.contiguous(), col_base, num_classes, *flat)
    return input_grads(ctx, grad)


@define("fastlt::shard_grad", "Tensor logits, Tensor target, Tensor row_stats, Tensor row_coef, Tensor grad_loss, "
        "int col_base, int num_classes", [AdjustedCEArgs], "Tensor")
def shard_grad_op(logits, target, row_stats, row_coef, grad_loss, col_base, num_classes, *flat):
    """d loss / d (local logits): the row kernel's gradient of this rank's columns (an op of its own, with a fake,
    so that torch.compile traces the backward instead of launching on fake tensors)."""
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    return launch.grad(logits, target, args, row_stats, row_coef, grad_loss, col_base=col_base,
                       num_classes=num_classes)


@shard_grad_op.register_fake
def _(logits, target, row_stats, row_coef, grad_loss, col_base, num_classes, *flat):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


shard_finish_op.register_autograd(_finish_backward, setup_context=_setup_finish)


def _sharded_triton(logits: Tensor, target: Tensor, fields: dict, shard: ClassShard) -> Tensor:
    from .._glue import check_kernel_input, seed_kept_with_saved_tensors
    from .._validation import as_kernel_target

    check_kernel_input("logits", logits)
    O.refuse_requiring_grad(fields)  # the kernels take the class vectors as constants
    target = as_kernel_target(target)
    args = seed_kept_with_saved_tensors(AdjustedCEArgs.from_fields(logits.device, fields), logits.device)
    flat = O.flatten(args)
    local = shard_partials_op(logits.detach(), target, shard.start, shard.num_classes, *flat)
    if shard.combine == "gather":
        M, e, (a_y,), ((q, w),) = gathered_partials(local[0], local[1], [local[2]], moved=[(local[3], local[4])],
                                                 group=shard.group)
        partials = torch.stack([M, e, a_y, q, w])
    else:  # the smoothing sum moved from the rank's max to the global one before the sum: + W_r (m_r - M)
        M = all_reduce(local[0], "max", shard.group)
        q = moved_to_max(local[3], local[4], local[0], M)
        total = all_reduce(torch.stack([local[1] * torch.exp(local[0] - M), local[2], q]), "sum", shard.group)
        partials = torch.cat([M[None], total, _weights_seen(args, shard, M)[None]])
    loss = shard_finish_op(logits, target, partials, shard.start, shard.num_classes, *flat)[0]
    return loss.to(loss_dtype(logits))


def _weights_seen(args: AdjustedCEArgs, shard: ClassShard, like: Tensor) -> Tensor:
    """(N,) ``sum_j w_j`` over all classes (the smoothing sum's weights, for the finish; C without weights)."""
    if args.weight is None:
        return torch.full_like(like, float(shard.num_classes))
    return args.weight_total.to(like.dtype).expand_as(like)


class _SharedInput(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (each rank's columns contribute a part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), "sum", ctx.group).to(grad.dtype), None


def shared_input(x: Tensor, group) -> Tensor:
    """``x`` (features, replicated on every rank of a class shard's ``group``) as the input of the rank's head
    shard: the same values, and a backward that sums the ranks' gradients (each rank's classes give a part of
    d loss / d x), so the layers below get the full gradient on every rank (Megatron's
    ``copy_to_tensor_model_parallel_region``). One SUM all-reduce of x's size in backward."""
    return _SharedInput.apply(x, group)
