"""Autograd over the adjusted cross-entropy and LADE kernels, two ways to the same launchers:

- eager: :class:`AdjustedCEFunction` / :class:`LADEFunction`, autograd Functions taking the logits, the targets and
  the declared parameter groups (:class:`fastlt._operator.AdjustedCEArgs`, :class:`fastlt._operator.LadeArgs`);
  backward returns one gradient and None for the rest. No dispatcher on the way: small batches are host-bound.
- ``torch.compile``: the ``torch.library`` custom ops ``fastlt::adjusted_ce_forward``,
  ``fastlt::adjusted_ce_backward`` and ``fastlt::lade_forward``, whose schemas come from the declarations, with
  registered autograd, so the compiler sees opaque ops, not graph breaks. Under compile ``grad_in_forward`` is
  ignored (an op that mutates its input cannot carry registered autograd): the recompute backward runs instead.

Nothing here synchronises with the GPU.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from . import _operator as O
from . import reference as R
from ._backend import loss_dtype
from ._custom_ops import define, input_grads, save_inputs, saved_inputs
from ._first_order import first_order
from ._kernel_modules import kernel_module
from ._operator import AdjustedCEArgs, LadeArgs
from ._validation import as_kernel_target
from .reference import LaderStatistics

# the kernels (stand-ins that raise at their first use where Triton is missing: fastlt._kernel_modules)
lade_kernels = kernel_module("fastlt.kernels.lade")
launch = kernel_module("fastlt.kernels.launch")
adjusted_ce = kernel_module("fastlt.kernels.adjusted_ce")

__all__ = ["AdjustedCEFunction", "LADEFunction", "adjusted_cross_entropy_triton", "adjusted_ce_checked", "lade_checked",
           "lade_loss_triton", "lade_fields_triton", "lade_statistics_triton", "check_kernel_input",
           "lade_operator_args", "lade_args"]

# bumps a tensor's version counter after a write autograd did not see
_increment_version = torch.autograd.graph.increment_version


# --- implementations shared by both paths --------------------------------------------------------------------------

def _forward(logits, target, args: AdjustedCEArgs, grad_out=None, out_dtype=torch.float32, seed=None):
    """``(loss, row_stats, row_coef)``: the row kernel, whose last program reduces the batch (:func:`launch.loss`;
    ``seed``: an int in place of ``args``')."""
    return launch.loss(logits, target, args, grad_out=grad_out, out_dtype=out_dtype, seed=seed)


def soft_mean(args: AdjustedCEArgs, target: Tensor, rows: int) -> AdjustedCEArgs:
    """``args`` for the launchers: class-probability targets run 'mean' as 'sum' with every row scaled by
    ``row_scale = 1 / rows`` (``F.cross_entropy`` divides by N there, not by the targets' weights; inf for no row:
    :func:`nan_if_empty`); else as they are."""
    if target.is_floating_point() and args.reduction == "mean":
        return dataclasses.replace(args, reduction="sum", row_scale=1.0 / rows if rows else math.inf)
    return args


def nan_if_empty(loss: Tensor, args: AdjustedCEArgs) -> Tensor:
    """The 'mean' of no class-probability rows is NaN, as torch's (:func:`soft_mean` left it a 'sum' of nothing)."""
    return loss * math.nan if args.row_scale == math.inf else loss


def _backward(grad_output, logits, target, args: AdjustedCEArgs, row_stats, row_coef, column_term=None, seed=None):
    """The recompute backward; ``column_term``: LADE's :class:`ColumnTerm` (its (3, C) fp32 columns), which the
    kernel scales by the scalar ``grad_output`` itself; ``seed``: the forward's (:func:`_forward`)."""
    upstream = None if grad_output is None else grad_output.contiguous()
    return launch.grad(logits, target, args, row_stats, row_coef, upstream, column_term=column_term, seed=seed)


def _lade_forward(logits, target, args: AdjustedCEArgs, lade: LadeArgs, out_dtype=torch.float32, plans=None):
    """``(loss, row_stats, row_coef, columns)``, ``columns`` the finish's (3 C + P,) fp32 buffer, whose first 3 C
    elements are the column term: two launches (:func:`fastlt.kernels.lade.forward_flat`; the targets are
    contiguous, :func:`fastlt._validation.as_kernel_target`, and ``lade.prior`` fp32)."""
    return lade_kernels.forward_flat(logits, target, lade.prior, lade.alpha, lade.remine_lambda, args,
                                     out_dtype=out_dtype, plans=plans)


# --- torch.compile path: custom ops with registered autograd ----------------------------------------------------
# Under torch.compile the losses are these opaque ops (no graph break); their backward is registered with
# torch.library.register_autograd. Eager calls skip the op dispatch and use the Functions below.

@define("fastlt::adjusted_ce_forward", "Tensor logits, Tensor target", [AdjustedCEArgs], "(Tensor, Tensor, Tensor)")
def adjusted_ce_forward_op(logits, target, *flat):
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    return _forward(logits, target, args)


@adjusted_ce_forward_op.register_fake
def _(logits, target, *flat):
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    N = logits.shape[0]
    loss = logits.new_empty((N,) if args.reduction == "none" else (), dtype=torch.float32)
    stats = 3 if target.is_floating_point() else 2  # class probabilities: W_q too
    return loss, logits.new_empty((stats, N), dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


@define("fastlt::adjusted_ce_backward",
        "Tensor? grad_output, Tensor logits, Tensor target, Tensor row_stats, Tensor row_coef, Tensor? columns",
        [AdjustedCEArgs], "Tensor")
def adjusted_ce_backward_op(grad_output, logits, target, row_stats, row_coef, columns, *flat):
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    column_term = None if columns is None else lade_kernels.column_term(columns, logits.shape[1])  # an op's input
    return _backward(grad_output, logits, target, args, row_stats, row_coef, column_term)


@adjusted_ce_backward_op.register_fake
def _(grad_output, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_adjusted_ce(ctx, inputs, output):
    _, row_stats, row_coef = output
    save_inputs(ctx, inputs, row_stats, row_coef)


def _adjusted_ce_backward(ctx, grad_loss, grad_row_stats, grad_row_coef):
    (logits, target, *flat), (row_stats, row_coef) = saved_inputs(ctx)
    grad = adjusted_ce_backward_op(grad_loss, logits, target, row_stats, row_coef, None, *flat)
    return input_grads(ctx, grad)


adjusted_ce_forward_op.register_autograd(_adjusted_ce_backward, setup_context=_setup_adjusted_ce)


@define("fastlt::lade_forward", "Tensor logits, Tensor target", [AdjustedCEArgs, LadeArgs],
        "(Tensor, Tensor, Tensor, Tensor)")
def lade_forward_op(logits, target, *flat):
    args, lade = O.unflatten([AdjustedCEArgs, LadeArgs], flat)
    return _lade_forward(logits, target, args, lade)


@lade_forward_op.register_fake
def _(logits, target, *flat):
    N, C = logits.shape
    f = torch.float32
    stats = 3 if target.is_floating_point() else 2
    return (logits.new_empty((), dtype=f), logits.new_empty((stats, N), dtype=f), logits.new_empty(N, dtype=f),
            logits.new_empty(lade_kernels.finished_numel(C), dtype=f))


def _setup_lade(ctx, inputs, output):
    _, row_stats, row_coef, columns = output
    save_inputs(ctx, inputs, row_stats, row_coef, columns)


def _lade_backward(ctx, grad_loss, *unused):
    (logits, target, *flat), (row_stats, row_coef, columns) = saved_inputs(ctx)
    args, _ = O.unflatten([AdjustedCEArgs, LadeArgs], flat)
    grad = adjusted_ce_backward_op(grad_loss, logits, target, row_stats, row_coef, columns, *O.flatten(args))
    return input_grads(ctx, grad)


lade_forward_op.register_autograd(_lade_backward, setup_context=_setup_lade)


@define("fastlt::lade_statistics", "Tensor logits, Tensor target", [AdjustedCEArgs],
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def lade_statistics_op(logits, target, *flat):
    """A data-parallel rank's LADE pass (:func:`lade_statistics_triton`): ``(row_sum, col_lse, target_sum, count,
    row_stats, row_coef)``, fp32: the sum of PriorCE's rows (0-dim; ``args``' reduction must be 'sum'), LADER's
    column statistics (C,) (:class:`fastlt.reference.LaderStatistics`), and the rows' saved statistics."""
    (args,) = O.unflatten([AdjustedCEArgs], flat)
    N, C = logits.shape
    loss_rows, row_stats, row_coef, cols = launch.forward(logits, target, args, column_stats=True)
    merged = lade_kernels.merge_partials(cols.partials)
    col_lse = merged[0] + torch.log(merged[1])  # -inf for no valid row
    if target.is_floating_point():  # class probabilities: the partials summed sum_i q_ic z_ic and sum_i q_ic
        return loss_rows.sum(), col_lse, merged[2].clone(), merged[3].clone(), row_stats, row_coef
    valid = target != args.ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    target_sum = torch.zeros(C, dtype=torch.float32, device=logits.device).index_add_(
        0, safe, torch.where(valid, cols.target_logits, torch.zeros_like(cols.target_logits)))
    count = torch.zeros(C, dtype=torch.float32, device=logits.device).index_add_(0, safe, valid.to(torch.float32))
    return loss_rows.sum(), col_lse, target_sum, count, row_stats, row_coef


@lade_statistics_op.register_fake
def _(logits, target, *flat):
    N, C = logits.shape
    f = torch.float32
    stats = 3 if target.is_floating_point() else 2
    return (logits.new_empty((), dtype=f), logits.new_empty(C, dtype=f), logits.new_empty(C, dtype=f),
            logits.new_empty(C, dtype=f), logits.new_empty((stats, N), dtype=f), logits.new_empty(N, dtype=f))


def _setup_lade_statistics(ctx, inputs, output):
    _, col_lse, _, _, row_stats, row_coef = output
    save_inputs(ctx, inputs, row_stats, row_coef, col_lse)


def _lade_statistics_backward(ctx, grad_sum, grad_lse, grad_target_sum, *unused):
    """d/dz_ic = g_sum * (PriorCE row i) + g_T_c [y_i == c] + g_lse_c exp(z_ic - lse_c): the row kernel's gradient
    with the rows' coefficients times ``g_sum`` and LADE's column term made of the statistics' gradients."""
    (logits, target, *flat), (row_stats, row_coef, col_lse) = saved_inputs(ctx)
    C = logits.shape[1]
    zeros = col_lse.new_zeros(C)
    finite = torch.isfinite(col_lse)  # -inf: no valid row here, so the column term is read by no row
    columns = torch.stack([zeros if grad_target_sum is None else grad_target_sum.float(),
                           zeros if grad_lse is None else torch.where(finite, grad_lse.float(), zeros),
                           torch.where(finite, col_lse, zeros)])
    coef = row_coef * (0.0 if grad_sum is None else grad_sum.float())
    grad = adjusted_ce_backward_op(None, logits, target, row_stats, coef, columns, *flat)
    return input_grads(ctx, grad)


lade_statistics_op.register_autograd(_lade_statistics_backward, setup_context=_setup_lade_statistics)


# --- eager path: autograd Functions over the launchers ---------------------------------------------------------

class AdjustedCEFunction(torch.autograd.Function):
    """The adjusted cross-entropy; ``apply(logits, target, args, grad_in_forward, seed, plans)`` -> loss in the
    logits' dtype (float32 under autocast: :func:`fastlt._backend.loss_dtype`); ``seed``: None, or an int noise seed
    in place of ``args``' (a drawn seed of a step that reuses cached ``args``: :func:`adjusted_cross_entropy_triton`);
    ``plans``: None, or the :class:`fastlt.kernels.launch.StepPlans` of these tensors (a loss module's repeated call).

    ``args`` rides on ctx as it is: its (C,) class tensors are buffers of the caller, never outputs of this
    Function, so holding them makes no reference cycle (and skips copies, host time that small batches feel).
    With ``grad_in_forward`` the forward writes d loss / d logits over ``logits`` and backward only rescales it by
    grad_output (a no-op on the device when grad_output is 1), in place: so it can be used once, and a second
    backward through the same graph (``retain_graph=True``) raises instead of rescaling it again. First-order only
    (:func:`fastlt._first_order.first_order`)."""

    @staticmethod
    def forward(ctx, logits, target, args: AdjustedCEArgs, grad_in_forward: bool, seed: int | None, plans=None):
        out_dtype = loss_dtype(logits)
        loss, row_stats, row_coef = launch.loss(logits, target, args, grad_out=logits if grad_in_forward else None,
                                                out_dtype=out_dtype, seed=seed, plans=plans)
        if grad_in_forward:
            # the logits now hold the gradient: an op that saved them (or the tensor they view) for its backward (the
            # output of relu, exp, ...; `torch.relu(h).view(-1, C)`) must raise autograd's in-place error, not read
            # the gradient. They are kept as a detached alias, not saved: unpacking a saved view whose version moved
            # makes autograd rebuild its history, which it refuses for views of multi-output ops (split, chunk,
            # unbind) and of custom Functions, where nothing needs it
            _increment_version(logits)
            ctx.gradient = logits.detach()
            ctx.anchors = (logits,)  # for first_order, to its backward: the storage of the gradient kept to then
            ctx.save_for_backward()
            ctx.recompute = None
            return loss if loss.dtype == out_dtype else loss.to(out_dtype)  # 'none': fp32 rows
        if (kept := _seed_to_keep(args, seed)) is not None:
            # under saved-tensor hooks (a non-reentrant checkpoint) the backward may get the saved tensors of a
            # forward run again, whose drawn seed differs (preserve_rng_state=False): the seed is kept among them, so
            # the row statistics and the noise of the backward are of one draw
            ctx.save_for_backward(logits, target, row_stats, row_coef, torch.tensor(kept, dtype=torch.int64,
                                                                                      device="cpu"))
        else:
            ctx.save_for_backward(logits, target, row_stats, row_coef)
        ctx.recompute = (args, seed, O.inputs_state(args, seed), plans)  # (one attribute: host time)
        return loss if loss.dtype == out_dtype else loss.to(out_dtype)

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        if ctx.recompute is None:  # grad_in_forward: the gradient is in the logits
            gradient, ctx.gradient = ctx.gradient, None  # released with this backward, as saved tensors are
            if gradient is None:
                raise RuntimeError("grad_in_forward=True left the gradient in the logits and the first backward "
                                   "has scaled it in place; the graph cannot be backpropagated twice "
                                   "(retain_graph=True): use grad_in_forward=False for that")
            return launch.scale_by(gradient, grad_loss.contiguous()), None, None, None, None, None
        args, seed, inputs_state, plans = ctx.recompute
        saved = ctx.saved_tensors
        logits, target, row_stats, row_coef = saved[:4]
        ctx.anchors = (logits,)  # (for first_order)
        O.check_inputs_unchanged(inputs_state)
        if len(saved) == 5:  # the seed saved under hooks (see forward)
            seed = int(saved[4])
        grad = launch.grad(logits, target, args, row_stats, row_coef, grad_loss.contiguous(), seed=seed, plans=plans)
        return grad, None, None, None, None, None


class LADEFunction(torch.autograd.Function):
    """LADE: ``apply(logits, target, args, lade, plans)`` -> scalar loss in the logits' dtype (float32 under
    autocast: :func:`fastlt._backend.loss_dtype`); ``args`` its PriorCE operator (:func:`lade_operator_args`),
    ``plans`` as :class:`AdjustedCEFunction`'s."""

    @staticmethod
    def forward(ctx, logits, target, args: AdjustedCEArgs, lade: LadeArgs, plans=None):
        loss, row_stats, row_coef, columns = _lade_forward(logits, target, args, lade, out_dtype=loss_dtype(logits),
                                                           plans=plans)
        ctx.save_for_backward(logits, target, row_stats, row_coef, columns)
        ctx.recompute = (args, O.inputs_state(args), plans)
        return loss

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        logits, target, row_stats, row_coef, columns = ctx.saved_tensors
        args, inputs_state, plans = ctx.recompute
        ctx.anchors = (logits,)  # (for first_order)
        O.check_inputs_unchanged(inputs_state)
        term = adjusted_ce.ColumnTerm(columns=columns)  # the (3 C + P,) fp32 buffer the forward made: no check
        grad = launch.grad(logits, target, args, row_stats, row_coef, grad_loss.contiguous(), column_term=term,
                           plans=plans)
        return grad, None, None, None, None


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active (``torch.utils.checkpoint``'s non-reentrant form, offloading); True where
    this torch cannot say."""
    return _top_hooks is None or _top_hooks(False) is not None


def _seed_to_keep(args: AdjustedCEArgs, seed: int | None = None) -> int | None:
    """The int noise seed of a call (``seed``, else ``args.seed``) that must be kept with the saved tensors: the
    noise is on, the seed is an int (not already a tensor) and saved-tensor hooks are active; else None."""
    seed = args.seed if seed is None else seed
    if args.has_noise and isinstance(seed, int) and _saved_tensor_hooks():
        return seed
    return None


def seed_kept_with_saved_tensors(args: AdjustedCEArgs, device) -> AdjustedCEArgs:
    """``args`` whose int noise seed is a (1,) int64 tensor on ``device`` under saved-tensor hooks, for a custom op
    that keeps its non-tensor inputs on ``ctx`` (the class-parallel finish): there the seed is one of its saved
    inputs, recomputed with the row statistics by a non-reentrant checkpoint (as :class:`AdjustedCEFunction` keeps
    its drawn seed)."""
    if (kept := _seed_to_keep(args)) is not None:
        return dataclasses.replace(args, seed=torch.full((1,), kept, dtype=torch.int64, device=device))
    return args


def _views_a_leaf(t: Tensor) -> bool:
    """Whether ``t`` is a view, made by view ops, of a leaf (``P.view(N, C)``, ``P[:, :]``, an unbatched or (N, C, 1)
    leaf made rows): the gradient written over it replaced the parameter's values, silently. A view a custom
    Function returns is the layer's output it stands for (autograd keeps such views apart: the benchmarks' and tests'
    stand-ins for a layer)."""
    base = t._base
    return base is not None and base.is_leaf and not isinstance(t.grad_fn, torch.autograd.function.BackwardCFunction)


def _elements_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory, by its strides: taken from the smallest, each stride must pass
    the farthest offset the smaller ones reach (a stride 0, an expand; windows of an unfold). May answer True for
    an exotic interleaving that does not overlap; never False for one that does."""
    reach = 0
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


# --- entry points of fastlt.functional ----------------------------------------------------------------------------

# the functional calls' (a module keeps its own): the same fields built and checked once; the last few calls' each,
# so that two losses called in turn every step (a main and an auxiliary loss) do not evict each other's
SHARED_CACHE_SIZE = 4
_LAST_ARGS = O.ArgsCache(SHARED_CACHE_SIZE)
_LAST_LADE = O.ArgsCache(SHARED_CACHE_SIZE)  # LADE's (PriorCE arguments, LadeArgs) likewise

def adjusted_cross_entropy_triton(logits: Tensor, target: Tensor, fields: dict, *, noise: Tensor | None = None,
                                  grad_in_forward: bool = False, cache: O.ArgsCache | None = None) -> Tensor:
    """The adjusted cross-entropy on the kernels; ``fields``: the operator's parameters by name
    (:class:`fastlt._operator.AdjustedCEArgs`, ``seed`` may be None); ``cache``: where the arguments of the last
    call are kept (a loss module's own; default: one shared by every other call)."""
    target = as_kernel_target(target)
    compiling = torch.compiler.is_compiling()
    cache = _LAST_ARGS if cache is None else cache
    # (while compiling nothing is cached, and the noise's seed is an op of the graph: AdjustedCEArgs.from_fields)
    args, seed = cache.operator_args(fields, logits, target,
                                     lambda: O.check_operator_args(logits, target, fields, noise=noise),
                                     use=not compiling and noise is None)
    check_kernel_input("logits", logits, noise)
    args = soft_mean(args, target, logits.shape[0])
    if compiling:  # an opaque op with registered autograd (recompute backward; grad_in_forward ignored)
        loss = adjusted_ce_forward_op(logits, target, *O.flatten(args))[0].to(loss_dtype(logits))
    else:
        loss = adjusted_ce_checked(logits, target, args, grad_in_forward, seed)
    return nan_if_empty(loss, args)


def adjusted_ce_checked(logits: Tensor, target: Tensor, args: AdjustedCEArgs, grad_in_forward: bool,
                        seed: int | None, plans=None) -> Tensor:
    """:class:`AdjustedCEFunction` on checked inputs and arguments (eager, class-index targets or ``args`` already
    through :func:`soft_mean`), after the checks of ``grad_in_forward``: the tail of
    :func:`adjusted_cross_entropy_triton`, and what a loss module's repeated call runs
    (:meth:`fastlt.losses._LongTailLoss._repeated`, with its :class:`fastlt.kernels.launch.StepPlans`)."""
    # no gradient wanted (torch.no_grad, inference_mode, logits that do not require grad: a validation loop with the
    # training criterion): nothing to write, and the caller's logits keep their values
    grad_in_forward = grad_in_forward and logits.requires_grad and torch.is_grad_enabled()
    if grad_in_forward and (logits.is_leaf or _views_a_leaf(logits)):
        raise ValueError("grad_in_forward=True overwrites the logits with their gradient; it cannot be a "
                         "leaf tensor that requires grad, nor a view of one (pass the output of a layer)")
    if grad_in_forward and _elements_overlap(logits):
        raise ValueError(f"grad_in_forward=True overwrites the logits with their gradient, so their elements must "
                         f"not share memory; these do (broadcast by an expand, or overlapping as an unfold's "
                         f"windows: shape {tuple(logits.shape)}, strides {logits.stride()}). Pass them made "
                         f"contiguous, or grad_in_forward=False")
    return AdjustedCEFunction.apply(logits, target, args, bool(grad_in_forward), seed, plans)


def lade_checked(logits: Tensor, target: Tensor, args: AdjustedCEArgs, lade: LadeArgs, seed=None,
                 plans=None) -> Tensor:
    """:class:`LADEFunction` on checked inputs and arguments (class-index targets), as a loss module's repeated call
    runs it (:meth:`fastlt.losses._LongTailLoss._repeated`, with its :class:`fastlt.kernels.launch.StepPlans`;
    LADE draws no seed)."""
    return LADEFunction.apply(logits, target, args, lade, plans)


def lade_loss_triton(logits: Tensor, target: Tensor, prior: Tensor, alpha: float = 0.1, remine_lambda: float = 0.1, *,
                     weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                     label_smoothing: float = 0.0) -> Tensor:
    """LADE on the kernels (arguments as :func:`fastlt.functional.lade_loss`); a call with the same arguments as the
    last one reuses its checked and converted arguments (``_LAST_LADE``, as :func:`adjusted_cross_entropy_triton`)."""
    return lade_fields_triton(logits, target, dict(prior=prior, alpha=alpha, remine_lambda=remine_lambda, weight=weight,
                                                   ignore_index=ignore_index, reduction=reduction,
                                                   label_smoothing=label_smoothing))


def lade_fields_triton(logits: Tensor, target: Tensor, fields: dict, cache: O.ArgsCache | None = None) -> Tensor:
    """:func:`lade_loss_triton` with its arguments as one dict ``fields`` (by those names, all of them): a module
    passes the same dict every step (``LADELoss``'s held fields), which the arguments cache knows by identity, and
    its own ``cache`` (default: one shared by every other call)."""
    target = as_kernel_target(target)
    compiling = torch.compiler.is_compiling()
    args, lade = lade_args(logits, target, fields, _LAST_LADE if cache is None else cache)
    check_kernel_input("logits", logits)
    args = soft_mean(args, target, logits.shape[0])
    if compiling:
        loss = lade_forward_op(logits, target, *O.flatten(args, lade))[0].to(loss_dtype(logits))
    else:
        loss = LADEFunction.apply(logits, target, args, lade)
    return nan_if_empty(loss, args)


def lade_args(logits: Tensor, target: Tensor, fields: dict, cache: O.ArgsCache,
              names: dict | None = None) -> tuple[AdjustedCEArgs, LadeArgs]:
    """LADE's ``(PriorCE arguments, LadeArgs)`` of ``fields`` (:func:`lade_fields_triton`'s) for ``logits`` (N, C)
    (or a broadcast stand-in: the LADE head's), checked and made on a miss of ``cache``, which keeps them (not while
    compiling); ``names``: the caller's names of the fields where they differ (:func:`O.refuse_requiring_grad`)."""
    use = not torch.compiler.is_compiling()

    def check():
        O.check_lade_args(logits, target, fields["prior"], fields["alpha"], fields["remine_lambda"],
                          fields["reduction"])
        O.check_operator_args(logits, target, {name: fields[name] for name in _LADE_OPERATOR_FIELDS})

    cached = cache.checked(fields, logits, target, fields["ignore_index"], check, use=use, names=names)
    if cached is None:
        cached = lade_operator_args(**fields)
        if use:
            cache.store(fields, logits, cached)
    return cached


_LADE_OPERATOR_FIELDS = ("weight", "ignore_index", "reduction", "label_smoothing")  # PriorCE's own, checked as such


def lade_statistics_triton(logits: Tensor, target: Tensor, prior: Tensor, *, weight: Tensor | None = None,
                           ignore_index: int = -100, label_smoothing: float = 0.0):
    """One data-parallel rank's LADE pass on the kernels: ``(row_sum, stats)``, the sum of PriorCE's rows (0-dim
    fp32; class weights and smoothing applied per row) and LADER's :class:`fastlt.reference.LaderStatistics` of the
    rows (fp32), both differentiable in ``logits`` (one custom op; the backward is one row-kernel launch)."""
    target = as_kernel_target(target)
    O.check_operator_args(logits, target, dict(weight=weight, ignore_index=ignore_index, reduction="sum",
                                               label_smoothing=label_smoothing))
    check_kernel_input("logits", logits)
    O.refuse_requiring_grad(dict(prior=prior, weight=weight))
    args, _ = lade_operator_args(prior, 0.0, 0.0, weight=weight, label_smoothing=label_smoothing,
                                 ignore_index=ignore_index, reduction="sum")
    row_sum, col_lse, target_sum, count, _, _ = lade_statistics_op(logits, target, *O.flatten(args))
    if target.is_floating_point():
        valid = torch.full((), float(logits.shape[0]), dtype=torch.float32, device=logits.device)
    else:
        valid = (target != ignore_index).sum(dtype=torch.float32)
    return row_sum, LaderStatistics(col_lse=col_lse, target_sum=target_sum, count=count, valid=valid)


def check_kernel_input(name: str, t: Tensor, noise: Tensor | None = None) -> None:
    """What the Triton path cannot take: float64 input (the reference path can), explicit noise, and
    ``torch.jit.trace`` (its tracer hands the launch plans tensors for sizes)."""
    if torch.jit.is_tracing():
        raise RuntimeError("torch.jit.trace cannot trace the Triton kernels; use torch.compile or torch.export "
                           "(the kernels are registered custom ops there), or backend='torch'")
    if t.dtype == torch.float64:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 {name}; use backend='torch' "
                        "for float64")
    if noise is not None:
        raise ValueError("noise= is a reference-path option (backend='torch'); the kernels draw the noise "
                         "from seed= inside the kernel")


def lade_operator_args(prior: Tensor, alpha: float, remine_lambda: float, *, weight, label_smoothing, ignore_index,
                       reduction) -> tuple[AdjustedCEArgs, LadeArgs]:
    """LADE's PriorCE operator (``log(pi + 1e-9)`` offset, the official PriorCELoss's; tau = 1) and its
    :class:`fastlt._operator.LadeArgs` (pi fp32)."""
    pi, log_pi = _prior_and_log(prior)
    args = AdjustedCEArgs.from_kwargs(prior.device, log_prior=log_pi, weight=weight, label_smoothing=label_smoothing,
                                      ignore_index=ignore_index, reduction=reduction)
    return args, LadeArgs(prior=pi, alpha=float(alpha), remine_lambda=float(remine_lambda))


def _pi_and_log(prior: Tensor) -> tuple[Tensor, Tensor]:
    pi = O.as_f32(prior)
    return pi, R._log_of_prior(pi, torch.float32)


_PRIOR_LOG = O.HeldDerived(_pi_and_log)  # the last prior's (pi, log(pi + 1e-9)), held strongly (one entry)


def _prior_and_log(prior: Tensor) -> tuple[Tensor, Tensor]:
    """``(pi, log(pi + 1e-9))`` (PriorCE's offset) as contiguous fp32, computed once per prior tensor (a module's
    buffer, typically) and again only after it changes (:func:`fastlt._operator.tensor_stamp`: in place, by
    ``.data =``, a swap or a cast; a version alone missed the last three: a stale log prior, or a half prior
    handed to the kernels). One entry, the last prior's (the arguments cache keeps each module's operator
    arguments; this serves its misses and the data-parallel statistics). Not cached while compiling or capturing
    a CUDA graph (a tensor made during capture holds nothing until replay)."""
    if torch.compiler.is_compiling() or (prior.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _pi_and_log(prior)
    return _PRIOR_LOG(prior)
