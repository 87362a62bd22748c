"""Per-class buffers derived from the training counts that stay exact in float64.

A loss module keeps its per-class vectors (log prior, margins, cloud, ...) as float32 buffers: what the kernels
read. ``module.double()`` (or ``.to(torch.float64)``) would only widen those float32 roundings, so a float64 module
would differ from the float64 formula by ~1e-8. Here a conversion that turns such a buffer into float64 computes it
again from the float64 counts, as long as it is still the module's own (not assigned by the user, not edited in
place); any other conversion (device moves, ``share_memory``, half precision) treats it as any buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._validation import check_finite_float


def counts_as_is(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of the counts in ``dtype`` (a maker for :meth:`CountBuffers.count_buffer`)."""
    return counts.to(dtype, copy=True)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


class CountBuffers(nn.Module):
    """Base of the modules whose buffers come from counts.

    ``count_buffer(name, counts, make, *attrs)`` registers ``make(counts, *[getattr(self, a) for a in attrs], dtype)``
    as a non-persistent buffer (float32, or ``dtype=``); ``make`` is a module-level function (``fastlt.priors``'
    ``*_from``), so the module still pickles and copies, and ``attrs`` are read when the buffer is made again (a
    scheduled ``max_margin``)."""

    def count_buffer(self, name: str, counts: torch.Tensor, make: Callable[..., torch.Tensor], *attrs: str,
                     dtype: torch.dtype | None = None) -> None:
        if "_count_makers" not in self.__dict__:
            self._count_makers: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {}
            self._count_own: dict[str, tuple[torch.Tensor, int | None]] = {}
        self._counts_exact = counts  # float64, CPU (a plain attribute: no conversion touches it)
        self._count_makers[name] = (make, attrs)
        self.register_buffer(name, None, persistent=False)
        self.set_count_buffer(name, self.exact_count_buffer(name, None, dtype))

    def exact_count_buffer(self, name: str, like: torch.Tensor | None, dtype: torch.dtype | None = None):
        """``name``'s values computed again in float64, then in ``like``'s dtype and device (else ``dtype``, float32
        by default, on the CPU)."""
        make, attrs = self._count_makers[name]
        values = make(self._counts_exact, *(getattr(self, a) for a in attrs), torch.float64)
        if like is None:
            return values.to(dtype or torch.float32)
        return values.to(device=like.device, dtype=like.dtype)

    def set_count_buffer(self, name: str, values: torch.Tensor) -> None:
        """Set buffer ``name`` to values this module made (so a later float64 conversion may make them again)."""
        setattr(self, name, values)
        self._count_own[name] = (values, _version(values))

    def _own(self, name: str) -> bool:
        buf, (made, version) = self._buffers.get(name), self._count_own.get(name, (None, None))
        return buf is not None and buf is made and _version(buf) == version

    def _apply(self, fn, *args, **kwargs):
        makers = self.__dict__.get("_count_makers", {})
        own = {name for name in makers if self._own(name)}
        widen = {name for name in own if self._buffers[name].dtype != torch.float64}
        super()._apply(fn, *args, **kwargs)
        for name in own:  # still the module's own values, in whatever this conversion made of them
            buf = self._buffers.get(name)
            if name in widen and buf is not None and buf.dtype == torch.float64:
                buf = self.exact_count_buffer(name, buf)
            if buf is not None:
                self.set_count_buffer(name, buf)
        return self


class CountParameter:
    """A float hyperparameter that a count buffer is made from (LDAM's ``max_margin``), as a class attribute of a
    :class:`CountBuffers` module: setting it checks the value (finite, at least ``min_value``) and, once the buffer
    exists, makes the buffer again in its device and dtype (a schedule). The value lives in ``_<name>``, which the
    buffer's maker reads."""

    def __init__(self, buffer: str, *, min_value: float | None = None, doc: str = ""):
        self.buffer, self.min_value, self.__doc__ = buffer, min_value, doc

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, module, owner=None):
        return self if module is None else module.__dict__[self.slot]

    def __set__(self, module: CountBuffers, value) -> None:
        module.__dict__[self.slot] = check_finite_float(self.name, value, min_value=self.min_value)
        buf = module._buffers.get(self.buffer)
        if buf is not None and self.buffer in module.__dict__.get("_count_makers", {}):
            module.set_count_buffer(self.buffer, module.exact_count_buffer(self.buffer, buf))
