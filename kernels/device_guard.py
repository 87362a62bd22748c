"""Launchers run on their tensors' GPU: Triton launches on the *current* CUDA device (and its current stream), so
tensors on ``cuda:1`` while ``cuda:0`` is current (a model moved with ``.to('cuda:1')``, no ``set_device``) made
Triton refuse the pointers or run on the wrong GPU. :func:`on_its_device` makes the tensors' device current around a
launcher, as PyTorch's own ops do; it costs one device comparison when it already is."""

from __future__ import annotations

import functools

import torch


def _first_tensor(args: tuple) -> torch.Tensor | None:
    """The first tensor among ``args`` (or the first element of a first sequence of tensors: scale_all's
    gradients)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def on_its_device(launcher):
    """Decorator of a launcher: it runs with its first tensor argument's CUDA device current. ~0.5 us a call on
    the host where it already is (a small step's host path makes three such calls; ``is_cuda`` and
    ``get_device()``, not a ``torch.device`` made per call)."""

    @functools.wraps(launcher)
    def on_device(*args, **kwargs):
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor):
            first = _first_tensor(args)
        if first is not None and first.is_cuda and first.get_device() != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    on_device.on_its_device = True
    return on_device
