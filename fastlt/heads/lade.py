"""LADE's passes on a linear head: ``PriorCE(z) + alpha * LADER(z)`` with ``z = features @ weight^T + bias``, never
holding the (N, C) logits (docs/design.md, "Fused heads").

LADER needs column statistics over the whole batch (per-class target sums and counts, and the batch-direction
log-sum-exp of every column) before any gradient exists, so the fused path takes two passes over the row chunks of
:mod:`fastlt.heads.passes`:

1. per chunk: ``z = F_chunk W^T (+ b)`` (cuBLAS), then the row kernel with ``COLUMN_STATS`` computes the PriorCE
   row losses and row statistics, the rows' target logits, and the chunk's column (max, sum-exp) partials, merged
   into running (2, C) fp32 statistics (no atomics: deterministic);
2. LADER and its gradient vectors from the merged statistics; then per chunk, last chunk first: ``z`` (recomputed,
   except for the last chunk, whose logits pass 1 left in the buffer), ``d loss / d z`` written over it (row term
   plus LADER's column term), ``dF = dZ W``, ``dW += dZ^T F``.

With K chunks that is ``(6 + 2 (K - 1) / K) N D C`` FLOPs: for a batch that fits one chunk (the usual case:
4096 x 8142 bf16 is 67 MB) it is ``6 N D C``, as the CE heads, and the forward is LADE's own two launches
(:func:`fastlt.kernels.lade.forward`). When the rows take more than one chunk (or ``chunk_classes=`` is given)
the classes are chunked instead (:func:`lade_class_pass`): each class chunk sees every row, so its column
statistics are complete at once; the same FLOPs, but ``dW`` is written per class chunk with no fp32 accumulator.
"""

from __future__ import annotations

import torch

from .._kernel_modules import kernel_module
from .passes import (
    HeadParams,
    cast_grads,
    chunk_logits,
    class_grads,
    class_row_stats,
    grad_accumulators,
    joined,
    logits_buffer,
    row_chunk_grads,
)
from .plan import row_chunks

# the kernels (stand-ins that raise at their first use where Triton is missing: fastlt._kernel_modules)
lade_kernels = kernel_module("fastlt.kernels.lade")
launch = kernel_module("fastlt.kernels.launch")

__all__ = ["lade_pass", "lade_class_pass"]


def lade_pass(x, w, b, y, params: HeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """Both passes; returns ``(loss, dx, dw, db)`` with the gradients for grad_output = 1 (None if not needed)."""
    if params.plan.classes is not None:
        return lade_class_pass(x, w, b, y, params, need_x=need_x, need_w=need_w, need_b=need_b)
    args, lade = params.args, params.lade
    N, D = x.shape
    C = w.shape[0]
    chunks = row_chunks(N, params.plan.rows)
    single = len(chunks) == 1
    buf = logits_buffer(min(params.plan.rows, N), C, x) if N else None
    if single:  # the whole batch at once: LADE's own two launches (the finish's last program reduces the loss)
        z = chunk_logits(buf, x, w, b)
        loss, row_stats, row_coef, terms = lade_kernels.forward(z, y, lade.prior, lade.alpha, lade.remine_lambda,
                                                                args, out_dtype=params.loss_dtype(x))
        chunk_stats, column_term = [(row_stats, row_coef)], terms.column_term
    else:
        inv = launch.inv_denominator_of(y, args) if args.reduction == "mean" else None
        row_losses, target_logits, chunk_stats, stats = [], [], [], None
        for r0, r1 in chunks:
            z = chunk_logits(buf, x[r0:r1], w, b)
            rows, row_stats, row_coef, cols = launch.forward(z, y[r0:r1], args, column_stats=True,
                                                             inv_denominator=inv)
            row_losses.append(rows)
            target_logits.append(cols.target_logits)
            chunk_stats.append((row_stats, row_coef))
            stats = lade_kernels.merge_partials(cols.partials, into=stats)
        loss, column_term = _lade_total(joined(row_losses, x), inv, stats, joined(target_logits, x), y, params)
        loss = loss.to(params.loss_dtype(x))

    dx = dw = db = None
    if not (need_x or need_w or need_b):
        return loss, dx, dw, db
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dw, db = grad_accumulators(C, D, x, len(chunks), need_w=need_w, need_b=need_b)
    # last chunk first: pass 1 left its logits in the buffer (the row kernel only reads them), so it is not
    # recomputed; with one chunk, no logits matmul is repeated (6 N D C FLOPs, as the CE heads)
    for k in reversed(range(len(chunks))):
        r0, r1 = chunks[k]
        xc = x[r0:r1]
        z = buf[: r1 - r0] if k == len(chunks) - 1 else chunk_logits(buf, xc, w, b)
        row_stats, row_coef = chunk_stats[k]
        launch.grad(z, y[r0:r1], args, row_stats, row_coef, None, column_term=column_term, out=z)
        row_chunk_grads(z, xc, w, dx, dw, db, r0, r1, single=single, first=k == len(chunks) - 1)
    dw, db = cast_grads(x, dw, db)
    return loss, dx, dw, db


def _lade_total(loss_rows, inv, stats, target_logits, y, params: HeadParams):
    """``PriorCE + alpha * LADER`` (fp32, 0-dim) from the rows' losses, the column (max, sum-exp) statistics,
    merged (2, C) or per row block (2, R, C) (None for an empty batch), and the rows' target logits; and
    LADER's column term for the gradient pass (None for an empty batch)."""
    args, lade = params.args, params.lade
    if stats is None:
        return launch.reduce(loss_rows, y, args, inv_denominator=inv), None
    terms = lade_kernels.finish(stats, y, target_logits, lade.prior, args.ignore_index, lade.remine_lambda,
                                lade.alpha)
    return launch.reduce(loss_rows, y, args, inv_denominator=inv, extra=terms.parts), terms.column_term


def lade_class_pass(x, w, b, y, params: HeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """Class-chunked LADE: every class chunk sees all rows, so its column statistics are complete at once.
    Pass 1 (:func:`fastlt.heads.passes.class_row_stats` with a column-statistics buffer, the factors left without
    'mean''s denominator); then LADER's finish, whose last program reduces PriorCE's rows plus LADER into the loss
    (as :func:`fastlt.kernels.lade.forward`); pass 2 (:func:`fastlt.heads.passes.class_grads` with LADER's column
    term, last chunk first, from the logits pass 1 left in the buffer) writes ``dW_k`` per chunk with no fp32
    accumulator."""
    args, lade = params.args, params.lade
    N = x.shape[0]
    cols = launch.new_column_stats(N, w.shape[0], x.device, soft=y.is_floating_point())
    loss = torch.empty((), dtype=params.loss_dtype(x), device=x.device)
    loss_rows, row_stats, row_coef, flat = class_row_stats(x, w, b, y, params, column_stats=cols, scale_mean=False)
    column_term = None
    if N == 0:  # no row, no LADER: the 'mean' of no rows is NaN, as torch's
        launch.reduce(loss_rows, y, args, out=loss)
    else:
        column_term = lade_kernels.finish(cols.partials, y, cols.target_logits, lade.prior, args.ignore_index,
                                          lade.remine_lambda, lade.alpha,
                                          rows=lade_kernels.PriorCERows(loss_rows, row_coef, args, loss)).column_term
    dx = dw = db = None
    if need_x or need_w or need_b:
        dx, dw, db = class_grads(x, w, b, y, params, row_stats, row_coef, None, need_x=need_x, need_w=need_w,
                                 need_b=need_b, column_term=column_term, flat=flat)
    return loss, dx, dw, db
