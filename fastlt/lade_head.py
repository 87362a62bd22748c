"""LADE on a linear head, fused: ``PriorCE(z) + alpha * LADER(z)`` with ``z = features @ weight^T + bias``,
never holding the (N, C) logits.

LADER needs column statistics over the whole batch (per-class target sums and counts, and the
batch-direction log-sum-exp of every column) before any gradient exists, so the fused path takes two
passes over the row chunks of :mod:`fastlt.heads`:

1. per chunk: ``z = F_chunk W^T (+ b)`` (cuBLAS), then the row kernel with ``COLUMN_STATS`` computes the
   PriorCE row losses and row statistics, the rows' target logits, and the chunk's column (max, sum-exp)
   partials, merged into running (2, C) fp32 statistics (no atomics: deterministic);
2. LADER and its gradient vectors from the merged statistics; then per chunk, last chunk first: ``z``
   (recomputed, except for the last chunk, whose logits pass 1 left in the buffer), ``d loss / d z`` written
   over it (row term plus LADER's column term), ``dF = dZ W``, ``dW += dZ^T F``.

With K chunks that is ``(6 + 2 (K - 1) / K) N D C`` FLOPs: for a batch that fits one chunk (the usual case:
4096 x 8142 bf16 is 67 MB) it is ``6 N D C``, as the CE heads, and the forward is LADE's own two launches
(:func:`fastlt.kernels.lade.forward`: the rows with the column partials, then LADER's finish, whose last program
reduces the loss). Memory O(N*D + C*D + chunk*C). The backward only rescales the saved gradients by grad_output.

When the rows take more than one chunk (or ``chunk_classes=`` is given) the classes are chunked instead
(:func:`_lade_class_pass`): each class chunk sees every row, so its column statistics are complete at
once; the same FLOPs (K class chunks: the last one is not recomputed), but ``dW`` is written per class chunk
with no fp32 accumulator, and the column partials take (2, N/16, C) fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _validation as V
from . import reference as R
from .functional import use_triton
from .heads import (
    FusedLinearLoss,
    _autocast_inputs,
    _check_chunk_classes,
    _check_chunk_rows,
    _check_head,
    _chunk_logits,
    _chunks,
    _class_grads,
    _class_row_stats,
    _grad_accumulators,
    _joined,
    _logits_buffer,
    _row_chunk_grads,
    default_chunk_classes,
    head_chunk_rows,
)

__all__ = ["lade_linear_loss", "reference_lade_linear_loss"]


def reference_lade_linear_loss(features, weight, target, prior, bias=None, *, alpha=0.1, remine_lambda=0.1,
                               weight_classes=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0) -> torch.Tensor:
    """Unfused oracle: ``z = F.linear(features, weight, bias)``, then :func:`fastlt.reference.lade_loss`."""
    _check_head(features, weight, bias)
    target = V.as_index_target(target)
    return R.lade_loss(F.linear(features, weight, bias), target, prior, alpha, remine_lambda, weight=weight_classes,
                       ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class _LADEHeadParams:
    args: object  # RowOperatorArgs with prior = log(pi), tau = 1
    pi: torch.Tensor
    alpha: float
    remine_lambda: float
    chunk_rows: int
    chunk_classes: int | None = None  # set: the class-chunked passes (_lade_class_pass)


def _lade_pass(x, w, b, y, params: _LADEHeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """Both passes; returns ``(loss, dx, dw, db)`` with the gradients for grad_output = 1 (None if not needed)."""
    from .kernels import lade as lade_kernels
    from .kernels import launch

    if params.chunk_classes is not None:
        return _lade_class_pass(x, w, b, y, params, need_x=need_x, need_w=need_w, need_b=need_b)
    args = params.args
    N, D = x.shape
    C = w.shape[0]
    chunks = _chunks(N, params.chunk_rows)
    single = len(chunks) == 1
    buf = _logits_buffer(min(params.chunk_rows, N), C, x) if N else None
    if single:  # the whole batch at once: LADE's own two launches (the finish's last program reduces the loss)
        z = _chunk_logits(buf, x, w, b)
        loss, lse, factor, terms = lade_kernels.forward(z, y, params.pi, params.alpha, params.remine_lambda, args,
                                                        out_dtype=x.dtype)
        row_stats, column_term = [(lse, factor)], terms.column_term
    else:
        inv = launch.inv_denominator_of(y, args) if args.reduction == "mean" else None
        row_losses, target_logits, row_stats, stats = [], [], [], None
        for r0, r1 in chunks:
            z = _chunk_logits(buf, x[r0:r1], w, b)
            rows, lse, factor, cols = launch.forward(z, y[r0:r1], args, column_stats=True, inv_denominator=inv)
            row_losses.append(rows)
            target_logits.append(cols.target_logits)
            row_stats.append((lse, factor))
            stats = lade_kernels.merge_partials(cols.partials, into=stats)
        loss, column_term = _lade_total(_joined(row_losses, x), inv, stats, _joined(target_logits, x), y, params)
        loss = loss.to(x.dtype)

    dx = dw = db = None
    if not (need_x or need_w or need_b):
        return loss, dx, dw, db
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dw, db = _grad_accumulators(C, D, x, len(chunks), need_w=need_w, need_b=need_b)
    # last chunk first: pass 1 left its logits in the buffer (the row kernel only reads them), so it is not
    # recomputed; with one chunk, no logits matmul is repeated (6 N D C FLOPs, as the CE heads)
    for k in reversed(range(len(chunks))):
        r0, r1 = chunks[k]
        xc = x[r0:r1]
        z = buf[: r1 - r0] if k == len(chunks) - 1 else _chunk_logits(buf, xc, w, b)
        lse, factor = row_stats[k]
        launch.grad(z, y[r0:r1], args, lse, factor, None, column_term=column_term, out=z)
        _row_chunk_grads(z, xc, w, dx, dw, db, r0, r1, single=single, first=k == len(chunks) - 1)
    if dw is not None and dw.dtype != x.dtype:
        dw = dw.to(x.dtype)
    if db is not None:
        db = db.to(x.dtype)
    return loss, dx, dw, db


def _lade_total(loss_rows, inv, stats, target_logits, y, params: _LADEHeadParams):
    """``PriorCE + alpha * LADER`` (fp32, 0-dim) from the rows' losses, the column (max, sum-exp) statistics,
    merged (2, C) or per row block (2, R, C) (None for an empty batch), and the rows' target logits; and
    LADER's column term for the gradient pass (None for an empty batch)."""
    from .kernels import lade as lade_kernels
    from .kernels import launch

    args = params.args
    if stats is None:
        return launch.reduce(loss_rows, y, args, inv_denominator=inv), None
    terms = lade_kernels.finish(stats, y, target_logits, params.pi, args.ignore_index, params.remine_lambda,
                                params.alpha)
    return launch.reduce(loss_rows, y, args, inv_denominator=inv, extra=terms.parts), terms.column_term


def _lade_class_pass(x, w, b, y, params: _LADEHeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """Class-chunked LADE: every class chunk sees all rows, so its column statistics are complete at once.
    Pass 1 (:func:`fastlt.heads._class_row_stats` with a column-statistics buffer, the factors left without
    'mean''s denominator); then LADER's finish, whose last program reduces PriorCE's rows plus LADER into the loss
    (as :func:`fastlt.kernels.lade.forward`); pass 2 (:func:`fastlt.heads._class_grads` with LADER's column term,
    last chunk first, from the logits pass 1 left in the buffer) writes ``dW_k`` per chunk with no fp32
    accumulator."""
    from .kernels import lade as lade_kernels
    from .kernels import launch

    args = params.args
    N = x.shape[0]
    cols = launch.ColumnStats.empty(N, w.shape[0], x.device)
    loss = torch.empty((), dtype=x.dtype, device=x.device)
    loss_rows, lse, factor, flat = _class_row_stats(x, w, b, y, params, column_stats=cols, scale_mean=False)
    column_term = None
    if N == 0:  # no row, no LADER: the 'mean' of no rows is NaN, as torch's
        launch.reduce(loss_rows, y, args, out=loss)
    else:
        column_term = lade_kernels.finish(cols.partials, y, cols.target_logits, params.pi, args.ignore_index,
                                          params.remine_lambda, params.alpha,
                                          rows=lade_kernels.PriorCERows(loss_rows, factor, args, loss)).column_term
    dx = dw = db = None
    if need_x or need_w or need_b:
        dx, dw, db = _class_grads(x, w, b, y, params, lse, factor, None, need_x=need_x, need_w=need_w,
                                  need_b=need_b, column_term=column_term, flat=flat)
    return loss, dx, dw, db


class FusedLinearLADE(FusedLinearLoss):
    """``apply(features, weight, bias, target, params)`` -> LADE loss; gradients computed in the forward (the
    backward of :class:`fastlt.heads.FusedLinearLoss` rescales them by grad_output, once)."""

    @staticmethod
    def forward(ctx, features, weight, bias, target, params: _LADEHeadParams):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        loss, dx, dw, db = _lade_pass(features, weight, bias, target, params, need_x=need_x, need_w=need_w,
                                      need_b=need_b)
        ctx.params = params
        ctx.need = (need_x, need_w, need_b)
        ctx.grads = [dx, dw, db]
        return loss


def lade_linear_loss(features, weight, target, prior, bias=None, *, alpha=0.1, remine_lambda=0.1,
                     weight_classes=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, backend="auto",
                     chunk_rows=None, chunk_classes=None) -> torch.Tensor:
    """LADE (Hong et al., CVPR 2021) on ``z = features @ weight^T + bias`` without the (N, C) logits.

    ``features`` (N, D), ``weight`` (C, D), ``bias`` (C,) or None, one float dtype; ``target`` (N,) ints;
    ``prior`` (C,) training prior pi (probabilities). ``alpha``, ``remine_lambda``, ``weight_classes``,
    ``ignore_index``, ``reduction`` ('mean' | 'sum'), ``label_smoothing`` as :func:`fastlt.functional.lade_loss`.
    ``backend``/``chunk_rows``/``chunk_classes`` as :func:`fastlt.heads.linear_cross_entropy` (class chunks by
    default whenever the rows would take more than one chunk). Returns the loss in the features' dtype."""
    _check_chunk_rows(chunk_rows)
    _check_chunk_classes(chunk_classes, chunk_rows)
    if not use_triton(backend, features):
        return reference_lade_linear_loss(features, weight, target, prior, bias, alpha=alpha,
                                          remine_lambda=remine_lambda, weight_classes=weight_classes,
                                          ignore_index=ignore_index, reduction=reduction,
                                          label_smoothing=label_smoothing)
    from ._autograd import check_kernel_input, lade_operator_args

    features, weight, bias, autocast_dev = _autocast_inputs(features, weight, bias)
    _check_head(features, weight, bias)
    check_kernel_input("features", features)
    target = V.as_index_target(target)
    proxy = features.new_empty((1, 1)).expand(features.shape[0], weight.shape[0])  # checks without the logits
    R.check_lade_args(proxy, target, prior, alpha, remine_lambda, reduction)
    R.check_operator_args(proxy, target, prior=prior, tau=1.0, cloud=None, noise_mul=0.0, noise=None, seed=None,
                          margin=None, scale=1.0, gamma=0.0, weight=weight_classes, ignore_index=ignore_index,
                          reduction=reduction, label_smoothing=label_smoothing)
    pi, args = lade_operator_args(prior, weight_classes, label_smoothing, ignore_index, reduction)
    N, C = features.shape[0], weight.shape[0]
    rows = chunk_rows if chunk_rows is not None else head_chunk_rows(
        N, features.shape[1], C, features.dtype, need_weight_grad=torch.is_grad_enabled() and weight.requires_grad)
    if chunk_classes is None and chunk_rows is None and rows < N:
        # both recompute all but the last chunk's logits; class chunks save the fp32 dW accumulator of row chunks
        chunk_classes = default_chunk_classes(N, features.dtype)
    params = _LADEHeadParams(args=args, pi=pi, alpha=float(alpha), remine_lambda=float(remine_lambda),
                             chunk_rows=max(1, min(rows, max(N, 1))), chunk_classes=chunk_classes)

    def run():
        x = features if features.stride(-1) == 1 else features.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        if torch.compiler.is_compiling():  # an opaque op with registered autograd (fastlt._head_ops)
            from ._head_ops import lade_head

            return lade_head(x, w, bias, target, params)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias)):
            return FusedLinearLADE.apply(x, w, bias, target, params)
        return _lade_pass(x, w, bias, target, params, need_x=False, need_w=False, need_b=False)[0]

    if autocast_dev is not None:
        with torch.autocast(autocast_dev, enabled=False):
            return run()
    return run()

