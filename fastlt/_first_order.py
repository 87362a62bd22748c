"""``first_order``: the backward decorator of the fused autograd Functions, which are first-order only.

Their backward kernels compute d loss / d input in one fused pass and have no derivative of their own. Under
``create_graph=True`` (grad mode on inside the backward) the gradients are still computed and returned, but made to
raise a clear error if anything backpropagates through them. PyTorch's ``once_differentiable`` does that only when
an incoming gradient requires grad, which a scalar loss's seed gradient never does: ``autograd.grad(loss, x,
create_graph=True)`` then returns a gradient whose ``.backward()`` fails with "does not require grad" (or a
second-order term is silently dropped). Without ``create_graph`` this costs one flag check.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

_MESSAGE = (b"trying to differentiate twice a fastlt fused loss: its kernels are first-order only; use "
            b"backend='torch' (the reference path) for higher-order gradients")


def first_order(backward):
    """Decorate an autograd Function's ``backward(ctx, *grad_outputs)``."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled():
            return backward(ctx, *grad_outputs)
        with torch.no_grad():
            outputs = backward(ctx, *grad_outputs)
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        err = _functions.DelayedError(_MESSAGE, len(outputs))

        def alias(t):
            if t is None:
                return None
            t = t.detach()
            t.requires_grad_(True)
            return t

        wrapped = err(*[alias(t) for t in outputs])
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        return wrapped[0] if single else wrapped

    return wrapper
