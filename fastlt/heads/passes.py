"""The fused heads' passes over their logits chunks: cuBLAS matmuls on bounded chunks plus the adjusted cross-entropy's
row kernel (docs/design.md, "Fused heads"). Row chunks (:func:`fused_pass`, :func:`recompute_backward`) or class
chunks (:func:`class_pass`, :func:`class_row_stats`, :func:`class_grads`); LADE's passes build on these
(:mod:`fastlt.heads.lade`).

Shapes: features ``x`` (N, D), weight ``w`` (C, D), bias ``b`` (C,) or None, targets ``y`` (N,) or class
probabilities (N, C) (a class chunk reads its columns: :func:`target_columns`). Gradients are returned for
grad_output = 1 (the autograd glue rescales them); fp32 accumulators where several chunks add up.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .._kernel_modules import kernel_module
from .._operator import AdjustedCEArgs, ChunkPlan, LadeArgs
from .plan import class_chunks, row_chunks

# the kernels (stand-ins that raise at their first use where Triton is missing: fastlt._kernel_modules)
launch = kernel_module("fastlt.kernels.launch")

__all__ = ["HeadParams", "fused_pass", "recompute_backward", "class_pass", "class_row_stats", "class_grads"]


@dataclass(frozen=True)
class HeadParams:
    """Everything but the tensor inputs of a fused head, passed as one object through autograd: the operator's
    arguments, the chunk plan, for the LADE head LADE's own arguments, and GCL's seed of the step where ``args`` were
    kept from an earlier one."""

    args: AdjustedCEArgs
    plan: ChunkPlan
    lade: LadeArgs | None = None
    seed: int | None = None  # a seed drawn for this step in place of args' (arguments kept from an earlier step)
    out_dtype: torch.dtype | None = None  # the loss's (float32 under autocast: fastlt._backend.loss_dtype); None: x's

    def loss_dtype(self, x) -> torch.dtype:
        return x.dtype if self.out_dtype is None else self.out_dtype


@functools.cache
def _fp32_out_mm_works() -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32, out=acc)`` with half-precision ``a``, ``b`` runs here (CUDA,
    recent torch): an fp32 C without a half-precision partial or an extra pass."""
    if not torch.cuda.is_available():
        return False
    try:
        a = torch.zeros((16, 16), dtype=torch.bfloat16, device="cuda")
        acc = torch.zeros((16, 16), dtype=torch.float32, device="cuda")
        torch.mm(a, a, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc (+)= a @ b`` with ``acc`` fp32 and ``a``, ``b`` of any float dtype."""
    if a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif a.is_cuda and _fp32_out_mm_works():
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif not a.is_cuda:  # the CPU has no fp32-out 16-bit mm: fp32 operands (exact products, fp32 sums), not a
        if first:        # 16-bit partial product per chunk, whose rounding grew with the number of chunks
            torch.mm(a.float(), b.float(), out=acc)
        else:
            acc.addmm_(a.float(), b.float())
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


_ROW_ALIGN = 64  # elements: padded rows keep every cuBLAS leading dimension 128-byte aligned (TMA needs 16 B)


def padded(n: int) -> int:
    return -(-n // _ROW_ALIGN) * _ROW_ALIGN


def chunk_buffer(shape, x: torch.Tensor) -> torch.Tensor:
    """Uninitialised memory for chunk logits in x's dtype and device; zeroed for bf16 on the CPU, where torch's bf16
    matmul (torch 2.13) reads the padding past a padded-row view's columns, so leftover NaN there poisons the
    result (fp16 and fp32 do not, nor does cuBLAS)."""
    cpu_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return (torch.zeros if cpu_bf16 else torch.empty)(shape, dtype=x.dtype, device=x.device)


def logits_buffer(rows: int, C: int, x: torch.Tensor) -> torch.Tensor:
    """A (rows, C) chunk buffer whose row stride is C rounded up to 64 elements (C = 8142 would leave the
    matmuls a 4-byte-aligned leading dimension, which keeps cuBLAS off its TMA kernels on Hopper)."""
    return chunk_buffer((rows, padded(C)), x)[:, :C]


def chunk_logits(buf: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w^T (+ b)`` into the first ``len(x)`` rows of ``buf``."""
    out = buf[:x.shape[0]]
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)
    return out


def row_chunk_grads(dz, xc, w, dx, dw, db, r0: int, r1: int, *, single: bool, first: bool) -> None:
    """The matmuls of one row chunk's gradient ``dz`` (R, C): ``dx[r0:r1] = dz W``, ``dw (+)= dz^T xc`` (written
    when there is a single chunk, else accumulated in fp32), ``db (+)= sum_rows dz`` (fp32; written by the first
    chunk, see :func:`grad_accumulators`). None: skipped."""
    if dx is not None:
        torch.mm(dz, w, out=dx[r0:r1])
    if dw is not None:
        if single:
            torch.mm(dz.t(), xc, out=dw)
        else:
            acc_mm(dw, dz.t(), xc, first=first)
    if db is not None:
        if first:
            torch.sum(dz, 0, dtype=torch.float32, out=db)
        else:
            db += dz.sum(0, dtype=torch.float32)


def joined(chunk_rows: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The (N,) fp32 per-row values of the row chunks in order: the chunk's own tensor when there is one (no copy),
    one concatenation otherwise."""
    if len(chunk_rows) == 1:
        return chunk_rows[0]
    return torch.cat(chunk_rows) if chunk_rows else torch.empty(0, dtype=torch.float32, device=x.device)


def grad_accumulators(C: int, D: int, x: torch.Tensor, num_chunks: int, *, need_w: bool, need_b: bool):
    """``(dw, db)`` for :func:`row_chunk_grads` (None when not needed): ``dw`` (C, D) in x's dtype for one row chunk
    (its matmul writes it), fp32 for several (accumulated); ``db`` (C,) fp32. The first chunk writes them: they are
    zero-filled only when no chunk does (an empty batch)."""
    alloc = torch.empty if num_chunks else torch.zeros
    dw = alloc((C, D), dtype=x.dtype if num_chunks == 1 else torch.float32, device=x.device) if need_w else None
    db = alloc(C, dtype=torch.float32, device=x.device) if need_b else None
    return dw, db


def cast_grads(x: torch.Tensor, dw, db):
    """``dw`` and ``db`` in the features' dtype (they may be fp32 accumulators)."""
    if dw is not None and dw.dtype != x.dtype:
        dw = dw.to(x.dtype)
    if db is not None and db.dtype != x.dtype:
        db = db.to(x.dtype)
    return dw, db


def rows_from(args, r0: int):
    """``args`` for the row chunk starting at row ``r0`` (its noise rows start ``r0`` further), kept in ``args.memo``
    so that the chunks of a later step with the same (cached) arguments reuse their launch plans; ``args`` itself
    for the first chunk."""
    if r0 == 0:
        return args
    a = args.memo.get(("rows from", r0))
    if a is None:
        a = args.memo[("rows from", r0)] = dataclasses.replace(args, noise_row_offset=args.noise_row_offset + r0)
    return a


def fused_pass(x, w, b, y, params: HeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """One pass over the row chunks. With any ``need_*`` (and reduction != 'none'): gradient in forward,
    returning the gradients for grad_output = 1. Returns ``(loss, dx, dw, db, row_stats_chunks, row_coef_chunks)``
    (the fp32 row statistics of each chunk, kept for a 'none' backward)."""
    if params.plan.classes is not None:
        return class_pass(x, w, b, y, params, need_x=need_x, need_w=need_w, need_b=need_b)
    args = params.args
    N, D = x.shape
    C = w.shape[0]
    fused = (need_x or need_w or need_b) and args.reduction != "none"
    keep_stats = (need_x or need_w or need_b) and args.reduction == "none"
    chunks = row_chunks(N, params.plan.rows)
    single = len(chunks) == 1
    # one chunk: its row kernel reduces the batch itself (launch.loss); several: one denominator for all of them
    whole = single and args.reduction != "none"
    inv = launch.inv_denominator_of(y, args) if args.reduction == "mean" and not whole else None
    buf = logits_buffer(min(params.plan.rows, N), C, x) if N else None
    row_losses = []
    loss = None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if fused and need_x else None
    dw, db = grad_accumulators(C, D, x, len(chunks), need_w=fused and need_w, need_b=fused and need_b)
    stats_chunks, coef_chunks = [], []
    for k, (r0, r1) in enumerate(chunks):
        xc = x[r0:r1]
        z = chunk_logits(buf, xc, w, b)
        a = rows_from(args, r0)
        if whole:
            loss, row_stats, row_coef = launch.loss(z, y, a, grad_out=z if fused else None, seed=params.seed)
        else:
            rows, row_stats, row_coef, _ = launch.forward(z, y[r0:r1], a, grad_out=z if fused else None,
                                                          inv_denominator=inv, seed=params.seed)
            row_losses.append(rows)
        if keep_stats:
            stats_chunks.append(row_stats)
            coef_chunks.append(row_coef)
        if fused:  # z now holds d loss / d z of these rows
            row_chunk_grads(z, xc, w, dx, dw, db, r0, r1, single=single, first=k == 0)
    dw, db = cast_grads(x, dw, db)
    if loss is None:  # 'mean' of no rows: NaN, as torch
        loss = launch.reduce(joined(row_losses, x), y, args, inv_denominator=inv)
    return loss.to(params.loss_dtype(x)), dx, dw, db, stats_chunks, coef_chunks


def recompute_backward(x, w, b, y, params: HeadParams, stats_chunks, coef_chunks, grad_output,
                       *, need_x: bool, need_w: bool, need_b: bool):
    """reduction='none': per chunk, recompute z, its gradient scaled by grad_output[rows], then the matmuls."""
    if params.plan.classes is not None:
        return class_grads(x, w, b, y, params, stats_chunks[0], coef_chunks[0], grad_output.contiguous(),
                           need_x=need_x, need_w=need_w, need_b=need_b)
    args = params.args
    N, D = x.shape
    C = w.shape[0]
    chunks = row_chunks(N, params.plan.rows)
    single = len(chunks) == 1
    go = grad_output.contiguous()
    buf = logits_buffer(min(params.plan.rows, N), C, x) if N else None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dw, db = grad_accumulators(C, D, x, len(chunks), need_w=need_w, need_b=need_b)
    for k, (r0, r1) in enumerate(chunks):
        xc = x[r0:r1]
        z = chunk_logits(buf, xc, w, b)
        a = rows_from(args, r0)
        launch.grad(z, y[r0:r1], a, stats_chunks[k], coef_chunks[k], go[r0:r1], out=z, seed=params.seed)
        row_chunk_grads(z, xc, w, dx, dw, db, r0, r1, single=single, first=k == 0)
    dw, db = cast_grads(x, dw, db)
    return dx, dw, db


def target_columns(y: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """The targets a class chunk ``[c0, c1)`` reads: class indices whole, class probabilities their columns."""
    return y[:, c0:c1] if y.is_floating_point() else y


def class_logits_view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The (rows, cols) view of the flat chunk buffer that a class chunk's logits occupy, rows 64-element aligned."""
    stride = padded(cols)
    return flat[: rows * stride].view(rows, stride)[:, :cols]


def class_logits(flat: torch.Tensor, x, w, b, c0: int, c1: int) -> torch.Tensor:
    """``x @ w[c0:c1]^T (+ b[c0:c1])`` into the (N, c1 - c0) :func:`class_logits_view` of the flat buffer."""
    out = class_logits_view(flat, x.shape[0], c1 - c0)
    if b is None:
        torch.mm(x, w[c0:c1].t(), out=out)
    else:
        torch.addmm(b[c0:c1], x, w[c0:c1].t(), out=out)
    return out


def class_row_stats(x, w, b, y, params: HeadParams, *, column_stats=None, out=None, scale_mean: bool = True):
    """Pass 1 of the class-chunked path: per class chunk ``[c0, c1)``, ``Z_k = F W_k^T`` and the row kernel's
    partials of those classes (max, sum-exp, target logit, smoothing sum); one combine launch finishes every
    row (and, with ``out``, reduces the batch into it; ``scale_mean`` as
    :func:`fastlt.kernels.launch.combine_partials`). ``column_stats`` (LADE): a
    :class:`fastlt.kernels.launch.ColumnStats` that also receives the column partials and target logits. Returns
    ``(loss_rows, row_stats, row_coef, flat)``: the rows as :func:`fastlt.kernels.launch.forward` gives them and
    ``flat`` the chunk buffer, which still holds the last chunk's logits (:func:`class_grads` starts from them)."""
    args = params.args
    N = x.shape[0]
    C = w.shape[0]
    chunks = class_chunks(C, params.plan.classes)
    flat = chunk_buffer(N * padded(min(params.plan.classes, C)), x)
    part = torch.empty((6 if y.is_floating_point() else launch.PARTIAL_PLANES, N, len(chunks)), dtype=torch.float32,
                       device=x.device)
    for k, (c0, c1) in enumerate(chunks):
        z = class_logits(flat, x, w, b, c0, c1)
        launch.chunk_partials(z, target_columns(y, c0, c1), args, part, k, col_base=c0, num_classes=C,
                              column_stats=column_stats, seed=params.seed)
    loss_rows, row_stats, row_coef = launch.combine_partials(part, y, args, C, scale_mean=scale_mean, out=out)
    return loss_rows, row_stats, row_coef, flat


def class_pass(x, w, b, y, params: HeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """Class-chunked forward (large C): :func:`class_row_stats`, then, with gradients wanted and
    reduction != 'none', pass 2 (:func:`class_grads`) in the forward. Same return as :func:`fused_pass`
    (the row statistics as one-element lists)."""
    reduced = params.args.reduction != "none"
    out = torch.empty((), dtype=params.loss_dtype(x), device=x.device) if reduced else None
    loss_rows, row_stats, row_coef, flat = class_row_stats(x, w, b, y, params, out=out)
    loss = out if reduced else loss_rows.to(params.loss_dtype(x))
    dx = dw = db = None
    if (need_x or need_w or need_b) and reduced:
        dx, dw, db = class_grads(x, w, b, y, params, row_stats, row_coef, None, need_x=need_x, need_w=need_w,
                                 need_b=need_b, flat=flat)
    return loss, dx, dw, db, [row_stats], [row_coef]


def class_grads(x, w, b, y, params: HeadParams, row_stats, row_coef, grad_output, *, need_x: bool, need_w: bool,
                need_b: bool, column_term=None, flat=None):
    """Pass 2 over the class chunks, last chunk first: recompute ``Z_k``, write ``dZ_k`` over it (times
    ``grad_output`` when given), ``dW_k = dZ_k^T F`` and ``db_k`` straight into their rows (no accumulator),
    ``dF += dZ_k W_k`` (an (N, D) fp32 accumulator when there is more than one chunk and the dtype is half
    precision). ``column_term``: LADE's (C,) column vectors, see :func:`fastlt.kernels.launch.grad`. ``flat``:
    pass 1's chunk buffer (:func:`class_row_stats`), whose last chunk's logits are not recomputed (one chunk: no
    logits matmul at all); None: a fresh buffer, every chunk computed."""
    args = params.args
    N, D = x.shape
    C = w.shape[0]
    chunks = class_chunks(C, params.plan.classes)
    single = len(chunks) == 1
    reuse = flat is not None
    if flat is None:
        flat = chunk_buffer(N * padded(min(params.plan.classes, C)), x)
    dx = None
    if need_x:
        dx = torch.empty((N, D), dtype=x.dtype if single or x.dtype == torch.float32 else torch.float32,
                         device=x.device)
        if not chunks:
            dx.zero_()
    dw = torch.empty((C, D), dtype=x.dtype, device=x.device) if need_w else None
    db = torch.empty(C, dtype=x.dtype, device=x.device) if need_b else None
    last = len(chunks) - 1
    for k in reversed(range(len(chunks))):
        c0, c1 = chunks[k]
        if reuse and k == last:
            z = class_logits_view(flat, N, c1 - c0)
        else:
            z = class_logits(flat, x, w, b, c0, c1)
        launch.grad(z, target_columns(y, c0, c1), args, row_stats, row_coef, grad_output, column_term=column_term,
                    out=z, col_base=c0, num_classes=C, seed=params.seed)
        if dx is not None:
            if single:
                torch.mm(z, w[c0:c1], out=dx)
            else:
                acc_mm(dx, z, w[c0:c1], first=k == last)
        if dw is not None:
            torch.mm(z.t(), x, out=dw[c0:c1])
        if db is not None:
            db[c0:c1] = z.sum(0, dtype=torch.float32)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, dw, db
