"""The input shapes ``torch.nn.functional.cross_entropy`` takes, as (rows, classes) for the operator.

- ``(N, C)`` logits with ``(N,)`` class indices or ``(N, C)`` class probabilities: as they are;
- ``(C,)`` unbatched logits with a 0-dim index or a ``(C,)`` probability target: one row;
- ``(N, C, d1, ..., dk)`` logits (segmentation) with ``(N, d1, ..., dk)`` indices or ``(N, C, d1, ..., dk)``
  probabilities: the ``N * d1 * ... * dk`` positions as rows (``movedim(1, -1)``; a copy unless the layout already
  is channels-last), in the order ``(n, d1, ..., dk)``, which is also the order of GCL's noise rows.

'none' results come back in the targets' shape (``()``, ``(N,)`` or ``(N, d1, ..., dk)``); 'mean' over hard
targets divides by the sum of the valid positions' weights, over probabilities by the number of positions, as
torch does.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["Rows", "as_rows", "restore", "is_soft", "num_classes_of"]


class Rows(NamedTuple):
    """``logits`` (M, C) and ``target`` (M,) or (M, C) as the operator takes them; ``shape``: the 'none' result's
    shape when it is not (M,), else None."""

    logits: Tensor
    target: Tensor
    shape: tuple | None


def is_soft(logits, target) -> bool:
    """Whether ``target`` holds class probabilities: a floating tensor of the logits' shape."""
    return (isinstance(target, Tensor) and isinstance(logits, Tensor) and target.is_floating_point()
            and target.dim() == logits.dim() and target.dim() > 0)


def as_rows(logits, target) -> Rows:
    """``(logits, target)`` of any shape ``F.cross_entropy`` takes as (M, C) rows (see the module). Shapes that
    do not match raise ``ValueError`` naming the argument; a 2-D input passes through untouched."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor) or logits.dim() == 2:
        return Rows(logits, target, None)  # the checks of the operator name what is wrong
    soft = is_soft(logits, target)
    if logits.dim() == 0:
        raise ValueError("logits must have a class dimension: (C,), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    if target.is_floating_point() and not soft:  # (named here, in the caller's shapes, not the rows')
        want = () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
        raise TypeError(f"target must hold integer class indices of shape {want} or class probabilities of the "
                        f"logits' shape {tuple(logits.shape)}, got {target.dtype} of shape {tuple(target.shape)}")
    if soft and target.shape != logits.shape:
        raise ValueError(f"class-probability targets must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(target.shape)}")
    if logits.dim() == 1:
        if soft:
            return Rows(logits[None], target[None], ())
        if target.dim() != 0:
            raise ValueError(f"unbatched logits of shape {tuple(logits.shape)} take a 0-dim target (a class index) "
                             f"or class probabilities of shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        return Rows(logits[None], target.reshape(1), ())
    C = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, C)
    if soft:
        return Rows(rows, target.movedim(1, -1).reshape(-1, C), (logits.shape[0], *logits.shape[2:]))
    want = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != want:
        raise ValueError(f"logits of shape {tuple(logits.shape)} (N, C, d1, ...) take targets of shape {want} "
                         f"(N, d1, ...), got {tuple(target.shape)}")
    return Rows(rows, target.reshape(-1), want)


def restore(loss: Tensor, rows: Rows) -> Tensor:
    """A loss computed on ``rows`` in the shape of the original targets (only 'none' results change)."""
    if rows.shape is None or loss.dim() == 0:
        return loss
    return loss.reshape(rows.shape)


def num_classes_of(logits: Tensor) -> int:
    """C of logits shaped (C,), (N, C) or (N, C, d1, ...)."""
    return logits.shape[0] if logits.dim() == 1 else logits.shape[1]

