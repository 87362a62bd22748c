"""Fused linear and cosine classifier heads: features in, loss out, never the (N, C) logits (SPEC 5).

A head replaces ``nn.Linear`` (or a cosine classifier) plus a long-tail loss. Public API:

- functional: :func:`linear_cross_entropy` (``z = f W^T + b``) and :func:`cosine_cross_entropy`
  (``z = <f_i/|f_i|, w_j/|w_j|>``), each applying the whole SPEC 2.4 operator on ``z`` (prior offset
  ``tau * prior``, GCL cloud ``noise_mul * cloud`` with in-kernel noise, target margin, scale ``s``,
  class weights, ``ignore_index``, reductions, label smoothing, focal ``gamma``);
- their unfused oracles :func:`reference_linear_cross_entropy` / :func:`reference_cosine_cross_entropy`
  (matmul, then :func:`fastlt.reference.adjusted_cross_entropy`; autograd does the rest);
- modules :class:`LinearLossHead` (CE / logit adjustment / Balanced Softmax / LDAM) and
  :class:`CosineGCLHead` (GCL), with ``forward(features, target) -> loss``, ``logits(features)`` and a
  row-chunked ``topk(features, k)`` for inference.

How the fused path works (``backend='triton'``, or ``'auto'`` on CUDA tensors)
---------------------------------------------------------------------------
The class dimension is handled by **cuBLAS matmuls on bounded row chunks plus the fused row kernel**,
not by one ``tl.dot`` kernel. For each chunk of ``R`` rows (``chunk_rows``; by default
:func:`head_chunk_rows`: the whole batch when its ``(N, C)`` buffer fits in 512 MiB plus the fp32 dW
accumulator that row chunks would need, else the largest multiple of 64 whose ``(R, C)`` buffer fits in 512 MiB,
at least 1 row):

1. ``Z = F_chunk @ W^T (+ b)`` with ``torch.mm``/``torch.addmm`` (cuBLAS, fp32 accumulation), into one
   reused ``(R, C)`` buffer in the input dtype;
2. the row-operator kernel (:func:`fastlt.kernels.launch.forward`) computes the per-row losses and, in
   the same pass, overwrites the buffer with ``d loss / d Z`` (gradient in forward). The GCL noise of
   element (i, j) is a function of (seed, global row i, column j) — the kernel is told the chunk's first
   row — so the result does not depend on the chunking, and the 'mean' denominator is the whole
   batch's (computed once on the device: no host synchronisation anywhere);
3. still in the forward: ``dF_chunk = dZ @ W``, ``dW += dZ^T @ F_chunk``, ``db += dZ.sum(0)`` (``dW``
   and ``db`` accumulated in fp32 when there is more than one chunk, cast at the end).

The backward only multiplies the saved ``dF`` and ``dW`` by ``grad_output`` (on the device, skipped when
it is 1). With ``reduction='none'`` the upstream gradient differs per row and must scale ``dZ`` before
the matmuls, so the forward keeps only the fp32 row statistics and the backward recomputes each chunk's
logits and gradient (:func:`fastlt.kernels.launch.grad`) and does the matmuls there.

**Class chunks, for very large C.** With many row chunks, step 3's fp32 ``dW`` accumulator (``C x D``)
is read and written once per chunk: at 1024 x 1024 -> 1M bf16, 8 chunks of 128 rows move ~12 GB each,
3x the matmul time (measured: 5.6x the matmul floor). So when that traffic would cost more than the
recomputed logits matmuls (:func:`_prefer_class_chunks`, by count; or ``chunk_classes=`` explicitly) the head
chunks the classes instead, ``[c0, c1)`` of ``chunk_classes`` (a multiple of 8; by default an (N, cols)
buffer of <= 512 MiB): pass 1 computes ``Z_k = F W_k^T`` per chunk and the row kernel writes each row's
partial (max, sum-exp, target logit, smoothing sum) of those classes; one combine launch finishes every
row; pass 2, last chunk first, recomputes ``Z_k`` (all but the last chunk's, which pass 1 left in the buffer),
writes ``dZ_k`` over it, ``dW_k = dZ_k^T F`` straight into its rows (no accumulator) and ``dF += dZ_k W_k``
((N, D) fp32). With K chunks, ``(6 + 2 (K - 1) / K) N D C`` FLOPs instead of 6, memory O(N * cols).

Why not a single fused ``tl.dot`` kernel: the work is the three matmuls (``6 N D C`` FLOPs); cuBLAS
(wgmma on Hopper) runs them near peak for every shape, which a hand-written Triton matmul that also
carries the loss epilogue does not match, while the extra HBM traffic of the chunk buffer
(write ``Z``, read it, write ``dZ``, read it twice, ``~5 R C`` bytes per chunk) is small next to the
matmul time for ``D`` in the hundreds or more. Memory stays independent of ``N * C``:

    extra memory = R * C * bytes(dtype)                  (one logits / gradient chunk)
                 + (N + C) * D * bytes(dtype)            (dF and dW, held from forward to backward)
                 + C * D * 4   [more than one chunk and bf16/fp16 only: the fp32 dW accumulator]
                 + O(N + C) fp32                         (row statistics, db)

i.e. O(N*D + C*D + R*C), and by default ``R * C * bytes + [C * D * 4] <= 512 MiB + C * D * 4``: one chunk of
the whole batch up to that bound, since it costs no more than a chunk and the accumulator it spares.

The cosine head adds the normalised copies ``F_hat`` (N, D) and ``W_hat`` (C, D) in the input dtype and
the (N + C) fp32 inverse norms; the norms are computed once, in fp32, and the gradient flows through the
normalisation (``(g - y <g, y>) / |x|`` per row, recomputed from the saved input and inverse norm), each
direction one Triton pass (:mod:`fastlt.kernels.row_normalize`).

bf16/fp16 features and weights: the matmuls accumulate in fp32 (cuBLAS), the row statistics and
losses are fp32, gradients are stored in the input dtype (as every fastlt kernel does).

Under ``torch.compile`` the same passes run as ``torch.library`` custom ops (:mod:`fastlt._head_ops`), so a compiled
model that holds a head has no graph break; there the backward multiplies the forward's gradients by
grad_output out of place (eager: in place, skipped on the device when it is 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as V
from . import reference as R
from ._count_buffers import CountBuffers, CountParameter
from ._first_order import first_order
from .functional import use_triton
from .priors import gcl_cloud_from, ldam_margins_from, log_prior_from, prior_from

__all__ = [
    "linear_cross_entropy",
    "cosine_cross_entropy",
    "reference_linear_cross_entropy",
    "reference_cosine_cross_entropy",
    "LinearLossHead",
    "CosineGCLHead",
    "default_chunk_rows",
    "head_chunk_rows",
]

# Target size of one (rows, C) logits chunk. Every row chunk after the first reads and writes the (C, D) fp32 dW
# accumulator once (8 C D bytes): at 4096 x 1024 -> 131072 bf16, 256 MiB chunks (4 of them) moved ~3.2 GB for it,
# ~1 ms of the 6.87 ms step measured on an H100; 512 MiB chunks (2) move ~1.1 GB, for 256 MiB more buffer.
CHUNK_BYTES = 512 << 20
_HEAD_LOSSES = ("ce", "la", "balanced_softmax", "ldam", "lade")


def default_chunk_rows(num_classes: int, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a (rows, C) buffer of ``dtype`` is at most ``chunk_bytes`` (>= 1 row;
    a multiple of 64 from 64 rows up, a friendly M for the matmuls)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, chunk_bytes // (max(num_classes, 1) * itemsize))
    return rows - rows % 64 if rows >= 64 else rows


def head_chunk_rows(num_rows: int, in_features: int, num_classes: int, dtype: torch.dtype, *,
                    need_weight_grad: bool = True, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk of a fused head when ``chunk_rows`` is not given: the whole batch when its (N, C) buffer takes
    no more than a chunk plus the (C, D) fp32 dW accumulator that several row chunks of a half-precision head
    would need (``4 C D`` bytes) — the same peak memory, without the accumulator's traffic (read and written once
    per extra chunk, then cast) or the logits that class chunks recompute; else :func:`default_chunk_rows`. At
    4096 x 1024 -> 131072 bf16 that is one 1 GiB chunk instead of two of 512 MiB and a 512 MiB accumulator."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    accumulator = 4 * num_classes * in_features if need_weight_grad and itemsize < 4 else 0
    if num_rows * num_classes * itemsize <= chunk_bytes + accumulator:
        return max(num_rows, 1)
    return default_chunk_rows(num_classes, dtype, chunk_bytes)


# --- validation -----------------------------------------------------------------------------------------------

def _check_matrix(name: str, t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape {what}, got shape {tuple(t.shape)}")
    if t.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_head(features, weight, bias) -> None:
    _check_matrix("features", features, "(N, D)")
    _check_matrix("weight", weight, "(C, D)")
    N, D = features.shape
    C = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"weight must have shape (C, D) with D = {D} (features.shape[1]), got {tuple(weight.shape)}")
    if C < 1:
        raise ValueError(f"weight must have at least one class (C >= 1), got shape {tuple(weight.shape)}")
    if weight.dtype != features.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but features have {features.dtype}; they must match "
                        "(cast one, or run under torch.autocast)")
    if weight.device != features.device:
        raise ValueError(f"weight is on {weight.device} but features are on {features.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != C:
            raise ValueError(f"bias must have shape (C,) = ({C},), got {tuple(bias.shape)}")
        if bias.dtype != features.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but features have {features.dtype}; they must match")
        if bias.device != features.device:
            raise ValueError(f"bias is on {bias.device} but features are on {features.device}")


def _check_chunk_rows(chunk_rows) -> None:
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")


def _check_chunk_classes(chunk_classes, chunk_rows) -> None:
    if chunk_classes is None:
        return
    if isinstance(chunk_classes, bool) or not isinstance(chunk_classes, int) or chunk_classes < 8 or chunk_classes % 8:
        raise ValueError(f"chunk_classes must be a positive multiple of 8 or None, got {chunk_classes!r}")
    if chunk_rows is not None:
        raise ValueError("give chunk_rows or chunk_classes, not both (they pick the row- or the class-chunked path)")


def _check_operator(features, weight, target, op: dict) -> None:
    """The SPEC 2.4 argument checks of :func:`fastlt.reference.check_operator_args` (``op`` as built by
    ``_op_kwargs``), on an (N, C) stand-in for the logits: a broadcast scalar, no memory."""
    kw = {k: v for k, v in op.items() if k != "weight_classes"}
    kw.setdefault("noise", None)
    proxy = features.new_empty((1, 1)).expand(features.shape[0], weight.shape[0])
    R.check_operator_args(proxy, target, weight=op["weight_classes"], **kw)


# --- reference path (the oracle) -------------------------------------------------------------------------------

def _normalize_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(|x|, eps)`` per row, in at least fp32 (fp64 stays fp64), cast back to ``x``'s dtype."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    return F.normalize(x.to(cdt), dim=1, eps=eps).to(x.dtype)


def reference_linear_cross_entropy(features, weight, target, bias=None, *, prior=None, tau=1.0, margin=None,
                                   scale=1.0, cloud=None, noise_mul=0.0, seed=None, noise=None, gamma=0.0,
                                   weight_classes=None, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0) -> torch.Tensor:
    """Unfused oracle: ``z = features @ weight^T + bias``, then :func:`fastlt.reference.adjusted_cross_entropy`
    on ``z`` (materialises (N, C); gradients by autograd). ``weight_classes`` are the per-class loss weights;
    ``noise`` (N, C) replaces the noise drawn from ``seed`` (hand it the kernel's noise for exact checks)."""
    _check_head(features, weight, bias)
    target = V.as_index_target(target)
    logits = F.linear(features, weight, bias)
    return R.adjusted_cross_entropy(logits, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul,
                                    noise=noise, seed=seed, margin=margin, scale=scale, gamma=gamma,
                                    weight=weight_classes, ignore_index=ignore_index, reduction=reduction,
                                    label_smoothing=label_smoothing)


def reference_cosine_cross_entropy(features, weight, target, *, prior=None, tau=1.0, margin=None, scale=1.0,
                                   cloud=None, noise_mul=0.0, seed=None, noise=None, gamma=0.0,
                                   weight_classes=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   eps=1e-12) -> torch.Tensor:
    """Unfused oracle of the cosine head: ``cos = normalize(f) @ normalize(W)^T`` (normalised in at least fp32,
    then cast back), then :func:`fastlt.reference.adjusted_cross_entropy` on ``cos``."""
    _check_head(features, weight, None)
    V.check_finite_float("eps", eps, min_value=0.0, min_inclusive=False)
    target = V.as_index_target(target)
    cos = F.linear(_normalize_ref(features, eps), _normalize_ref(weight, eps))
    return R.adjusted_cross_entropy(cos, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul,
                                    noise=noise, seed=seed, margin=margin, scale=scale, gamma=gamma,
                                    weight=weight_classes, ignore_index=ignore_index, reduction=reduction,
                                    label_smoothing=label_smoothing)


# --- fused path: chunked matmuls + the row kernel ---------------------------------------------------------------

@dataclass(frozen=True)
class _HeadParams:
    """Everything non-tensor-input of the fused head, passed as one object through autograd."""

    args: object  # fastlt.kernels.launch.RowOperatorArgs (imported lazily: triton may be absent)
    chunk_rows: int
    chunk_classes: int | None = None  # set: chunk the classes instead of the rows (see _class_pass)


_OUT_DTYPE_MM = {"ok": None}  # does torch.addmm(..., out_dtype=float32, out=acc) work here (CUDA)? probed once


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc (+)= a @ b`` with ``acc`` fp32 and ``a``, ``b`` of any float dtype."""
    if a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if a.is_cuda and _OUT_DTYPE_MM["ok"] is not False:
        try:  # cuBLAS with an fp32 C: no half-precision partial, no extra pass
            if first:
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_MM["ok"] = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM["ok"] = False
    if first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


def _chunks(N: int, rows: int):
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


_ROW_ALIGN = 64  # elements: padded rows keep every cuBLAS leading dimension 128-byte aligned (TMA needs 16 B)


def _padded(n: int) -> int:
    return -(-n // _ROW_ALIGN) * _ROW_ALIGN


def _chunk_buffer(shape, x: torch.Tensor) -> torch.Tensor:
    """Uninitialised memory for chunk logits in x's dtype and device; zeroed for bf16 on the CPU, where torch's bf16
    matmul (torch 2.13) reads the padding past a padded-row view's columns, so leftover NaN there poisons the
    result (fp16 and fp32 do not, nor does cuBLAS)."""
    cpu_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return (torch.zeros if cpu_bf16 else torch.empty)(shape, dtype=x.dtype, device=x.device)


def _logits_buffer(rows: int, C: int, x: torch.Tensor) -> torch.Tensor:
    """A (rows, C) chunk buffer whose row stride is C rounded up to 64 elements (C = 8142 would leave the
    matmuls a 4-byte-aligned leading dimension, which keeps cuBLAS off its TMA kernels on Hopper)."""
    return _chunk_buffer((rows, _padded(C)), x)[:, :C]


def _chunk_logits(buf: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[0]
    out = buf[:n]
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)
    return out


def _row_chunk_grads(dz, xc, w, dx, dw, db, r0: int, r1: int, *, single: bool, first: bool) -> None:
    """The matmuls of one row chunk's gradient ``dz`` (R, C): ``dx[r0:r1] = dz W``, ``dw (+)= dz^T xc`` (written
    when there is a single chunk, else accumulated in fp32), ``db (+)= sum_rows dz`` (fp32; written by the first
    chunk, see :func:`_grad_accumulators`). None: skipped."""
    if dx is not None:
        torch.mm(dz, w, out=dx[r0:r1])
    if dw is not None:
        if single:
            torch.mm(dz.t(), xc, out=dw)
        else:
            _acc_mm(dw, dz.t(), xc, first=first)
    if db is not None:
        if first:
            torch.sum(dz, 0, dtype=torch.float32, out=db)
        else:
            db += dz.sum(0, dtype=torch.float32)


def _joined(chunk_rows: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The (N,) fp32 per-row values of the row chunks in order: the chunk's own tensor when there is one (no copy),
    one concatenation otherwise."""
    if len(chunk_rows) == 1:
        return chunk_rows[0]
    return torch.cat(chunk_rows) if chunk_rows else torch.empty(0, dtype=torch.float32, device=x.device)


def _grad_accumulators(C: int, D: int, x: torch.Tensor, num_chunks: int, *, need_w: bool, need_b: bool):
    """``(dw, db)`` for :func:`_row_chunk_grads` (None when not needed): ``dw`` (C, D) in x's dtype for one row chunk
    (its matmul writes it), fp32 for several (accumulated); ``db`` (C,) fp32. The first chunk writes them: they are
    zero-filled only when no chunk does (an empty batch)."""
    alloc = torch.empty if num_chunks else torch.zeros
    dw = alloc((C, D), dtype=x.dtype if num_chunks == 1 else torch.float32, device=x.device) if need_w else None
    db = alloc(C, dtype=torch.float32, device=x.device) if need_b else None
    return dw, db


def _fused_pass(x, w, b, y, params: _HeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """One pass over the row chunks. With any ``need_*`` (and reduction != 'none'): gradient in forward,
    returning the gradients for grad_output = 1. Returns ``(loss, dx, dw, db, lse_chunks, factor_chunks)``."""
    from .kernels import launch

    if params.chunk_classes is not None:
        return _class_pass(x, w, b, y, params, need_x=need_x, need_w=need_w, need_b=need_b)
    args = params.args
    N, D = x.shape
    C = w.shape[0]
    fused = (need_x or need_w or need_b) and args.reduction != "none"
    keep_stats = (need_x or need_w or need_b) and args.reduction == "none"
    chunks = _chunks(N, params.chunk_rows)
    single = len(chunks) == 1
    # one chunk: its row kernel reduces the batch itself (launch.loss); several: one denominator for all of them
    whole = single and args.reduction != "none"
    inv = launch.inv_denominator_of(y, args) if args.reduction == "mean" and not whole else None
    buf = _logits_buffer(min(params.chunk_rows, N), C, x) if N else None
    row_losses = []
    loss = None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if fused and need_x else None
    dw, db = _grad_accumulators(C, D, x, len(chunks), need_w=fused and need_w, need_b=fused and need_b)
    lse_chunks, factor_chunks = [], []
    for k, (r0, r1) in enumerate(chunks):
        xc = x[r0:r1]
        z = _chunk_logits(buf, xc, w, b)
        a = dataclasses.replace(args, noise_row_offset=r0)
        if whole:
            loss, lse, factor = launch.loss(z, y, a, grad_out=z if fused else None)
        else:
            rows, lse, factor, _ = launch.forward(z, y[r0:r1], a, grad_out=z if fused else None,
                                                  inv_denominator=inv)
            row_losses.append(rows)
        if keep_stats:
            lse_chunks.append(lse)
            factor_chunks.append(factor)
        if fused:  # z now holds d loss / d z of these rows
            _row_chunk_grads(z, xc, w, dx, dw, db, r0, r1, single=single, first=k == 0)
    if dw is not None and dw.dtype != x.dtype:
        dw = dw.to(x.dtype)
    if db is not None:
        db = db.to(x.dtype)
    if loss is None:  # 'mean' of no rows: NaN, as torch
        loss = launch.reduce(_joined(row_losses, x), y, args, inv_denominator=inv)
    return loss.to(x.dtype), dx, dw, db, lse_chunks, factor_chunks


def _recompute_backward(x, w, b, y, params: _HeadParams, lse_chunks, factor_chunks, grad_output,
                        *, need_x: bool, need_w: bool, need_b: bool):
    """reduction='none': per chunk, recompute z, its gradient scaled by grad_output[rows], then the matmuls."""
    from .kernels import launch

    if params.chunk_classes is not None:
        return _class_grads(x, w, b, y, params, lse_chunks[0], factor_chunks[0], grad_output.contiguous(),
                            need_x=need_x, need_w=need_w, need_b=need_b)

    args = params.args
    N, D = x.shape
    C = w.shape[0]
    chunks = _chunks(N, params.chunk_rows)
    single = len(chunks) == 1
    go = grad_output.contiguous()
    buf = _logits_buffer(min(params.chunk_rows, N), C, x) if N else None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dw, db = _grad_accumulators(C, D, x, len(chunks), need_w=need_w, need_b=need_b)
    for k, (r0, r1) in enumerate(chunks):
        xc = x[r0:r1]
        z = _chunk_logits(buf, xc, w, b)
        a = dataclasses.replace(args, noise_row_offset=r0)
        launch.grad(z, y[r0:r1], a, lse_chunks[k], factor_chunks[k], go[r0:r1], out=z)
        _row_chunk_grads(z, xc, w, dx, dw, db, r0, r1, single=single, first=k == 0)
    if dw is not None and dw.dtype != x.dtype:
        dw = dw.to(x.dtype)
    return dx, dw, (db.to(x.dtype) if db is not None else None)


def _class_chunks(C: int, cols: int):
    return [(c0, min(C, c0 + cols)) for c0 in range(0, C, cols)]


def _class_logits_view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The (rows, cols) view of the flat chunk buffer that a class chunk's logits occupy, rows 64-element aligned."""
    stride = _padded(cols)
    return flat[: rows * stride].view(rows, stride)[:, :cols]


def _class_logits(flat: torch.Tensor, x, w, b, c0: int, c1: int) -> torch.Tensor:
    """``x @ w[c0:c1]^T (+ b[c0:c1])`` into the (N, c1 - c0) :func:`_class_logits_view` of the flat buffer."""
    out = _class_logits_view(flat, x.shape[0], c1 - c0)
    if b is None:
        torch.mm(x, w[c0:c1].t(), out=out)
    else:
        torch.addmm(b[c0:c1], x, w[c0:c1].t(), out=out)
    return out


def _class_row_stats(x, w, b, y, params, *, column_stats=None, out=None, scale_mean: bool = True):
    """Pass 1 of the class-chunked path: per class chunk ``[c0, c1)``, ``Z_k = F W_k^T`` and the row kernel's
    partials of those classes (max, sum-exp, target logit, smoothing sum); one combine launch finishes every
    row (and, with ``out``, reduces the batch into it; ``scale_mean`` as
    :func:`fastlt.kernels.launch.combine_partials`). ``column_stats`` (LADE): a
    :class:`fastlt.kernels.launch.ColumnStats` that also receives the column partials and target logits. Returns
    ``(loss_rows, lse, factor, flat)``: the rows as :func:`fastlt.kernels.launch.forward` gives them and ``flat``
    the chunk buffer, which still holds the last chunk's logits (:func:`_class_grads` starts from them)."""
    from .kernels import launch

    args = params.args
    N = x.shape[0]
    C = w.shape[0]
    chunks = _class_chunks(C, params.chunk_classes)
    flat = _chunk_buffer(N * _padded(min(params.chunk_classes, C)), x)
    part = torch.empty((4, N, len(chunks)), dtype=torch.float32, device=x.device)
    for k, (c0, c1) in enumerate(chunks):
        z = _class_logits(flat, x, w, b, c0, c1)
        launch.chunk_partials(z, y, args, part, k, col_base=c0, num_classes=C, column_stats=column_stats)
    loss_rows, lse, factor = launch.combine_partials(part, y, args, C, scale_mean=scale_mean, out=out)
    return loss_rows, lse, factor, flat


def _class_pass(x, w, b, y, params: _HeadParams, *, need_x: bool, need_w: bool, need_b: bool):
    """Class-chunked forward (large C): :func:`_class_row_stats`, then, with gradients wanted and
    reduction != 'none', pass 2 (:func:`_class_grads`) in the forward. Same return as :func:`_fused_pass`
    (the row statistics as one-element lists)."""
    reduced = params.args.reduction != "none"
    out = torch.empty((), dtype=x.dtype, device=x.device) if reduced else None
    loss_rows, lse, factor, flat = _class_row_stats(x, w, b, y, params, out=out)
    loss = out if reduced else loss_rows.to(x.dtype)
    dx = dw = db = None
    if (need_x or need_w or need_b) and reduced:
        dx, dw, db = _class_grads(x, w, b, y, params, lse, factor, None, need_x=need_x, need_w=need_w,
                                  need_b=need_b, flat=flat)
    return loss, dx, dw, db, [lse], [factor]


def _class_grads(x, w, b, y, params, lse, factor, grad_output, *, need_x: bool, need_w: bool, need_b: bool,
                 column_term=None, flat=None):
    """Pass 2 over the class chunks, last chunk first: recompute ``Z_k``, write ``dZ_k`` over it (times
    ``grad_output`` when given), ``dW_k = dZ_k^T F`` and ``db_k`` straight into their rows (no accumulator),
    ``dF += dZ_k W_k`` (an (N, D) fp32 accumulator when there is more than one chunk and the dtype is half
    precision). ``column_term``: LADE's (C,) column vectors, see :func:`fastlt.kernels.launch.grad`. ``flat``:
    pass 1's chunk buffer (:func:`_class_row_stats`), whose last chunk's logits are not recomputed (one chunk: no
    logits matmul at all); None: a fresh buffer, every chunk computed."""
    from .kernels import launch

    args = params.args
    N, D = x.shape
    C = w.shape[0]
    chunks = _class_chunks(C, params.chunk_classes)
    single = len(chunks) == 1
    reuse = flat is not None
    if flat is None:
        flat = _chunk_buffer(N * _padded(min(params.chunk_classes, C)), x)
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
            z = _class_logits_view(flat, N, c1 - c0)
        else:
            z = _class_logits(flat, x, w, b, c0, c1)
        launch.grad(z, y, args, lse, factor, grad_output, column_term=column_term, out=z, col_base=c0,
                    num_classes=C)
        if dx is not None:
            if single:
                torch.mm(z, w[c0:c1], out=dx)
            else:
                _acc_mm(dx, z, w[c0:c1], first=k == last)
        if dw is not None:
            torch.mm(z.t(), x, out=dw[c0:c1])
        if db is not None:
            db[c0:c1] = z.sum(0, dtype=torch.float32)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, dw, db


# Nominal H100 ratio of bf16 matmul rate to HBM bandwidth (725 TFLOP/s / 3.0 TB/s), for the choice below.
_FLOP_PER_BYTE = 725e12 / 3.0e12


def _prefer_class_chunks(N: int, D: int, C: int, rows: int, cols: int) -> bool:
    """Row chunks of ``rows`` cost the fp32 dW accumulator, read and written once per extra chunk (``8 C D`` bytes
    each); K class chunks of ``cols`` cost the logits matmuls of all but the last chunk again
    (``2 N D C (K - 1) / K`` FLOPs). Pick the cheaper, by count."""
    extra_row_chunks = math.ceil(N / max(rows, 1)) - 1
    K = math.ceil(C / max(cols, 1))
    return extra_row_chunks * 8 * C * D * _FLOP_PER_BYTE * K > 2 * N * D * C * (K - 1)


def default_chunk_classes(num_rows: int, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Classes per chunk of the class-chunked path: an (N, cols) buffer of at most ``chunk_bytes``, a multiple
    of 128 (at least 128)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    cols = chunk_bytes // (max(num_rows, 1) * itemsize)
    return max(128, cols - cols % 128)


class FusedLinearLoss(torch.autograd.Function):
    """``apply(features, weight, bias, target, params)`` -> loss (input dtype); see the module docstring.

    For 'mean'/'sum' the gradients are computed in the forward and the backward rescales them in place by
    grad_output, so the graph cannot be backpropagated twice (``retain_graph=True`` then raises)."""

    @staticmethod
    def forward(ctx, features, weight, bias, target, params: _HeadParams):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        loss, dx, dw, db, lse_chunks, factor_chunks = _fused_pass(features, weight, bias, target, params,
                                                                  need_x=need_x, need_w=need_w, need_b=need_b)
        ctx.params = params
        ctx.need = (need_x, need_w, need_b)
        if params.args.reduction == "none":
            ctx.save_for_backward(features, weight, bias, target)
            ctx.stats = (lse_chunks, factor_chunks)
        else:
            ctx.grads = [dx, dw, db]
        return loss

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        need_x, need_w, need_b = ctx.need
        if ctx.params.args.reduction == "none":
            x, w, b, y = ctx.saved_tensors
            dx, dw, db = _recompute_backward(x, w, b, y, ctx.params, *ctx.stats, grad_output,
                                             need_x=need_x, need_w=need_w, need_b=need_b)
            return dx, dw, db, None, None
        from .kernels import launch

        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the fused linear head computed its gradients in the forward and has already "
                               "used them; it cannot be backpropagated twice (retain_graph=True)")
        ctx.grads = None
        # in place, on the device, in one launch; skipped there when grad_output == 1 (no host sync)
        launch.scale_all(grads, grad_output.contiguous())
        return grads[0], grads[1], grads[2], None, None


class _RowNormalize(torch.autograd.Function):
    """``y = x / max(|x_i|, eps)`` per row, by the kernels of :mod:`fastlt.kernels.row_normalize`: norms once in
    fp32, output in x's dtype, one read and one write of the matrix per direction. Saves only x and the (R,)
    fp32 inverse norms; backward ``dx = (g - [|x| > eps] y <g, y>) / max(|x|, eps)``, y recomputed in fp32."""

    @staticmethod
    def forward(ctx, x, eps: float):
        from .kernels.row_normalize import normalize_rows

        y, inv = normalize_rows(x, eps)
        ctx.save_for_backward(x, inv)
        ctx.eps = eps
        return y

    @staticmethod
    @first_order
    def backward(ctx, g):
        from .kernels.row_normalize import normalize_rows_backward

        x, inv = ctx.saved_tensors
        return normalize_rows_backward(x, inv, g, ctx.eps), None


def _run_fused(features, weight, bias, target, args, chunk_rows, chunk_classes=None):
    N, D = features.shape
    C = weight.shape[0]
    rows = chunk_rows if chunk_rows is not None else head_chunk_rows(
        N, D, C, features.dtype, need_weight_grad=torch.is_grad_enabled() and weight.requires_grad)
    if chunk_classes is None and chunk_rows is None and rows < N:
        cols = default_chunk_classes(N, features.dtype)
        chunk_classes = cols if _prefer_class_chunks(N, D, C, rows, cols) else None
    params = _HeadParams(args=args, chunk_rows=max(1, min(rows, max(N, 1))), chunk_classes=chunk_classes)
    if torch.compiler.is_compiling():  # an opaque op with registered autograd (fastlt._head_ops)
        from ._head_ops import linear_head

        return linear_head(features, weight, bias, target, params)
    tensors = (features, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return FusedLinearLoss.apply(features, weight, bias, target, params)
    return _fused_pass(features, weight, bias, target, params, need_x=False, need_w=False, need_b=False)[0]


def _autocast_inputs(features, weight, bias):
    """Under torch.autocast, run the head in the autocast dtype (as nn.Linear would) with autocast off inside."""
    if not all(isinstance(t, torch.Tensor) for t in (features, weight) + (() if bias is None else (bias,))):
        return features, weight, bias, None  # _check_head raises the TypeError
    dev = features.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        features, weight = features.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        return features, weight, bias, dev
    return features, weight, bias, None


def _triton_entry(features, weight, bias, target, *, cosine: bool, eps: float, chunk_rows, noise, op: dict,
                  chunk_classes=None):
    features, weight, bias, autocast_dev = _autocast_inputs(features, weight, bias)
    _check_head(features, weight, bias)
    from ._autograd import check_kernel_input, operator_args

    check_kernel_input("features", features, noise)
    target = V.as_index_target(target)
    _check_operator(features, weight, target, op)
    kw = {k: v for k, v in op.items() if k != "weight_classes"}
    args = operator_args(weight=op["weight_classes"], device=features.device, **kw)

    def run():
        x, w = features, weight
        if cosine and torch.compiler.is_compiling():
            from ._head_ops import normalize_rows

            x, w = normalize_rows(x, eps), normalize_rows(w, eps)
        elif cosine:
            x, w = _RowNormalize.apply(x, eps), _RowNormalize.apply(w, eps)
        else:
            x = x if x.stride(-1) == 1 else x.contiguous()
            w = w if w.stride(-1) == 1 else w.contiguous()
        return _run_fused(x, w, bias, target, args, chunk_rows, chunk_classes)

    if autocast_dev is not None:
        with torch.autocast(autocast_dev, enabled=False):
            return run()
    return run()


def _op_kwargs(prior, tau, margin, scale, cloud, noise_mul, seed, gamma, weight_classes, ignore_index, reduction,
               label_smoothing) -> dict:
    return dict(prior=prior, tau=tau, margin=margin, scale=scale, cloud=cloud, noise_mul=noise_mul, seed=seed,
                gamma=gamma, weight_classes=weight_classes, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing)


def linear_cross_entropy(features, weight, target, bias=None, *, prior=None, tau=1.0, margin=None, scale=1.0,
                         cloud=None, noise_mul=0.0, seed=None, noise=None, gamma=0.0, weight_classes=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, backend="auto",
                         chunk_rows=None, chunk_classes=None) -> torch.Tensor:
    """The SPEC 2.4 loss on the logits of a linear layer, ``z = features @ weight^T + bias``, without holding
    the (N, C) logits (fused path; see the module docstring).

    ``features`` (N, D) and ``weight`` (C, D) of one float dtype and device, ``bias`` (C,) or None, ``target``
    (N,) ints. Operator arguments as :func:`fastlt.functional.adjusted_cross_entropy`: ``prior`` (C,) log
    prior with ``tau``; ``margin`` float or (C,); ``scale`` s; ``cloud`` (C,) with ``noise_mul`` and
    ``seed`` (GCL noise: an int or a one-element int64 tensor on the device; drawn from torch's generator when
    None); ``gamma`` focal; ``weight_classes`` (C,)
    class weights; ``ignore_index``, ``reduction``, ``label_smoothing`` as in ``F.cross_entropy``.
    ``noise``: (N, C) explicit noise, reference path only. ``backend``: 'auto' (kernels for CUDA tensors, the
    reference elsewhere), 'triton' or 'torch'. ``chunk_rows``: rows per chunk of the row-chunked path
    (default: :func:`head_chunk_rows`: the whole batch when its logits fit in 512 MiB plus the fp32 dW
    accumulator that row chunks need, else a <= 512 MiB buffer); ``chunk_classes`` (a multiple of 8):
    classes per chunk of the class-chunked path. By default the path is picked by count
    (:func:`_prefer_class_chunks`: class chunks when the batch takes several row chunks and C is so large that
    they would re-read an fp32 dW accumulator many times). Returns the loss in the features' dtype.
    """
    _check_chunk_rows(chunk_rows)
    _check_chunk_classes(chunk_classes, chunk_rows)
    op = _op_kwargs(prior, tau, margin, scale, cloud, noise_mul, seed, gamma, weight_classes, ignore_index,
                    reduction, label_smoothing)
    if not use_triton(backend, features):
        return reference_linear_cross_entropy(features, weight, target, bias, noise=noise, **op)
    return _triton_entry(features, weight, bias, target, cosine=False, eps=0.0, chunk_rows=chunk_rows, noise=noise,
                         op=op, chunk_classes=chunk_classes)


def cosine_cross_entropy(features, weight, target, *, prior=None, tau=1.0, margin=None, scale=1.0, cloud=None,
                         noise_mul=0.0, seed=None, noise=None, gamma=0.0, weight_classes=None, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, backend="auto", chunk_rows=None, chunk_classes=None,
                         eps=1e-12) -> torch.Tensor:
    """As :func:`linear_cross_entropy` (no bias) on cosine logits ``cos_ij = <f_i/|f_i|, w_j/|w_j|>``: rows of
    ``features`` and ``weight`` are L2-normalised (norms once, in fp32, clamped at ``eps`` as ``F.normalize``)
    and the gradient flows through the normalisation. GCL is ``cloud=gcl_cloud(counts), noise_mul, margin=m,
    scale=s`` (see :class:`CosineGCLHead`)."""
    _check_chunk_rows(chunk_rows)
    _check_chunk_classes(chunk_classes, chunk_rows)
    V.check_finite_float("eps", eps, min_value=0.0, min_inclusive=False)
    op = _op_kwargs(prior, tau, margin, scale, cloud, noise_mul, seed, gamma, weight_classes, ignore_index,
                    reduction, label_smoothing)
    if not use_triton(backend, features):
        return reference_cosine_cross_entropy(features, weight, target, noise=noise, eps=eps, **op)
    return _triton_entry(features, weight, None, target, cosine=True, eps=eps, chunk_rows=chunk_rows, noise=noise,
                         op=op, chunk_classes=chunk_classes)


# --- modules ---------------------------------------------------------------------------------------------------

def _count_dtype(dtype) -> torch.dtype | None:
    """The dtype of a head's count buffers: float64 for a float64 head (exact, as ``.double()`` makes them), else
    float32 (what the kernels read)."""
    return torch.float64 if dtype == torch.float64 else None


class _HeadBase(CountBuffers):
    """Shared arguments: class weights, ignore_index, reduction, label smoothing, backend, and the fused path's
    ``chunk_rows`` / ``chunk_classes`` (at most one; see :func:`linear_cross_entropy`)."""

    def __init__(self, in_features: int, num_classes: int, *, weight_classes=None, ignore_index=-100,
                 reduction="mean", label_smoothing=0.0, backend="auto", chunk_rows=None, chunk_classes=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.num_classes = in_features, num_classes
        # weight_classes stays out of the state dict (like the priors): a head's state dict is its layer's
        # (nn.Linear's weight and bias, CosineClassifier's weight), so checkpoints move between the two
        V.init_loss_options(self, "weight_classes", weight_classes, num_classes, ignore_index=ignore_index,
                            reduction=reduction, label_smoothing=label_smoothing, backend=backend, persistent=False)
        _check_chunk_rows(chunk_rows)
        _check_chunk_classes(chunk_classes, chunk_rows)
        self.chunk_rows, self.chunk_classes = chunk_rows, chunk_classes

    def _common(self) -> dict:
        return dict(weight_classes=self.weight_classes, ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, backend=self.backend, chunk_rows=self.chunk_rows,
                    chunk_classes=self.chunk_classes)

    def _check_features(self, features) -> None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (N, {self.in_features}), got {tuple(features.shape)}")

    def _dense_logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The (N, C) inference logits, dense (see the class docstring for which)."""
        self._check_features(features)
        return self._dense_logits(features)

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int = 1, *, chunk_rows: int | None = None):
        """``(values, indices)``, each (N, k), of :meth:`logits` — computed in row chunks, never holding (N, C)
        (chunk as in the loss: ``chunk_rows`` or a <= 512 MiB buffer). No gradient."""
        self._check_features(features)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_classes:
            raise ValueError(f"k must be an int in [1, {self.num_classes}], got {k!r}")
        _check_chunk_rows(chunk_rows)
        N = features.shape[0]
        rows = chunk_rows or self.chunk_rows or default_chunk_rows(self.num_classes, features.dtype)
        values = torch.empty((N, k), dtype=features.dtype, device=features.device)
        indices = torch.empty((N, k), dtype=torch.int64, device=features.device)
        for r0, r1 in _chunks(N, rows):
            v, i = torch.topk(self._dense_logits(features[r0:r1]), k, dim=1)
            values[r0:r1] = v
            indices[r0:r1] = i
        return torch.return_types.topk((values, indices))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class LinearLossHead(_HeadBase):
    """``nn.Linear(in_features, num_classes, bias)`` + a long-tail loss, fused: ``head(features, target) -> loss``
    without the (N, C) logits in memory (on CUDA; the reference path elsewhere).

    ``loss``: 'ce' (plain cross-entropy; ``class_counts`` optional), 'la' (logit adjustment,
    ``CE(z + tau * log pi, y)``), 'balanced_softmax' (la with tau = 1) or 'ldam' (``CE(s (z - m_y 1_y), y)``
    with ``m_y ∝ n_y^(-1/4)``, largest ``max_margin``) or 'lade' (``PriorCE + alpha * LADER`` with
    ``remine_lambda``, :func:`fastlt.lade_head.lade_linear_loss`; 'mean' or 'sum'; ``s`` and ``gamma`` do not
    apply). ``s``: the logit scale (default 30 for 'ldam', else 1).
    ``gamma``: focal exponent. ``weight_classes``: (C,) class weights of the loss. Parameters ``weight`` (C, D)
    and ``bias`` (C,) as ``nn.Linear`` (same initialisation). Under ``torch.autocast`` the head runs in the
    autocast dtype.

    Inference: :meth:`logits` returns the raw ``z = f W^T + b`` — with loss-side adjustment (la, Balanced
    Softmax, LDAM) ``argmax z`` is already the balanced prediction; ``logits(f, adjusted=True)`` adds
    ``tau * log pi`` (the training-distribution posterior). :meth:`topk` ranks the same logits by row chunks.
    """

    def __init__(self, in_features: int, num_classes: int, class_counts=None, loss: str = "la", bias: bool = True,
                 *, tau: float = 1.0, max_margin: float = 0.5, s: float | None = None, gamma: float = 0.0,
                 alpha: float = 0.1, remine_lambda: float = 0.1, count_smoothing: float = 0.0, device=None,
                 dtype=None, **kwargs):
        super().__init__(in_features, num_classes, **kwargs)
        self.loss = V.check_choice("loss", loss, _HEAD_LOSSES)
        self.tau = V.check_finite_float("tau", 1.0 if loss in ("balanced_softmax", "lade") else tau)
        self.max_margin = max_margin
        self.s = V.check_finite_float("s", (30.0 if loss == "ldam" else 1.0) if s is None else s)
        self.gamma = V.check_finite_float("gamma", gamma, min_value=0.0)
        self.alpha = V.check_finite_float("alpha", alpha)
        self.remine_lambda = V.check_finite_float("remine_lambda", remine_lambda)
        if loss == "lade":
            if self.reduction == "none":
                raise ValueError("reduction='none' is not defined for loss='lade': LADER is a batch-level statistic; "
                                 "use 'mean' or 'sum'")
            if self.s != 1.0 or self.gamma != 0.0:
                raise ValueError("loss='lade' takes no logit scale s or focal gamma (the official LADE has neither)")
        for name in ("log_prior", "margins", "pi"):  # those the loss uses are filled from the counts below
            self.register_buffer(name, None, persistent=False)
        if class_counts is None:
            if loss != "ce":
                raise ValueError(f"loss={loss!r} needs class_counts (the per-class training counts)")
        else:
            counts = V.as_class_counts(class_counts, smoothing=count_smoothing)
            if counts.numel() != num_classes:
                raise ValueError(f"class_counts describes {counts.numel()} classes but num_classes = {num_classes}")
            if loss in ("la", "balanced_softmax", "lade"):
                self.count_buffer("log_prior", counts, log_prior_from, dtype=_count_dtype(dtype))
            if loss == "lade":
                self.count_buffer("pi", counts, prior_from, dtype=_count_dtype(dtype))
            elif loss == "ldam":
                self.count_buffer("margins", counts, ldam_margins_from, "_max_margin", dtype=_count_dtype(dtype))
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty((num_classes, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_features(features)
        if self.loss == "lade":
            from .lade_head import lade_linear_loss

            c = self._common()
            return lade_linear_loss(features, self.weight, target, self.pi, self.bias, alpha=self.alpha,
                                    remine_lambda=self.remine_lambda, weight_classes=c["weight_classes"],
                                    ignore_index=self.ignore_index, reduction=self.reduction,
                                    label_smoothing=self.label_smoothing, backend=self.backend,
                                    chunk_rows=self.chunk_rows, chunk_classes=self.chunk_classes)
        return linear_cross_entropy(features, self.weight, target, self.bias, prior=self.log_prior, tau=self.tau,
                                    margin=self.margins, scale=self.s, gamma=self.gamma, **self._common())

    max_margin = CountParameter("margins", min_value=0.0, doc="LDAM's largest margin (the rarest class's); setting "
                                "it (a schedule) rebuilds ``margins``.")

    def _dense_logits(self, features, adjusted: bool = False):
        z = F.linear(features, self.weight, self.bias)
        if adjusted and self.log_prior is not None:
            z = z + (self.tau * self.log_prior).to(z.dtype)
        return z

    def logits(self, features: torch.Tensor, *, adjusted: bool = False) -> torch.Tensor:
        """Dense (N, C) ``z = f W^T + b``; ``adjusted=True`` adds ``tau * log pi`` (la, Balanced Softmax, lade)."""
        self._check_features(features)
        return self._dense_logits(features, adjusted)

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, tau={self.tau}, s={self.s}, gamma={self.gamma}, bias={self.bias is not None}, "
                + super().extra_repr())


class CosineGCLHead(_HeadBase):
    """Cosine classifier + GCL (Li, Cheung, Lu, CVPR 2022), fused: ``head(features, target, seed=None) -> loss``.

    ``CE(s * (cos - noise_mul * e * delta/max(delta) - m * onehot(y)), y)`` on ``cos_ij = <f_i/|f_i|, w_j/|w_j|>``,
    half-normal noise ``e`` per element from (seed, row, column), inside the kernel; focal ``gamma``.
    Defaults are the official loss class's (m=0.5, s=30, noise_mul=1, gamma=0); the official scripts use
    m=0, s=30, noise_mul=0.5 for the backbone stage and m=0.1, s=20, noise_mul=0.5, gamma=1 to re-train the
    classifier. ``weight`` (C, D) is initialised as :class:`fastlt.CosineClassifier`'s (same layout), so a
    state dict moves between the two. ``noise_mul=0, m=0`` gives a plain scaled-cosine softmax head.

    Inference: :meth:`logits` returns the raw cosine logits ``cos`` in [-1, 1] (as ``CosineClassifier``;
    multiply by ``s`` for the training temperature); :meth:`topk` ranks them by row chunks.
    """

    def __init__(self, in_features: int, num_classes: int, class_counts, m: float = 0.5, s: float = 30.0,
                 noise_mul: float = 1.0, gamma: float = 0.0, *, count_smoothing: float = 0.0, eps: float = 1e-12,
                 device=None, dtype=None, **kwargs):
        super().__init__(in_features, num_classes, **kwargs)
        self.m = V.check_finite_float("m", m)
        self.s = V.check_finite_float("s", s)
        self.noise_mul = V.check_finite_float("noise_mul", noise_mul)
        self.gamma = V.check_finite_float("gamma", gamma, min_value=0.0)
        self.eps = V.check_finite_float("eps", eps, min_value=0.0, min_inclusive=False)
        counts = V.as_class_counts(class_counts, smoothing=count_smoothing)
        if counts.numel() != num_classes:
            raise ValueError(f"class_counts describes {counts.numel()} classes but num_classes = {num_classes}")
        self.count_buffer("cloud", counts, gcl_cloud_from, dtype=_count_dtype(dtype))
        self.weight = nn.Parameter(torch.empty((num_classes, in_features), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """:class:`fastlt.CosineClassifier`'s initialisation, ``U(-1/sqrt(D), 1/sqrt(D))``."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, features: torch.Tensor, target: torch.Tensor,
                seed: int | torch.Tensor | None = None) -> torch.Tensor:
        self._check_features(features)
        return cosine_cross_entropy(features, self.weight, target, cloud=self.cloud, noise_mul=self.noise_mul,
                                    seed=seed, margin=self.m, scale=self.s, gamma=self.gamma, eps=self.eps,
                                    **self._common())

    def _dense_logits(self, features):
        return F.linear(_normalize_ref(features, self.eps), _normalize_ref(self.weight, self.eps).to(features.dtype))

    def extra_repr(self) -> str:
        return (f"m={self.m}, s={self.s}, noise_mul={self.noise_mul}, gamma={self.gamma}, "
                + super().extra_repr())
