"""Per-class buffers derived from the training counts that stay exact in float64.

A loss module keeps its per-class vectors (log prior, margins, cloud, ...) as float32 buffers: what the kernels
read. ``module.double()`` (or ``.to(torch.float64)``) would only widen those float32 roundings, so a float64 module
would differ from the float64 formula by ~1e-8. Here such a buffer is recomputed from the float64 counts whenever a
conversion leaves it float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def counts_as_is(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The counts themselves, in ``dtype`` (a maker for :meth:`CountBuffers.count_buffer`)."""
    return counts.to(dtype)


class CountBuffers(nn.Module):
    """Base of the modules whose buffers come from counts.

    ``count_buffer(name, counts, make, *attrs)`` registers ``make(counts, *[getattr(self, a) for a in attrs], dtype)``
    as a non-persistent float32 buffer; ``make`` is a module-level function (``fastlt.priors``' ``*_from``), so the
    module still pickles and copies, and ``attrs`` are read when the buffer is made again (a scheduled
    ``max_margin``)."""

    def count_buffer(self, name: str, counts: torch.Tensor, make: Callable[..., torch.Tensor], *attrs: str) -> None:
        if "_count_makers" not in self.__dict__:
            self._count_makers: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {}
        self._counts_exact = counts  # float64, CPU (a plain attribute: no conversion touches it)
        self._count_makers[name] = (make, attrs)
        self.register_buffer(name, self.exact_count_buffer(name, None), persistent=False)

    def exact_count_buffer(self, name: str, like: torch.Tensor | None) -> torch.Tensor:
        """``name``'s values computed again in float64, then in ``like``'s dtype and device (float32 on the CPU
        when ``like`` is None)."""
        make, attrs = self._count_makers[name]
        values = make(self._counts_exact, *(getattr(self, a) for a in attrs), torch.float64)
        return values.to(torch.float32) if like is None else values.to(device=like.device, dtype=like.dtype)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in self.__dict__.get("_count_makers", {}):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype == torch.float64:
                self._buffers[name] = self.exact_count_buffer(name, buf)
        return self
