"""Autograd over the Triton kernels, two ways to the same launchers:

- eager: ``RowOperatorLoss`` / ``LADELossFunction`` (autograd Functions taking the logits, the targets
  and one ``RowOperatorArgs``; backward returns one gradient and ``None`` for the rest);
- ``torch.compile``: the ``torch.library`` custom ops ``fastlt::row_loss_forward``,
  ``fastlt::row_loss_backward`` and ``fastlt::lade_forward`` with ``register_autograd``, so the
  compiler sees opaque ops, not graph breaks. Under compile ``grad_in_forward`` is ignored (an op that
  mutates its input cannot carry registered autograd): the recompute backward runs instead.

Nothing here synchronises with the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._first_order import first_order
from ._validation import as_index_target
from .kernels import lade as lade_kernels  # noqa: I001
from .kernels import launch
from .kernels.launch import RowOperatorArgs
from .noise import SEED_BITS, draw_seed
from .reference import check_lade_args, check_operator_args

_REDUCTIONS = ("mean", "sum", "none")
# bumps a tensor's version counter after a write autograd did not see (torch >= 2.1; a no-op before)
_increment_version = getattr(torch.autograd.graph, "increment_version", lambda tensor: None)


def _args(prior, cloud, margin, weight, tau, noise_mul, margin_value, has_margin, scale, gamma, label_smoothing,
          ignore_index, seed, reduction, seed_tensor=None) -> RowOperatorArgs:
    return RowOperatorArgs(prior=prior, cloud=cloud, margin=margin, weight=weight, tau=tau, noise_mul=noise_mul,
                           margin_value=margin_value, has_margin=has_margin, scale=scale, gamma=gamma,
                           label_smoothing=label_smoothing, ignore_index=ignore_index, seed=seed,
                           reduction=_REDUCTIONS[reduction], seed_tensor=seed_tensor)


def _flat(a: RowOperatorArgs) -> tuple:
    return (a.prior, a.cloud, a.margin, a.weight, a.tau, a.noise_mul, a.margin_value, a.has_margin, a.scale,
            a.gamma, a.label_smoothing, a.ignore_index, a.seed, _REDUCTIONS.index(a.reduction), a.seed_tensor)


def _forward_impl(logits, target, args: RowOperatorArgs, grad_out, out_dtype=torch.float32):
    """``(loss, lse, factor)``: the row kernel, whose last program reduces the batch (see :func:`launch.loss`)."""
    return launch.loss(logits, target, args, grad_out=grad_out, out_dtype=out_dtype)


# --- torch.compile path: custom ops with registered autograd --------------------------------------------------
# Under torch.compile the losses are these opaque ops (no graph break); their backward is registered with
# torch.library.register_autograd. Eager calls skip the op dispatch and use the Functions below.


@torch.library.custom_op("fastlt::row_loss_forward", mutates_args=())
def row_loss_forward_op(logits: Tensor, target: Tensor, prior: Tensor | None, cloud: Tensor | None,
                        margin: Tensor | None, weight: Tensor | None, tau: float, noise_mul: float,
                        margin_value: float, has_margin: bool, scale: float, gamma: float, label_smoothing: float,
                        ignore_index: int, seed: int, reduction: int,
                        seed_tensor: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    args = _args(prior, cloud, margin, weight, tau, noise_mul, margin_value, has_margin, scale, gamma,
                 label_smoothing, ignore_index, seed, reduction, seed_tensor)
    return _forward_impl(logits, target, args, None)


@row_loss_forward_op.register_fake
def _(logits, target, *rest):
    reduction = _REDUCTIONS[rest[-2]]
    N = logits.shape[0]
    loss = logits.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty((2, N), dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("fastlt::row_loss_backward", mutates_args=())
def row_loss_backward_op(grad_output: Tensor, logits: Tensor, target: Tensor, lse: Tensor, factor: Tensor,
                         prior: Tensor | None, cloud: Tensor | None, margin: Tensor | None,
                         weight: Tensor | None, tau: float, noise_mul: float, margin_value: float,
                         has_margin: bool, scale: float, gamma: float, label_smoothing: float, ignore_index: int,
                         seed: int, reduction: int, col_a: Tensor | None, col_b: Tensor | None,
                         col_lse: Tensor | None, seed_tensor: Tensor | None) -> Tensor:
    args = _args(prior, cloud, margin, weight, tau, noise_mul, margin_value, has_margin, scale, gamma,
                 label_smoothing, ignore_index, seed, reduction, seed_tensor)
    return _backward_impl(grad_output, logits, target, args, lse, factor,
                          None if col_a is None else (col_a, col_b, col_lse))


@row_loss_backward_op.register_fake
def _(grad_output, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_row_loss(ctx, inputs, output):
    logits, target, prior, cloud, margin, weight, *scalars, seed_tensor = inputs
    _, lse, factor = output
    ctx.save_for_backward(logits, target, lse, factor, prior, cloud, margin, weight, seed_tensor)
    ctx.scalars = scalars


def _row_loss_backward(ctx, grad_loss, grad_lse, grad_factor):
    logits, target, lse, factor, prior, cloud, margin, weight, seed_tensor = ctx.saved_tensors
    grad = row_loss_backward_op(grad_loss, logits, target, lse, factor, prior, cloud, margin, weight, *ctx.scalars,
                                None, None, None, seed_tensor)
    return (grad,) + (None,) * 16


row_loss_forward_op.register_autograd(_row_loss_backward, setup_context=_setup_row_loss)


@torch.library.custom_op("fastlt::lade_forward", mutates_args=())
def lade_forward_op(logits: Tensor, target: Tensor, log_prior: Tensor, pi: Tensor, weight: Tensor | None,
                    alpha: float, remine_lambda: float, label_smoothing: float, ignore_index: int,
                    reduction: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = _lade_args(log_prior, weight, label_smoothing, ignore_index, reduction)
    return _lade_forward_impl(logits, target, pi, args, alpha, remine_lambda)


@lade_forward_op.register_fake
def _(logits, target, log_prior, pi, weight, alpha, remine_lambda, label_smoothing, ignore_index, reduction):
    N, C = logits.shape
    f = torch.float32
    return (logits.new_empty((), dtype=f), logits.new_empty((2, N), dtype=f), logits.new_empty(N, dtype=f),
            logits.new_empty((3, C), dtype=f))


def _setup_lade(ctx, inputs, output):
    logits, target, log_prior, pi, weight, alpha, remine_lambda, label_smoothing, ignore_index, reduction = inputs
    _, lse, factor, columns = output
    ctx.save_for_backward(logits, target, lse, factor, columns, log_prior, weight)
    ctx.scalars = (label_smoothing, ignore_index, reduction)


def _lade_backward(ctx, grad_loss, *unused):
    logits, target, lse, factor, columns, log_prior, weight = ctx.saved_tensors
    label_smoothing, ignore_index, reduction = ctx.scalars
    grad = row_loss_backward_op(grad_loss, logits, target, lse, factor, log_prior, None, None, weight, 1.0, 0.0,
                                0.0, False, 1.0, 0.0, label_smoothing, ignore_index, 0, reduction, columns[0],
                                columns[1], columns[2], None)
    return (grad,) + (None,) * 9


lade_forward_op.register_autograd(_lade_backward, setup_context=_setup_lade)


# --- implementations shared by both paths ----------------------------------------------------------------------

def _backward_impl(grad_output, logits, target, args, lse, factor, column):
    """The recompute backward; ``column``: LADE's column term, which the kernel scales by the scalar
    ``grad_output`` itself."""
    return launch.grad(logits, target, args, lse, factor, grad_output.contiguous(), column_term=column)


def _lade_args(log_prior, weight, label_smoothing, ignore_index, reduction) -> RowOperatorArgs:
    return RowOperatorArgs(prior=log_prior, weight=weight, tau=1.0, label_smoothing=label_smoothing,
                           ignore_index=ignore_index, reduction=_REDUCTIONS[reduction])


def _lade_forward_impl(logits, target, pi, args, alpha, remine_lambda, out_dtype=torch.float32):
    """``(loss, lse, factor, columns)``, ``columns`` the (3, C) column term: two launches
    (:func:`fastlt.kernels.lade.forward`)."""
    loss, lse, factor, terms = lade_kernels.forward(logits, target, pi, alpha, remine_lambda, args,
                                                    out_dtype=out_dtype)
    return loss, lse, factor, terms.columns


# --- eager path: autograd Functions over the launchers ---------------------------------------------------------

def _save(ctx, args: RowOperatorArgs, *tensors) -> None:
    """Save ``tensors`` for backward and keep ``args`` on ctx as is: its (C,) class tensors are buffers of the
    caller, never outputs of this Function, so holding them on ctx makes no reference cycle (and skips two
    dataclass copies per step, host time that small batches feel)."""
    ctx.save_for_backward(*tensors)
    ctx.args = args


def _restore(ctx) -> tuple[RowOperatorArgs, tuple]:
    return ctx.args, ctx.saved_tensors


class RowOperatorLoss(torch.autograd.Function):
    """SPEC 2.4 operator; ``apply(logits, target, args, grad_in_forward)`` -> loss in the logits' dtype.

    With ``grad_in_forward`` the forward writes d loss / d logits over ``logits`` and backward only
    rescales it by grad_output (a no-op on the device when grad_output is 1), in place: so it can be used once, and
    a second backward through the same graph (``retain_graph=True``) raises instead of rescaling it again.
    First-order only (:func:`fastlt._first_order.first_order`): a gradient taken with ``create_graph=True`` cannot be
    differentiated again, and says so."""

    @staticmethod
    def forward(ctx, logits, target, args: RowOperatorArgs, grad_in_forward: bool):
        loss, lse, factor = _forward_impl(logits, target, args, logits if grad_in_forward else None,
                                          out_dtype=logits.dtype)
        if grad_in_forward and logits._base is None:
            # the logits now hold the gradient: an op that saved them for its backward (the output of relu, exp, ...)
            # must raise autograd's in-place error, not read it. Not for a view: autograd forbids in-place writes
            # to a view a custom Function returned, and bumping its version would raise for that too
            _increment_version(logits)
        _save(ctx, args, logits, target, lse, factor)
        ctx.grad_in_forward = grad_in_forward
        ctx.used = False
        return loss if loss.dtype == logits.dtype else loss.to(logits.dtype)  # 'none': fp32 rows

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        args, (logits, target, lse, factor) = _restore(ctx)
        if ctx.grad_in_forward:
            if ctx.used:
                raise RuntimeError("grad_in_forward=True left the gradient in the logits and the first backward "
                                   "has scaled it in place; the graph cannot be backpropagated twice "
                                   "(retain_graph=True): use grad_in_forward=False for that")
            ctx.used = True
            return launch.scale_by(logits, grad_loss.contiguous()), None, None, None
        return _backward_impl(grad_loss, logits, target, args, lse, factor, None), None, None, None


class LADELossFunction(torch.autograd.Function):
    """LADE: ``apply(logits, target, pi, args, alpha, remine_lambda)`` -> scalar loss in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, target, pi, args: RowOperatorArgs, alpha: float, remine_lambda: float):
        loss, lse, factor, columns = _lade_forward_impl(logits, target, pi, args, alpha, remine_lambda,
                                                        out_dtype=logits.dtype)
        _save(ctx, args, logits, target, lse, factor, columns)
        return loss

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        args, (logits, target, lse, factor, columns) = _restore(ctx)
        grad = _backward_impl(grad_loss, logits, target, args, lse, factor, tuple(columns))
        return grad, None, None, None, None, None


# --- entry points used by fastlt.functional ------------------------------------------------------------------

def adjusted_cross_entropy_triton(logits, target, *, prior=None, tau=1.0, cloud=None, noise_mul=0.0, noise=None,
                                  seed=None, margin=None, scale=1.0, gamma=0.0, weight=None, ignore_index=-100,
                                  reduction="mean", label_smoothing=0.0, grad_in_forward=False) -> Tensor:
    target = as_index_target(target)
    check_operator_args(logits, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul, noise=noise,
                        seed=seed, margin=margin, scale=scale, gamma=gamma, weight=weight,
                        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    check_kernel_input("logits", logits, noise)
    if grad_in_forward:
        if logits.requires_grad and logits.is_leaf:
            raise ValueError("grad_in_forward=True overwrites the logits with their gradient; it cannot be a "
                             "leaf tensor that requires grad (pass the output of a layer)")
    args = operator_args(prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul, seed=seed, margin=margin,
                         scale=scale, gamma=gamma, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, device=logits.device)
    if torch.compiler.is_compiling():  # an opaque op with registered autograd (recompute backward)
        return row_loss_forward_op(logits, target, *_flat(args))[0].to(logits.dtype)
    return RowOperatorLoss.apply(logits, target, args, bool(grad_in_forward))


def lade_loss_triton(logits, target, prior, alpha=0.1, remine_lambda=0.1, *, weight=None, ignore_index=-100,
                     reduction="mean", label_smoothing=0.0) -> Tensor:
    target = as_index_target(target)
    check_lade_args(logits, target, prior, alpha, remine_lambda, reduction)
    check_operator_args(logits, target, prior=prior, tau=1.0, cloud=None, noise_mul=0.0, noise=None, seed=None,
                        margin=None, scale=1.0, gamma=0.0, weight=weight, ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)
    check_kernel_input("logits", logits)
    pi, args = lade_operator_args(prior, weight, label_smoothing, ignore_index, reduction)
    if torch.compiler.is_compiling():
        return lade_forward_op(logits, target, args.prior, pi, args.weight, float(alpha), float(remine_lambda),
                               args.label_smoothing, args.ignore_index, _REDUCTIONS.index(reduction))[0].to(
                                   logits.dtype)
    return LADELossFunction.apply(logits, target, pi, args, float(alpha), float(remine_lambda))


def _as_f32(t: Tensor | None) -> Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):  # a module's buffer: as it is, no dispatch
        return t
    return t.to(torch.float32).contiguous()


def check_kernel_input(name: str, t: Tensor, noise: Tensor | None = None) -> None:
    """What the Triton path cannot take: float64 input (the reference path can) and explicit noise."""
    if t.dtype == torch.float64:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 {name}; use backend='torch' "
                        "for float64")
    if noise is not None:
        raise ValueError("noise= is a reference-path option (backend='torch'); the kernels draw the noise "
                         "from seed= inside the kernel")


def operator_args(*, prior, tau, cloud, noise_mul, seed, margin, scale, gamma, weight, ignore_index, reduction,
                  label_smoothing, device) -> RowOperatorArgs:
    """The kernels' arguments for the SPEC 2.4 operator: class tensors as contiguous fp32, floats as floats,
    ``margin`` a float or a (C,) tensor. A seed tensor (one int64 on the logits' ``device``) is read by the kernels
    from device memory. When the noise is on and no seed is given, one is drawn from torch's CPU generator (the
    reference path draws the same one); under ``torch.compile`` it is drawn on ``device`` by an op of the graph
    instead, so each call of the compiled graph gets a fresh one (a host int would break the graph, or be baked into
    it) and a CUDA graph of it redraws it on every replay."""
    if seed is None and cloud is not None and noise_mul != 0.0:
        if torch.compiler.is_compiling():
            seed = torch.randint(0, 2**SEED_BITS, (1,), dtype=torch.int64, device=device)
        else:
            seed = draw_seed()
    seed_tensor = None
    if isinstance(seed, torch.Tensor):
        seed_tensor, seed = seed.reshape(1).contiguous(), 0
    margin_t = margin if isinstance(margin, torch.Tensor) else None
    return RowOperatorArgs(
        prior=_as_f32(prior), cloud=_as_f32(cloud), margin=_as_f32(margin_t), weight=_as_f32(weight),
        tau=float(tau), noise_mul=float(noise_mul), margin_value=0.0 if margin is None or margin_t is not None
        else float(margin), has_margin=margin is not None, scale=float(scale), gamma=float(gamma),
        label_smoothing=float(label_smoothing), ignore_index=int(ignore_index), seed=int(seed or 0),
        reduction=reduction, seed_tensor=seed_tensor)


def lade_operator_args(prior, weight, label_smoothing, ignore_index, reduction) -> tuple[Tensor, RowOperatorArgs]:
    """LADE's ``(pi, args)``: the (C,) fp32 prior and the PriorCE operator (``log pi`` offset, tau = 1)."""
    pi, log_pi = _prior_and_log(prior)
    return pi, RowOperatorArgs(prior=log_pi, weight=_as_f32(weight), tau=1.0,
                               label_smoothing=float(label_smoothing), ignore_index=int(ignore_index),
                               reduction=reduction)


_LOG_PRIORS = WeakIdKeyDictionary()  # prior tensor -> (its _version, fp32 pi, log pi)


def _prior_and_log(prior: Tensor) -> tuple[Tensor, Tensor]:
    """``(pi, log pi)`` as contiguous fp32, computed once per prior tensor (a module's buffer, typically) and
    again only after it changes in place (its ``_version``); held weakly, so a freed prior frees its entry. Not
    cached while compiling or capturing a CUDA graph (a tensor made during capture holds nothing until replay), nor
    for an inference tensor (made under ``torch.inference_mode``: it has no version counter)."""
    if (torch.compiler.is_compiling() or prior.is_inference()
            or (prior.is_cuda and torch.cuda.is_current_stream_capturing())):
        pi = _as_f32(prior)
        return pi, torch.log(pi)
    hit = _LOG_PRIORS.get(prior)
    if hit is None or hit[0] != prior._version:
        pi = _as_f32(prior)
        hit = (prior._version, pi, torch.log(pi))
        _LOG_PRIORS[prior] = hit
    return hit[1], hit[2]
