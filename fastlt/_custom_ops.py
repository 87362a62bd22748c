"""``torch.library`` custom ops whose schemas come from the declared parameter groups (:mod:`fastlt._operator`), and
the autograd bookkeeping they share: no argument list is written out, and none is read by position."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ._operator import op_schema

__all__ = ["define", "save_inputs", "saved_inputs", "input_grads"]


def define(name: str, inputs: str, groups: Iterable[type], outputs: str):
    """A decorator making ``fn(*inputs, *flat)`` the custom op ``name`` with schema ``(inputs, <groups' slots>) ->
    outputs`` (:func:`fastlt._operator.op_schema`); the op mutates nothing."""
    return torch.library.custom_op(name, mutates_args=(), schema=op_schema(inputs, groups, outputs))


def save_inputs(ctx, inputs: tuple, *extra: Tensor, keep: bool = True) -> None:
    """In a ``setup_context``: keep the op's ``inputs`` for its backward, the tensors among them (and ``extra``
    tensors, outputs say) through ``save_for_backward``, the rest (numbers, None) on ``ctx``. ``keep=False``: only
    ``extra`` and the number of inputs (for :func:`input_grads`), not the inputs themselves."""
    is_tensor = tuple(keep and isinstance(v, Tensor) for v in inputs)
    ctx.save_for_backward(*(v for v, t in zip(inputs, is_tensor, strict=True) if t), *extra)
    ctx.op_inputs = tuple(None if t or not keep else v for v, t in zip(inputs, is_tensor, strict=True))
    ctx.op_is_tensor = is_tensor


def saved_inputs(ctx) -> tuple[tuple, tuple]:
    """``(inputs, extra)`` as :func:`save_inputs` kept them."""
    saved = iter(ctx.saved_tensors)
    inputs = tuple(next(saved) if t else v for v, t in zip(ctx.op_inputs, ctx.op_is_tensor, strict=True))
    return inputs, tuple(saved)


def input_grads(ctx, *grads) -> tuple:
    """The registered backward's return: ``grads`` for the op's first inputs, None for every other input."""
    return grads + (None,) * (len(ctx.op_inputs) - len(grads))
