"""Autograd Functions over the Triton kernels, registered as ``torch.library`` custom ops
(``fastlt::row_loss_forward``, ``fastlt::row_loss_forward_grad_inplace``, ``fastlt::row_loss_backward``,
``fastlt::scale_grad_``, ``fastlt::lade_forward``) so ``torch.compile`` sees opaque ops, not graph breaks.

The Function takes the logits, the targets and one ``RowOperatorArgs``; backward returns one
gradient and ``None`` for the rest. Nothing here synchronises with the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import as_index_target
from .kernels import lade as lade_kernels  # noqa: I001
from .kernels import launch
from .kernels.launch import RowOperatorArgs
from .noise import draw_seed
from .reference import check_lade_args, check_operator_args

_REDUCTIONS = ("mean", "sum", "none")


def _args(prior, cloud, margin, weight, tau, noise_mul, margin_value, has_margin, scale, gamma, label_smoothing,
          ignore_index, seed, reduction) -> RowOperatorArgs:
    return RowOperatorArgs(prior=prior, cloud=cloud, margin=margin, weight=weight, tau=tau, noise_mul=noise_mul,
                           margin_value=margin_value, has_margin=has_margin, scale=scale, gamma=gamma,
                           label_smoothing=label_smoothing, ignore_index=ignore_index, seed=seed,
                           reduction=_REDUCTIONS[reduction])


def _flat(a: RowOperatorArgs) -> tuple:
    return (a.prior, a.cloud, a.margin, a.weight, a.tau, a.noise_mul, a.margin_value, a.has_margin, a.scale,
            a.gamma, a.label_smoothing, a.ignore_index, a.seed, _REDUCTIONS.index(a.reduction))


def _forward_impl(logits, target, args: RowOperatorArgs, grad_out):
    loss_rows, lse, factor, _ = launch.forward(logits, target, args, grad_out=grad_out)
    return _reduced(loss_rows, target, args), lse, factor


def _reduced(loss_rows: Tensor, target: Tensor, args: RowOperatorArgs) -> Tensor:
    """Apply the reduction in fp32 ('mean': divide by sum of w_{y_i} over valid rows, NaN when empty)."""
    if args.reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if args.reduction == "sum":
        return total
    valid = target != args.ignore_index
    if args.weight is None:
        return total / valid.sum()
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return total / (args.weight.to(torch.float32)[safe] * valid).sum()


# --- custom ops ------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlt::row_loss_forward", mutates_args=())
def row_loss_forward_op(logits: Tensor, target: Tensor, prior: Tensor | None, cloud: Tensor | None,
                        margin: Tensor | None, weight: Tensor | None, tau: float, noise_mul: float,
                        margin_value: float, has_margin: bool, scale: float, gamma: float, label_smoothing: float,
                        ignore_index: int, seed: int, reduction: int) -> tuple[Tensor, Tensor, Tensor]:
    args = _args(prior, cloud, margin, weight, tau, noise_mul, margin_value, has_margin, scale, gamma,
                 label_smoothing, ignore_index, seed, reduction)
    return _forward_impl(logits, target, args, None)


@torch.library.custom_op("fastlt::row_loss_forward_grad_inplace", mutates_args=("logits",))
def row_loss_forward_grad_inplace_op(logits: Tensor, target: Tensor, prior: Tensor | None,
                                     cloud: Tensor | None, margin: Tensor | None, weight: Tensor | None,
                                     tau: float, noise_mul: float, margin_value: float, has_margin: bool,
                                     scale: float, gamma: float, label_smoothing: float, ignore_index: int,
                                     seed: int, reduction: int) -> tuple[Tensor, Tensor, Tensor]:
    args = _args(prior, cloud, margin, weight, tau, noise_mul, margin_value, has_margin, scale, gamma,
                 label_smoothing, ignore_index, seed, reduction)
    return _forward_impl(logits, target, args, logits)


def _fake_forward(logits, target, *rest):
    reduction = _REDUCTIONS[rest[-1]]
    N = logits.shape[0]
    loss = logits.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty((2, N), dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


row_loss_forward_op.register_fake(_fake_forward)
row_loss_forward_grad_inplace_op.register_fake(_fake_forward)


@torch.library.custom_op("fastlt::row_loss_backward", mutates_args=())
def row_loss_backward_op(grad_output: Tensor, logits: Tensor, target: Tensor, lse: Tensor, factor: Tensor,
                         prior: Tensor | None, cloud: Tensor | None, margin: Tensor | None,
                         weight: Tensor | None, tau: float, noise_mul: float, margin_value: float,
                         has_margin: bool, scale: float, gamma: float, label_smoothing: float, ignore_index: int,
                         seed: int, reduction: int, col_a: Tensor | None, col_b: Tensor | None,
                         col_lse: Tensor | None) -> Tensor:
    args = _args(prior, cloud, margin, weight, tau, noise_mul, margin_value, has_margin, scale, gamma,
                 label_smoothing, ignore_index, seed, reduction)
    column = None
    if col_a is not None:
        g = grad_output.to(torch.float32)
        column = ((col_a * g).contiguous(), (col_b * g).contiguous(), col_lse)
    return launch.grad(logits, target, args, lse, factor, grad_output.contiguous(), column_term=column)


@row_loss_backward_op.register_fake
def _(grad_output, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastlt::scale_grad_", mutates_args=("grad",))
def scale_grad_op(grad: Tensor, grad_output: Tensor) -> None:
    launch.scale_by(grad, grad_output.contiguous())


@scale_grad_op.register_fake
def _(grad, grad_output):
    return None


@torch.library.custom_op("fastlt::lade_forward", mutates_args=())
def lade_forward_op(logits: Tensor, target: Tensor, log_prior: Tensor, pi: Tensor, weight: Tensor | None,
                    alpha: float, remine_lambda: float, label_smoothing: float, ignore_index: int,
                    reduction: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = RowOperatorArgs(prior=log_prior, weight=weight, tau=1.0, label_smoothing=label_smoothing,
                           ignore_index=ignore_index, reduction=_REDUCTIONS[reduction])
    loss_rows, lse, factor, lader, col_a, col_b, col_lse = lade_kernels.forward(logits, target, pi, remine_lambda,
                                                                               args)
    loss = _reduced(loss_rows, target, args) + alpha * lader
    return loss, lse, factor, alpha * col_a, alpha * col_b, col_lse


@lade_forward_op.register_fake
def _(logits, target, log_prior, pi, weight, alpha, remine_lambda, label_smoothing, ignore_index, reduction):
    N, C = logits.shape
    f = torch.float32
    return (logits.new_empty((), dtype=f), logits.new_empty((2, N), dtype=f), logits.new_empty(N, dtype=f),
            logits.new_empty(C, dtype=f), logits.new_empty(C, dtype=f), logits.new_empty(C, dtype=f))


# --- autograd ---------------------------------------------------------------------------------------------

class RowOperatorLoss(torch.autograd.Function):
    """SPEC 2.4 operator; ``forward(logits, target, args, grad_in_forward)`` -> loss in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, target, args: RowOperatorArgs, grad_in_forward: bool):
        if torch.compiler.is_compiling():
            op = row_loss_forward_grad_inplace_op if grad_in_forward else row_loss_forward_op
            loss, lse, factor = op(logits, target, *_flat(args))
        else:  # eager: skip the custom-op dispatch (host time), same implementation
            loss, lse, factor = _forward_impl(logits, target, args, logits if grad_in_forward else None)
        ctx.save_for_backward(logits, target, lse, factor)
        ctx.args, ctx.grad_in_forward = args, grad_in_forward
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse, factor = ctx.saved_tensors
        if ctx.grad_in_forward:
            scale_grad_op(logits, grad_loss) if torch.compiler.is_compiling() else launch.scale_by(
                logits, grad_loss.contiguous())
            return logits, None, None, None
        if torch.compiler.is_compiling():
            grad = row_loss_backward_op(grad_loss, logits, target, lse, factor, *_flat(ctx.args), None, None, None)
        else:
            grad = launch.grad(logits, target, ctx.args, lse, factor, grad_loss.contiguous())
        return grad, None, None, None


class LADELossFunction(torch.autograd.Function):
    """LADE: ``forward(logits, target, log_prior, pi, args, alpha, remine_lambda)`` -> scalar loss."""

    @staticmethod
    def forward(ctx, logits, target, pi, args: RowOperatorArgs, alpha: float, remine_lambda: float):
        loss, lse, factor, col_a, col_b, col_lse = lade_forward_op(
            logits, target, args.prior, pi, args.weight, alpha, remine_lambda, args.label_smoothing,
            args.ignore_index, _REDUCTIONS.index(args.reduction))
        ctx.save_for_backward(logits, target, lse, factor, col_a, col_b, col_lse)
        ctx.args = args
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse, factor, col_a, col_b, col_lse = ctx.saved_tensors
        grad = row_loss_backward_op(grad_loss, logits, target, lse, factor, *_flat(ctx.args), col_a, col_b,
                                    col_lse)
        return grad, None, None, None, None, None


# --- entry points used by fastlt.functional ------------------------------------------------------------------

def adjusted_cross_entropy_triton(logits, target, *, prior=None, tau=1.0, cloud=None, noise_mul=0.0, noise=None,
                                  seed=None, margin=None, scale=1.0, gamma=0.0, weight=None, ignore_index=-100,
                                  reduction="mean", label_smoothing=0.0, grad_in_forward=False) -> Tensor:
    target = as_index_target(target)
    check_operator_args(logits, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul, noise=noise,
                        seed=seed, margin=margin, scale=scale, gamma=gamma, weight=weight,
                        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if logits.dtype == torch.float64:
        raise TypeError("the Triton kernels take float32, bfloat16 or float16 logits; use backend='torch' "
                        "for float64")
    if noise is not None:
        raise ValueError("noise= is a reference-path option (backend='torch'); the kernels draw the noise "
                         "from seed= inside the kernel")
    if grad_in_forward:
        if logits.requires_grad and logits.is_leaf:
            raise ValueError("grad_in_forward=True overwrites the logits with their gradient; it cannot be a "
                             "leaf tensor that requires grad (pass the output of a layer)")
    has_noise = cloud is not None and noise_mul != 0.0
    if has_noise and seed is None:
        seed = draw_seed()
    margin_t = margin if isinstance(margin, torch.Tensor) else None
    args = RowOperatorArgs(
        prior=_as_f32(prior), cloud=_as_f32(cloud), margin=_as_f32(margin_t), weight=_as_f32(weight),
        tau=float(tau), noise_mul=float(noise_mul), margin_value=0.0 if margin is None or margin_t is not None
        else float(margin), has_margin=margin is not None, scale=float(scale), gamma=float(gamma),
        label_smoothing=float(label_smoothing), ignore_index=int(ignore_index), seed=int(seed or 0),
        reduction=reduction)
    return RowOperatorLoss.apply(logits, target, args, bool(grad_in_forward))


def lade_loss_triton(logits, target, prior, alpha=0.1, remine_lambda=0.1, *, weight=None, ignore_index=-100,
                     reduction="mean", label_smoothing=0.0) -> Tensor:
    target = as_index_target(target)
    check_lade_args(logits, target, prior, alpha, remine_lambda, reduction)
    check_operator_args(logits, target, prior=prior, tau=1.0, cloud=None, noise_mul=0.0, noise=None, seed=None,
                        margin=None, scale=1.0, gamma=0.0, weight=weight, ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)
    if logits.dtype == torch.float64:
        raise TypeError("the Triton kernels take float32, bfloat16 or float16 logits; use backend='torch' "
                        "for float64")
    pi = _as_f32(prior)
    args = RowOperatorArgs(prior=torch.log(pi), weight=_as_f32(weight), tau=1.0,
                           label_smoothing=float(label_smoothing), ignore_index=int(ignore_index),
                           reduction=reduction)
    return LADELossFunction.apply(logits, target, pi, args, float(alpha), float(remine_lambda))


def _as_f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()
