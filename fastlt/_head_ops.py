"""The fused heads under ``torch.compile``: ``torch.library`` custom ops with registered autograd, so a compiled
model that holds a :class:`fastlt.LinearLossHead` or :class:`fastlt.CosineGCLHead` sees opaque ops, not graph
breaks (``fullgraph=True`` works). Eager calls skip the op dispatch and use the autograd Functions of
:mod:`fastlt.heads` and :mod:`fastlt.lade_head`; both run the same passes.

- ``fastlt::linear_head_forward(features, weight, bias, target, <operator>, chunk_rows, chunk_classes, need_x,
  need_w, need_b) -> (loss, dx, dw, db, lse, factor)``: :func:`fastlt.heads._fused_pass`. For 'mean'/'sum' the
  gradients (for grad_output = 1) come out of the forward, and the registered backward multiplies them by
  grad_output (one pointwise op each, which the compiler may fuse; eager scales them in place instead). For
  'none' the (2, N) / (N,) fp32 row statistics come out, and the backward op
  ``fastlt::linear_head_backward`` recomputes the chunks' logits (:func:`fastlt.heads._recompute_backward`).
- ``fastlt::lade_head_forward``: :func:`fastlt.lade_head._lade_pass` ('mean'/'sum' only), backward as above.
- ``fastlt::normalize_rows`` / ``fastlt::normalize_rows_backward``: the cosine head's row L2 normalisation.

A gradient that is not wanted (``need_* = False``) is returned as an empty (0,) tensor (an op cannot return
None). Nothing here synchronises with the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import _REDUCTIONS, _args, _flat, _lade_args
from .heads import _chunks, _fused_pass, _HeadParams, _recompute_backward
from .kernels.row_normalize import normalize_rows as _normalize_rows
from .kernels.row_normalize import normalize_rows_backward as _normalize_rows_backward
from .lade_head import _lade_pass, _LADEHeadParams


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


def _wanted(features: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """``(need_x, need_w, need_b)``: which gradients the ops compute (none under no_grad)."""
    grad = torch.is_grad_enabled()
    return (grad and features.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)


def _fake_grads(features: Tensor, weight: Tensor, need_x: bool, need_w: bool, need_b: bool) -> tuple:
    """The fake ``(dx, dw, db)`` of an op: (N, D), (C, D), (C,) where wanted, else empty (0,)."""
    (N, D), C = features.shape, weight.shape[0]
    return (features.new_empty((N, D) if need_x else (0,)), features.new_empty((C, D) if need_w else (0,)),
            features.new_empty((C,) if need_b else (0,)))


def _params(flat: tuple, chunk_rows: int, chunk_classes: int) -> _HeadParams:
    return _HeadParams(args=_args(*flat), chunk_rows=chunk_rows, chunk_classes=chunk_classes or None)


# --- linear head (and the cosine head, after normalize_rows) ----------------------------------------------------

@torch.library.custom_op("fastlt::linear_head_forward", mutates_args=())
def linear_head_forward_op(features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                           prior: Tensor | None, cloud: Tensor | None, margin: Tensor | None,
                           weight_classes: Tensor | None, tau: float, noise_mul: float, margin_value: float,
                           has_margin: bool, scale: float, gamma: float, label_smoothing: float, ignore_index: int,
                           seed: int, reduction: int, seed_tensor: Tensor | None, chunk_rows: int,
                           chunk_classes: int, need_x: bool, need_w: bool,
                           need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    flat = (prior, cloud, margin, weight_classes, tau, noise_mul, margin_value, has_margin, scale, gamma,
            label_smoothing, ignore_index, seed, reduction, seed_tensor)
    params = _params(flat, chunk_rows, chunk_classes)
    loss, dx, dw, db, lse_chunks, factor_chunks = _fused_pass(features, weight, bias, target, params,
                                                              need_x=need_x, need_w=need_w, need_b=need_b)
    f32 = features.new_empty(0, dtype=torch.float32)
    if _REDUCTIONS[reduction] != "none" or not (need_x or need_w or need_b):
        lse_chunks, factor_chunks = [], []  # only 'none' backward needs them (the class-chunked pass always has them)
    lse = (lse_chunks[0] if len(lse_chunks) == 1 else torch.cat(lse_chunks, dim=1)) if lse_chunks else f32
    factor = (factor_chunks[0] if len(factor_chunks) == 1 else torch.cat(factor_chunks)) if factor_chunks else (
        f32.clone())
    return (loss, _or_empty(dx, features), _or_empty(dw, features), _or_empty(db, features), lse, factor)


@linear_head_forward_op.register_fake
def _(features, weight, bias, target, *rest):
    need_x, need_w, need_b = rest[-3:]
    N = features.shape[0]
    none = _REDUCTIONS[rest[13]] == "none"
    stats = none and (need_x or need_w or need_b)
    f32 = dict(dtype=torch.float32)
    return (features.new_empty((N,) if none else ()),
            *_fake_grads(features, weight, not none and need_x, not none and need_w, not none and need_b),
            features.new_empty((2, N) if stats else (0,), **f32), features.new_empty((N,) if stats else (0,), **f32))


@torch.library.custom_op("fastlt::linear_head_backward", mutates_args=())
def linear_head_backward_op(grad_output: Tensor, features: Tensor, weight: Tensor, bias: Tensor | None,
                            target: Tensor, lse: Tensor, factor: Tensor, prior: Tensor | None,
                            cloud: Tensor | None, margin: Tensor | None, weight_classes: Tensor | None, tau: float,
                            noise_mul: float, margin_value: float, has_margin: bool, scale: float, gamma: float,
                            label_smoothing: float, ignore_index: int, seed: int, reduction: int,
                            seed_tensor: Tensor | None, chunk_rows: int, chunk_classes: int, need_x: bool,
                            need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """reduction='none': the per-row ``grad_output`` scales each row's dZ before the matmuls."""
    flat = (prior, cloud, margin, weight_classes, tau, noise_mul, margin_value, has_margin, scale, gamma,
            label_smoothing, ignore_index, seed, reduction, seed_tensor)
    params = _params(flat, chunk_rows, chunk_classes)
    if params.chunk_classes is not None:
        lse_chunks, factor_chunks = [lse], [factor]
    else:
        spans = _chunks(features.shape[0], chunk_rows)
        lse_chunks = [lse[:, r0:r1].contiguous() for r0, r1 in spans]
        factor_chunks = [factor[r0:r1] for r0, r1 in spans]
    dx, dw, db = _recompute_backward(features, weight, bias, target, params, lse_chunks, factor_chunks, grad_output,
                                     need_x=need_x, need_w=need_w, need_b=need_b)
    return _or_empty(dx, features), _or_empty(dw, features), _or_empty(db, features)


@linear_head_backward_op.register_fake
def _(grad_output, features, weight, bias, target, lse, factor, *rest):
    return _fake_grads(features, weight, *rest[-3:])


_LINEAR_INPUTS = 24  # arguments of linear_head_forward_op


def _setup_linear_head(ctx, inputs, output):
    features, weight, bias, target, *flat_and_chunks = inputs
    flat, (chunk_rows, chunk_classes, need_x, need_w, need_b) = tuple(flat_and_chunks[:15]), flat_and_chunks[15:]
    ctx.none = _REDUCTIONS[flat[13]] == "none"
    ctx.need = (need_x, need_w, need_b)
    if ctx.none:
        prior, cloud, margin, weight_classes = flat[:4]
        ctx.save_for_backward(features, weight, bias, target, output[4], output[5], prior, cloud, margin,
                              weight_classes, flat[14])
        ctx.scalars = flat[4:14] + (chunk_rows, chunk_classes)
    else:
        ctx.save_for_backward(*output[1:4])


def _scaled(ctx, grad_loss) -> tuple:
    """'mean'/'sum': the forward's gradients times the scalar grad_output (None where not wanted)."""
    grads = zip(ctx.saved_tensors, ctx.need, strict=True)
    return tuple(g * grad_loss.to(g.dtype) if need else None for g, need in grads)


def _linear_head_backward(ctx, grad_loss, *unused):
    if not any(ctx.need):  # the forward computed no gradient and kept no statistics
        grads = (None, None, None)
    elif not ctx.none:
        grads = _scaled(ctx, grad_loss)
    else:
        features, weight, bias, target, lse, factor, prior, cloud, margin, weight_classes, seed_tensor = (
            ctx.saved_tensors)
        *scalars, chunk_rows, chunk_classes = ctx.scalars
        out = linear_head_backward_op(grad_loss, features, weight, bias, target, lse, factor, prior, cloud, margin,
                                      weight_classes, *scalars, seed_tensor, chunk_rows, chunk_classes, *ctx.need)
        grads = tuple(g if need else None for g, need in zip(out, ctx.need, strict=True))
    return grads + (None,) * (_LINEAR_INPUTS - 3)


linear_head_forward_op.register_autograd(_linear_head_backward, setup_context=_setup_linear_head)


def linear_head(features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, params: _HeadParams) -> Tensor:
    """:class:`fastlt.heads.FusedLinearLoss` as the custom op (the compiled path): the loss."""
    return linear_head_forward_op(features, weight, bias, target, *_flat(params.args), params.chunk_rows,
                                  params.chunk_classes or 0, *_wanted(features, weight, bias))[0]


# --- LADE head ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlt::lade_head_forward", mutates_args=())
def lade_head_forward_op(features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, log_prior: Tensor,
                         pi: Tensor, weight_classes: Tensor | None, alpha: float, remine_lambda: float,
                         label_smoothing: float, ignore_index: int, reduction: int, chunk_rows: int,
                         chunk_classes: int, need_x: bool, need_w: bool,
                         need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = _lade_args(log_prior, weight_classes, label_smoothing, ignore_index, reduction)
    params = _LADEHeadParams(args=args, pi=pi, alpha=alpha, remine_lambda=remine_lambda, chunk_rows=chunk_rows,
                             chunk_classes=chunk_classes or None)
    loss, dx, dw, db = _lade_pass(features, weight, bias, target, params, need_x=need_x, need_w=need_w,
                                  need_b=need_b)
    return loss, _or_empty(dx, features), _or_empty(dw, features), _or_empty(db, features)


@lade_head_forward_op.register_fake
def _(features, weight, bias, target, *rest):
    return (features.new_empty(()), *_fake_grads(features, weight, *rest[-3:]))


_LADE_INPUTS = 17  # arguments of lade_head_forward_op


def _setup_lade_head(ctx, inputs, output):
    ctx.need = tuple(inputs[-3:])
    ctx.save_for_backward(*output[1:4])


def _lade_head_backward(ctx, grad_loss, *unused):
    return _scaled(ctx, grad_loss) + (None,) * (_LADE_INPUTS - 3)


lade_head_forward_op.register_autograd(_lade_head_backward, setup_context=_setup_lade_head)


def lade_head(features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
              params: _LADEHeadParams) -> Tensor:
    """:class:`fastlt.lade_head.FusedLinearLADE` as the custom op (the compiled path): the loss."""
    args = params.args
    return lade_head_forward_op(features, weight, bias, target, args.prior, params.pi, args.weight, params.alpha,
                                params.remine_lambda, args.label_smoothing, args.ignore_index,
                                _REDUCTIONS.index(args.reduction), params.chunk_rows, params.chunk_classes or 0,
                                *_wanted(features, weight, bias))[0]


# --- cosine head: row normalisation ------------------------------------------------------------------------------

@torch.library.custom_op("fastlt::normalize_rows", mutates_args=())
def normalize_rows_op(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _normalize_rows(x, eps)


@normalize_rows_op.register_fake
def _(x, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastlt::normalize_rows_backward", mutates_args=())
def normalize_rows_backward_op(x: Tensor, inv: Tensor, grad: Tensor, eps: float) -> Tensor:
    return _normalize_rows_backward(x, inv, grad, eps)


@normalize_rows_backward_op.register_fake
def _(x, inv, grad, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_normalize(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x, output[1])
    ctx.eps = eps


def _normalize_backward(ctx, grad_y, grad_inv):
    x, inv = ctx.saved_tensors
    return normalize_rows_backward_op(x, inv, grad_y.contiguous(), ctx.eps), None


normalize_rows_op.register_autograd(_normalize_backward, setup_context=_setup_normalize)


def normalize_rows(x: Tensor, eps: float) -> Tensor:
    """:class:`fastlt.heads._RowNormalize` as the custom op (the compiled path)."""
    return normalize_rows_op(x, float(eps))[0]
