"""``first_order``: the backward decorator of the fused autograd Functions, which are first-order only.

Their backward kernels compute d loss / d input in one fused pass and have no derivative of their own. Under
``create_graph=True`` (grad mode on inside the backward) the gradients are still computed and returned, but made to
raise a clear error if anything backpropagates through them. PyTorch's ``once_differentiable`` does that only when
an incoming gradient requires grad, which a scalar loss's seed gradient never does: ``autograd.grad(loss, x,
create_graph=True)`` then returns a gradient whose ``.backward()`` fails with "does not require grad". And an error
node is run only where it leads to what the engine is asked for, so it must lead to the Function's inputs too, or a
second differentiation toward them (``inputs=``, ``torch.autograd.functional.hessian``) silently skips it and the
second-order term is 0 or None. Without ``create_graph`` this costs one flag check.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

_MESSAGE = (b"trying to differentiate twice a fastlt fused loss: its kernels are first-order only; use "
            b"backend='torch' (the reference path) for higher-order gradients")


def first_order(backward):
    """Decorate an autograd Function's ``backward(ctx, *grad_outputs)``. Under ``create_graph=True`` the returned
    gradients lead back, through the error, to the Function's inputs and to any ``grad_output`` that requires grad:
    so a second differentiation raises whatever it asks for (``backward(inputs=...)``, ``autograd.grad(...,
    allow_unused=True)``, ``torch.autograd.functional.hessian``), where fresh leaves alone were never reached and
    left the second-order term silently 0 or None. The inputs are ``ctx.anchors``: set by the forward where the
    gradient is made there (nothing is saved), else by the backward from the saved tensors it unpacked (a
    non-reentrant checkpoint lets each be unpacked once); dropped after each backward, so they hold nothing
    longer."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled():
            outputs = backward(ctx, *grad_outputs)
            if getattr(ctx, "anchors", None):
                ctx.anchors = ()
            return outputs
        with torch.no_grad():
            outputs = backward(ctx, *grad_outputs)
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        anchors = [t for t in (*getattr(ctx, "anchors", ()), *grad_outputs)
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        ctx.anchors = ()
        err = _functions.DelayedError(_MESSAGE, len(outputs) + len(anchors))

        def alias(t):
            if t is None:
                return None
            t = t.detach()
            t.requires_grad_(True)
            return t

        try:
            wrapped = err(*[alias(t) for t in outputs], *anchors)
        except RuntimeError as exc:  # an anchor autograd cannot take as an input now (a multi-output op's view
            raise RuntimeError(_MESSAGE.decode()) from exc  # written in place): raise at once
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        return wrapped[0] if single else wrapped[:len(outputs)]

    return wrapper
