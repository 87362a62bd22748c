"""Per-class buffers made from the training counts, exact in float64.

A loss module keeps its per-class vectors (log prior, margins, cloud, ...) as float32 buffers: what the kernels read.
``module.double()`` (or ``.to(torch.float64)``) would only widen those float32 roundings, so a float64 module would
differ from the float64 formula by ~1e-8. Here a conversion that turns such a buffer into float64 makes it again
from the float64 counts, as long as it is still the module's own (not assigned by the user, not edited in place).
A conversion to half precision (``.half()``, ``.to(torch.bfloat16)``: a model cast whole, the criterion inside it)
leaves the module's own vectors in float32: the kernels compute in float32 whatever the logits' dtype, and
bfloat16 would move a log prior of -12 by up to 0.03 (a head made with ``dtype=torch.bfloat16`` kept float32
vectors; one cast to it afterwards did not). Other conversions (device moves, ``share_memory``) treat them as any
buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._operator import tensor_stamp
from ._validation import as_class_counts, check_finite_float

__all__ = ["CountBuffers", "MarginSchedule"]


class CountBuffers(nn.Module):
    """Base of the modules whose buffers come from counts. A subclass adds its count-derived vectors to
    :meth:`_count_vectors` (``{**super()._count_vectors(counts), ...}``) and calls :meth:`init_count_buffers` once."""

    def _count_vectors(self, counts: Tensor) -> dict[str, Tensor]:
        """``{buffer name: (C,) float64 values}`` made from the float64 ``counts`` and the module's hyperparameters
        (a method, not a stored closure: the module pickles, and a copy reads its own hyperparameters). Here the
        ``class_counts`` buffer itself: the smoothed counts, readable back as ``module.class_counts``."""
        return {"class_counts": counts.clone()}

    def init_count_buffers(self, counts: Tensor, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None, smoothing: float = 0.0) -> None:
        """Register the count buffers (non-persistent; float32, or ``dtype``; on ``device``, by default torch's
        default device, as a parameter made beside them: the meta device under ``with torch.device('meta')``)
        from the validated, smoothed float64 CPU ``counts``, kept as ``_counts_exact`` (a plain attribute: no
        conversion touches it). Made outside ``torch.inference_mode`` (a module built inside it still trains: an
        inference tensor cannot be saved for a backward, as LADE's reference saves its prior). ``smoothing``: what
        was added to ``counts`` (:meth:`recount` adds it to new counts)."""
        self._counts_exact = counts
        self._counts_smoothing = smoothing
        self._count_own: dict[str, tuple[Tensor, int | None]] = {}
        device = torch.get_default_device() if device is None else device
        with torch.inference_mode(False):
            for name, values in self._count_vectors(counts).items():
                self.register_buffer(name, None, persistent=False)
                self._set_own(name, values.to(device=device, dtype=dtype or torch.float32))

    def refresh_count_buffer(self, name: str, dtype: torch.dtype | None = None) -> None:
        """Make buffer ``name`` again from the counts (a hyperparameter changed), on its device, in ``dtype`` (default
        its own, float32 for a half-precision one: the module's own vectors are never half, as a cast leaves them;
        a user-edited buffer cast to fp16 was remade in fp16)."""
        buf = self._buffers[name]
        if dtype is None:
            dtype = torch.float32 if buf.dtype in (torch.float16, torch.bfloat16) else buf.dtype
        with torch.inference_mode(False):  # (as init_count_buffers)
            values = self._count_vectors(self._counts_exact)[name]
            self._set_own(name, values.to(device=buf.device, dtype=dtype))

    def _set_own(self, name: str, values: Tensor) -> None:
        self._buffers[name] = values  # (a registered buffer: what nn.Module's setattr does, without __setattr__)
        self._count_own[name] = (values, tensor_stamp(values))

    def __setattr__(self, name: str, value) -> None:
        # class_counts assigned after construction: the per-class buffers are made from them again (the assignment
        # was kept as the class_counts buffer while the vectors kept the old counts: a loss that silently did not
        # change); as a constructor takes them, with the module's count_smoothing
        if name == "class_counts" and "_counts_exact" in self.__dict__:
            self.recount(value)
        elif name == "class_counts" and "_parameters" in self.__dict__:  # (a built module: a 'ce' head)
            raise AttributeError("this module was made without class counts, so it has no per-class vectors to make "
                                 "from them: build a new one with class_counts")
        else:
            super().__setattr__(name, value)

    def recount(self, class_counts) -> None:
        """Make the count buffers again from ``class_counts`` (checked as a constructor checks them, plus the
        module's ``count_smoothing``; the same number of classes), each in its dtype and on its device; what
        ``module.class_counts = ...`` does. A vector the user assigned or edited (not the module's own any more:
        a known prior's ``log_prior``) is left as it is; the ``class_counts`` buffer itself is always remade."""
        smoothing = self.__dict__.get("_counts_smoothing", getattr(self, "count_smoothing", 0.0))  # (older pickles)
        counts = as_class_counts(class_counts, smoothing=smoothing)
        if counts.numel() != self._counts_exact.numel():
            raise ValueError(f"class_counts describes {counts.numel()} classes but the module has "
                             f"{self._counts_exact.numel()}")
        self._counts_exact = counts
        for name in self._count_own:
            if self._buffers.get(name) is not None and (name == "class_counts" or self._is_own(name)):
                self.refresh_count_buffer(name)

    def _is_own(self, name: str) -> bool:
        buf, (made, stamp) = self._buffers.get(name), self._count_own[name]
        return buf is not None and buf is made and tensor_stamp(buf) == stamp

    def _apply(self, fn, *args, **kwargs):
        own = {name for name in self.__dict__.get("_count_own", {}) if self._is_own(name)}
        widen = {name for name in own if self._buffers[name].dtype != torch.float64}
        on_meta = {name for name in own if self._buffers[name].is_meta}
        super()._apply(fn, *args, **kwargs)
        for name in own:  # still the module's own values, in whatever this conversion made of them
            buf = self._buffers[name]
            if name in widen and buf.dtype == torch.float64:
                self.refresh_count_buffer(name)
            elif buf.dtype in (torch.float16, torch.bfloat16):
                self.refresh_count_buffer(name, torch.float32)
            elif name in on_meta and not buf.is_meta:  # off the meta device (``to_empty``: uninitialised memory)
                self.refresh_count_buffer(name)
            else:
                self._set_own(name, buf)
        return self

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickle, ``torch.save``) keeps which buffers are still the module's own: a
        copied tensor's version counter starts again, so the versions are taken anew in :meth:`__setstate__`."""
        state = dict(super().__getstate__())
        if "_count_own" in state:
            state["_count_own"] = {name: (made, self._is_own(name)) for name, (made, _) in self._count_own.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        marks = self.__dict__.get("_count_own")
        if marks:
            self._count_own = {name: (made, tensor_stamp(made) if own is True else -1)
                               for name, (made, own) in marks.items()}


class MarginSchedule:
    """LDAM's largest margin (the rarest class's) as a hyperparameter to schedule: setting ``max_margin`` checks it
    (finite, >= 0) and makes the ``margins`` buffer again, in its dtype and device. A mixin of the
    :class:`CountBuffers` modules with LDAM margins."""

    @property
    def max_margin(self) -> float:
        """The largest margin (the rarest class's); setting it (a schedule) rebuilds ``margins``."""
        return self._max_margin

    @max_margin.setter
    def max_margin(self, value) -> None:
        value = check_finite_float("max_margin", value, min_value=0.0)
        if "margins" in self.__dict__.get("_parameters", {}) or parametrize.is_parametrized(self, "margins"):
            raise ValueError("max_margin cannot remake margins: an nn.Parameter or a parametrization replaced the "
                             "margins buffer (learned margins); change its values instead")
        self._max_margin = value
        if self.__dict__.get("_buffers", {}).get("margins") is not None:
            self.refresh_count_buffer("margins")
