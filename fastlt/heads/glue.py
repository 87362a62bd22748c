"""Autograd over the fused heads' passes, two ways to the same passes (as :mod:`fastlt._glue` for the logits losses):

- eager: the autograd Functions :class:`FusedLinearLoss`, :class:`FusedLinearLADE` and :class:`RowNormalize`;
- ``torch.compile``: the ``torch.library`` custom ops ``fastlt::linear_head_forward`` / ``_backward``,
  ``fastlt::lade_head_forward`` and ``fastlt::normalize_rows`` / ``_backward``, whose schemas come from the declared
  groups (:mod:`fastlt._operator`), with registered autograd, so a compiled model that holds a head sees opaque ops,
  not graph breaks. For 'mean'/'sum' the gradients (for grad_output = 1) come out of the forward op and the
  registered backward multiplies them by grad_output (out of place; eager scales them in place instead, skipped on
  the device when it is 1). For 'none' the fp32 row statistics come out and the backward op recomputes the chunks.

:func:`run_head` is the Triton path's entry from :mod:`fastlt.heads.functional`. A gradient an op does not compute
is returned as an empty (0,) tensor (an op cannot return None). Nothing here synchronises with the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _operator as O
from .. import _validation as V
from .._backend import autocast_inputs, loss_dtype
from .._custom_ops import define, input_grads, save_inputs, saved_inputs
from .._first_order import first_order
from .._glue import SHARED_CACHE_SIZE, check_kernel_input, lade_args, nan_if_empty, soft_mean
from .._kernel_modules import kernel_module
from .._operator import AdjustedCEArgs, ChunkPlan, LadeArgs, Needs
from .lade import lade_pass
from .passes import HeadParams, fused_pass, recompute_backward
from .plan import default_chunk_classes, head_chunk_rows, prefer_class_chunks, row_chunks

# the kernels (stand-ins that raise at their first use where Triton is missing: fastlt._kernel_modules)
launch = kernel_module("fastlt.kernels.launch")
row_normalize = kernel_module("fastlt.kernels.row_normalize")

__all__ = ["FusedLinearLoss", "FusedLinearLADE", "RowNormalize", "run_head", "run_lade_head"]


# --- eager path ----------------------------------------------------------------------------------------------------

class FusedLinearLoss(torch.autograd.Function):
    """``apply(features, weight, bias, target, params)`` -> loss (input dtype; ``params.out_dtype`` under autocast),
    by :func:`fused_pass`.

    For 'mean'/'sum' the gradients are computed in the forward and the backward rescales them in place by
    grad_output, so the graph cannot be backpropagated twice (``retain_graph=True`` then raises)."""

    @staticmethod
    def forward(ctx, features, weight, bias, target, params: HeadParams):
        need = _needs(ctx, bias)
        loss, dx, dw, db, stats_chunks, coef_chunks = fused_pass(features, weight, bias, target, params,
                                                                 need_x=need.x, need_w=need.w, need_b=need.b)
        ctx.params, ctx.need = params, need
        if params.args.reduction == "none":
            ctx.save_for_backward(features, weight, bias, target)
            ctx.stats = (stats_chunks, coef_chunks)
            ctx.inputs_state = O.inputs_state(params.args, params.seed)
        else:
            ctx.grads = [dx, dw, db]
            ctx.anchors = (_graph_handle(features), weight, bias)  # for first_order, as nothing is saved
        return loss

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        need = ctx.need
        if ctx.params.args.reduction == "none":
            x, w, b, y = ctx.saved_tensors
            ctx.anchors = (x, w, b)  # (for first_order)
            O.check_inputs_unchanged(ctx.inputs_state)
            dx, dw, db = recompute_backward(x, w, b, y, ctx.params, *ctx.stats, grad_output,
                                            need_x=need.x, need_w=need.w, need_b=need.b)
            return dx, dw, db, None, None
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the fused linear head computed its gradients in the forward and has already "
                               "used them; it cannot be backpropagated twice (retain_graph=True)")
        ctx.grads = None
        # in place, on the device, in one launch; skipped there when grad_output == 1 (no host sync)
        launch.scale_all(grads, grad_output.contiguous())
        return grads[0], grads[1], grads[2], None, None


class FusedLinearLADE(FusedLinearLoss):
    """``apply(features, weight, bias, target, params)`` -> LADE loss, by :func:`lade_pass`; gradients computed in
    the forward (the backward of :class:`FusedLinearLoss` rescales them by grad_output, once)."""

    @staticmethod
    def forward(ctx, features, weight, bias, target, params: HeadParams):
        need = _needs(ctx, bias)
        loss, dx, dw, db = lade_pass(features, weight, bias, target, params, need_x=need.x, need_w=need.w,
                                     need_b=need.b)
        ctx.params, ctx.need = params, need
        ctx.grads = [dx, dw, db]
        ctx.anchors = (_graph_handle(features), weight, bias)  # for first_order, as nothing is saved
        return loss


def _graph_handle(t: Tensor) -> Tensor | None:
    """A zero-size tensor of ``t``'s graph (its gradient leads to ``t``'s producer) that holds none of ``t``'s
    storage, or None when ``t`` does not require grad: what :func:`fastlt._first_order.first_order` needs of an input
    no backward saves (the features, which a head keeps no longer than its forward). Made with grad on (a Function's
    forward runs without)."""
    if not t.requires_grad:
        return None
    with torch.enable_grad():
        return t[:0].clone()


def _needs(ctx, bias) -> Needs:
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return Needs(x=need_x, w=need_w, b=need_b and bias is not None)


class RowNormalize(torch.autograd.Function):
    """``y = x / max(|x_i|, eps)`` per row, by the kernels of :mod:`fastlt.kernels.row_normalize`: norms once in
    fp32, output in x's dtype, one read and one write of the matrix per direction. Saves only x and the (R,)
    fp32 inverse norms; backward ``dx = (g - [|x| > eps] y <g, y>) / max(|x|, eps)``, y recomputed in fp32."""

    @staticmethod
    def forward(ctx, x, eps: float):
        y, inv = row_normalize.normalize_rows(x, eps)
        ctx.save_for_backward(x, inv)
        ctx.eps = eps
        return y

    @staticmethod
    @first_order
    def backward(ctx, g):
        x, inv = ctx.saved_tensors
        ctx.anchors = (x,)  # (for first_order)
        return row_normalize.normalize_rows_backward(x, inv, g, ctx.eps), None


# --- torch.compile path ---------------------------------------------------------------------------------------------

def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


def _fake_grads(features: Tensor, weight: Tensor, need: Needs) -> tuple:
    """The fake ``(dx, dw, db)`` of an op: (N, D), (C, D), (C,) where wanted, else empty (0,)."""
    (N, D), C = features.shape, weight.shape[0]
    return (features.new_empty((N, D) if need.x else (0,)), features.new_empty((C, D) if need.w else (0,)),
            features.new_empty((C,) if need.b else (0,)))


def _wanted(features: Tensor, weight: Tensor, bias: Tensor | None) -> Needs:
    """Which gradients the ops compute (none under no_grad)."""
    grad = torch.is_grad_enabled()
    return Needs(x=grad and features.requires_grad, w=grad and weight.requires_grad,
                 b=grad and bias is not None and bias.requires_grad)


_HEAD = "Tensor features, Tensor head_weight, Tensor? head_bias, Tensor target"  # weight: the class weights
_LINEAR_GROUPS = (AdjustedCEArgs, ChunkPlan, Needs)


@define("fastlt::linear_head_forward", _HEAD, _LINEAR_GROUPS, "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def linear_head_forward_op(features, weight, bias, target, *flat):
    """``(loss, dx, dw, db, row_stats, row_coef)``: :func:`fused_pass`, the loss in float32 (the caller casts it: to
    float32 under autocast, else the features' dtype); the row statistics only for a 'none' loss whose gradients
    are wanted (else empty)."""
    args, plan, need = O.unflatten(_LINEAR_GROUPS, flat)
    plan = resolved_plan(plan, features, weight, need, lade=False)
    loss, dx, dw, db, stats_chunks, coef_chunks = fused_pass(features, weight, bias, target,
                                                             HeadParams(args, plan, out_dtype=torch.float32),
                                                             need_x=need.x, need_w=need.w, need_b=need.b)
    f32 = features.new_empty(0, dtype=torch.float32)
    if args.reduction != "none" or not need.any:
        stats_chunks, coef_chunks = [], []  # only 'none' backward needs them (the class-chunked pass always has them)
    row_stats = torch.cat(stats_chunks, dim=1) if len(stats_chunks) > 1 else (stats_chunks or [f32])[0]
    row_coef = torch.cat(coef_chunks) if len(coef_chunks) > 1 else (coef_chunks or [f32.clone()])[0]
    return loss, _or_empty(dx, features), _or_empty(dw, features), _or_empty(db, features), row_stats, row_coef


@linear_head_forward_op.register_fake
def _(features, weight, bias, target, *flat):
    args, plan, need = O.unflatten(_LINEAR_GROUPS, flat)
    N = features.shape[0]
    none = args.reduction == "none"
    stats = none and need.any
    f32 = dict(dtype=torch.float32)
    grads = _fake_grads(features, weight, Needs(x=need.x and not none, w=need.w and not none, b=need.b and not none))
    planes = 3 if target.is_floating_point() else 2  # class probabilities: W_q too
    return (features.new_empty((N,) if none else (), **f32), *grads,
            features.new_empty((planes, N) if stats else (0,), **f32),
            features.new_empty((N,) if stats else (0,), **f32))


@define("fastlt::linear_head_backward", f"Tensor grad_output, {_HEAD}, Tensor row_stats, Tensor row_coef",
        _LINEAR_GROUPS, "(Tensor, Tensor, Tensor)")
def linear_head_backward_op(grad_output, features, weight, bias, target, row_stats, row_coef, *flat):
    """reduction='none': the per-row ``grad_output`` scales each row's dZ before the matmuls."""
    args, plan, need = O.unflatten(_LINEAR_GROUPS, flat)
    plan = resolved_plan(plan, features, weight, need, lade=False)
    if plan.classes is not None:
        stats_chunks, coef_chunks = [row_stats], [row_coef]
    else:
        spans = row_chunks(features.shape[0], plan.rows)
        stats_chunks = [row_stats[:, r0:r1].contiguous() for r0, r1 in spans]
        coef_chunks = [row_coef[r0:r1] for r0, r1 in spans]
    dx, dw, db = recompute_backward(features, weight, bias, target, HeadParams(args, plan), stats_chunks,
                                    coef_chunks, grad_output, need_x=need.x, need_w=need.w, need_b=need.b)
    return _or_empty(dx, features), _or_empty(dw, features), _or_empty(db, features)


@linear_head_backward_op.register_fake
def _(grad_output, features, weight, bias, target, row_stats, row_coef, *flat):
    _, _, need = O.unflatten(_LINEAR_GROUPS, flat)
    return _fake_grads(features, weight, need)


def _setup_linear_head(ctx, inputs, output):
    _, _, _, _, *flat = inputs
    args, _, need = O.unflatten(_LINEAR_GROUPS, flat)
    _, dx, dw, db, row_stats, row_coef = output
    ctx.none, ctx.need = args.reduction == "none", need
    if ctx.none:
        save_inputs(ctx, inputs, row_stats, row_coef)
    else:
        save_inputs(ctx, inputs, dx, dw, db, keep=False)  # the gradients for grad_output = 1


def _scaled(grads: tuple, need: Needs, grad_loss) -> tuple:
    """'mean'/'sum': the forward's gradients times the scalar grad_output (None where not wanted; :func:`_times`)."""
    return tuple(_times(g, grad_loss) if wanted else None
                 for g, wanted in zip(grads, (need.x, need.w, need.b), strict=True))


def _times(g: Tensor, scale: Tensor) -> Tensor:
    """``g * scale`` in ``g``'s dtype, taken in float32 for half precision: rounded once, as the eager path's kernel
    scales (and a GradScaler's 2^16 is inf in fp16)."""
    if g.dtype in (torch.float16, torch.bfloat16):
        return (g.float() * scale.float()).to(g.dtype)
    return g * scale.to(g.dtype)


def _linear_head_backward(ctx, grad_loss, *unused):
    inputs, saved = saved_inputs(ctx)
    need = ctx.need
    if not need.any:  # the forward computed no gradient and kept no statistics
        return input_grads(ctx)
    if not ctx.none:
        return input_grads(ctx, *_scaled(saved, need, grad_loss))
    features, weight, bias, target, *flat = inputs
    out = linear_head_backward_op(grad_loss, features, weight, bias, target, *saved, *flat)
    return input_grads(ctx, *(g if wanted else None for g, wanted in zip(out, (need.x, need.w, need.b), strict=True)))


linear_head_forward_op.register_autograd(_linear_head_backward, setup_context=_setup_linear_head)


_LADE_GROUPS = (AdjustedCEArgs, LadeArgs, ChunkPlan, Needs)


@define("fastlt::lade_head_forward", _HEAD, _LADE_GROUPS, "(Tensor, Tensor, Tensor, Tensor)")
def lade_head_forward_op(features, weight, bias, target, *flat):
    """``(loss, dx, dw, db)``: :func:`lade_pass` ('mean'/'sum' only), the loss in float32 (as the linear head's)."""
    args, lade, plan, need = O.unflatten(_LADE_GROUPS, flat)
    plan = resolved_plan(plan, features, weight, need, lade=True)
    loss, dx, dw, db = lade_pass(features, weight, bias, target, HeadParams(args, plan, lade, out_dtype=torch.float32),
                                 need_x=need.x, need_w=need.w, need_b=need.b)
    return loss, _or_empty(dx, features), _or_empty(dw, features), _or_empty(db, features)


@lade_head_forward_op.register_fake
def _(features, weight, bias, target, *flat):
    *_, need = O.unflatten(_LADE_GROUPS, flat)
    return (features.new_empty((), dtype=torch.float32), *_fake_grads(features, weight, need))


def _setup_lade_head(ctx, inputs, output):
    _, _, _, _, *flat = inputs
    *_, need = O.unflatten(_LADE_GROUPS, flat)
    _, dx, dw, db = output
    ctx.need = need
    save_inputs(ctx, inputs, dx, dw, db, keep=False)  # the gradients for grad_output = 1


def _lade_head_backward(ctx, grad_loss, *unused):
    _, grads = saved_inputs(ctx)
    return input_grads(ctx, *_scaled(grads, ctx.need, grad_loss))


lade_head_forward_op.register_autograd(_lade_head_backward, setup_context=_setup_lade_head)


@torch.library.custom_op("fastlt::normalize_rows", mutates_args=())
def normalize_rows_op(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return row_normalize.normalize_rows(x, eps)


@normalize_rows_op.register_fake
def _(x, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastlt::normalize_rows_backward", mutates_args=())
def normalize_rows_backward_op(x: Tensor, inv: Tensor, grad: Tensor, eps: float) -> Tensor:
    return row_normalize.normalize_rows_backward(x, inv, grad, eps)


@normalize_rows_backward_op.register_fake
def _(x, inv, grad, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_normalize(ctx, inputs, output):
    x, eps = inputs
    _, inv = output
    ctx.save_for_backward(x, inv)
    ctx.eps = eps


def _normalize_backward(ctx, grad_y, grad_inv):
    x, inv = ctx.saved_tensors
    return normalize_rows_backward_op(x, inv, grad_y.contiguous(), ctx.eps), None


normalize_rows_op.register_autograd(_normalize_backward, setup_context=_setup_normalize)


# --- the Triton path's entries --------------------------------------------------------------------------------------

def _run_autocast_off(autocast_dev, run):
    if autocast_dev is None:
        return run()
    with torch.autocast(autocast_dev, enabled=False):
        return run()


def _plan(features: Tensor, weight: Tensor, chunk_rows, chunk_classes, *, lade: bool,
          need_weight_grad: bool | None = None) -> ChunkPlan:
    """The chunk plan (:mod:`fastlt.heads.plan`): ``chunk_rows`` / ``chunk_classes`` as given, else the whole batch
    when it fits, else class chunks when counting says they are cheaper (LADE: always, see
    :mod:`fastlt.heads.lade`). While compiling, the choice is left to the op (:func:`resolved_plan`): made here from
    the traced batch size, it guarded on it, so a graph compiled again for every N (and export refused a dynamic N).
    ``need_weight_grad``: default, whether grad mode is on and the weight requires grad."""
    if torch.compiler.is_compiling():
        return ChunkPlan(rows=chunk_rows or 0, classes=chunk_classes)
    (N, D), C = features.shape, weight.shape[0]
    if need_weight_grad is None:
        need_weight_grad = torch.is_grad_enabled() and weight.requires_grad
    rows = chunk_rows if chunk_rows is not None else head_chunk_rows(N, D, C, features.dtype,
                                                                     need_weight_grad=need_weight_grad)
    if chunk_classes is None and chunk_rows is None and rows < N:
        cols = default_chunk_classes(N, features.dtype)
        chunk_classes = cols if lade or prefer_class_chunks(N, D, C, rows, cols) else None
    return ChunkPlan(rows=max(1, min(rows, max(N, 1))), classes=chunk_classes)


def resolved_plan(plan: ChunkPlan, features: Tensor, weight: Tensor, need: Needs, *, lade: bool) -> ChunkPlan:
    """The plan an op runs: ``plan``, or where its ``rows`` is 0 (left to the op while compiling: :func:`_plan`)
    the choice :func:`_plan` makes from the op's real tensors (its ``classes`` as asked)."""
    if plan.rows != 0:
        return plan
    return _plan(features, weight, None, plan.classes, lade=lade, need_weight_grad=need.w)


def _proxy(features: Tensor, weight: Tensor) -> Tensor:
    """An (N, C) stand-in for the logits the checks take: a broadcast scalar, no memory."""
    return features.new_empty((1, 1)).expand(features.shape[0], weight.shape[0])


def _head_args(features: Tensor, weight: Tensor, target: Tensor, fields: dict, noise, cache: O.ArgsCache):
    """``(args, seed)`` of :meth:`fastlt._operator.ArgsCache.operator_args`, checked on the logits' stand-in and kept
    in ``cache`` while the next call passes the same fields (not with explicit noise, nor while compiling)."""
    proxy = _proxy(features, weight)
    return cache.operator_args(fields, proxy, target, lambda: O.check_operator_args(proxy, target, fields, noise=noise),
                               use=noise is None and not torch.compiler.is_compiling(), names=_HEAD_NAMES)


_HEAD_NAMES = {"weight": "weight_classes"}  # the operator's class weights, as the heads' arguments name them

# the functional calls' (a head module keeps its own: two heads in one step would evict each other's every step)
_HEAD_ARGS = O.ArgsCache(SHARED_CACHE_SIZE)
_LADE_HEAD_ARGS = O.ArgsCache(SHARED_CACHE_SIZE)


def run_head(features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, fields: dict, *, cosine: bool,
             eps: float, chunk_rows, chunk_classes, noise=None, cache: O.ArgsCache | None = None) -> Tensor:
    """The linear (or, with ``cosine``, the cosine) head on the kernels; ``fields`` the operator's parameters by name
    (:class:`fastlt._operator.AdjustedCEArgs`: its ``weight`` is the class weights, ``weight_classes`` of the public
    functions); ``cache``: where the arguments of the last call are kept (a head module's own; default: one shared
    by every other call)."""
    features, weight, bias, autocast_dev = autocast_inputs(features, weight, bias)
    V.check_head(features, weight, bias, fields.get("weight"))
    out_dtype = loss_dtype(features)  # (float32 under autocast, which is off while the head runs)
    check_kernel_input("features", features, noise)
    target = V.as_kernel_target(target)
    args, seed = _head_args(features, weight, target, fields, noise, _HEAD_ARGS if cache is None else cache)
    args = soft_mean(args, target, features.shape[0])

    def run():
        x, w = features, weight
        if cosine and torch.compiler.is_compiling():
            x, w = normalize_rows_op(x, float(eps))[0], normalize_rows_op(w, float(eps))[0]
        elif cosine:
            x, w = RowNormalize.apply(x, eps), RowNormalize.apply(w, eps)
        else:
            x = x if x.stride(-1) == 1 else x.contiguous()
            w = w if w.stride(-1) == 1 else w.contiguous()
        params = HeadParams(args, _plan(x, w, chunk_rows, chunk_classes, lade=False), seed=seed, out_dtype=out_dtype)
        if torch.compiler.is_compiling():  # an opaque op with registered autograd
            flat = O.flatten(args, params.plan, _wanted(x, w, bias))
            return linear_head_forward_op(x, w, bias, target, *flat)[0].to(out_dtype)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias)):
            return FusedLinearLoss.apply(x, w, bias, target, params)
        return fused_pass(x, w, bias, target, params, need_x=False, need_w=False, need_b=False)[0]

    return nan_if_empty(_run_autocast_off(autocast_dev, run), args)


def run_lade_head(features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, fields: dict, *,
                  chunk_rows, chunk_classes, cache: O.ArgsCache | None = None) -> Tensor:
    """The LADE head on the kernels (arguments as :func:`fastlt.heads.functional.lade_linear_loss`); ``fields``: its
    LADE parameters by name (:func:`fastlt._glue.lade_fields_triton`'s: ``weight`` is the class weights), kept
    checked and converted in ``cache`` (a head module's own; default: one shared by every other call)."""
    features, weight, bias, autocast_dev = autocast_inputs(features, weight, bias)
    V.check_head(features, weight, bias, fields.get("weight"))
    out_dtype = loss_dtype(features)  # (float32 under autocast, which is off while the head runs)
    check_kernel_input("features", features)
    target = V.as_kernel_target(target)
    args, lade = lade_args(_proxy(features, weight), target, fields, _LADE_HEAD_ARGS if cache is None else cache,
                           _HEAD_NAMES)
    args = soft_mean(args, target, features.shape[0])

    def run():
        x = features if features.stride(-1) == 1 else features.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        params = HeadParams(args, _plan(x, w, chunk_rows, chunk_classes, lade=True), lade, out_dtype=out_dtype)
        if torch.compiler.is_compiling():  # an opaque op with registered autograd
            return lade_head_forward_op(x, w, bias, target, *O.flatten(args, lade, params.plan,
                                                                       _wanted(x, w, bias)))[0].to(out_dtype)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias)):
            return FusedLinearLADE.apply(x, w, bias, target, params)
        return lade_pass(x, w, bias, target, params, need_x=False, need_w=False, need_b=False)[0]

    return nan_if_empty(_run_autocast_off(autocast_dev, run), args)
