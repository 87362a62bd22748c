"""What a loss module or a fused head keeps between steps for its kernels: its fields (the operator's parameters
by name, one dict) and its own arguments cache (:class:`fastlt._operator.ArgsCache`). A small step is host-bound,
and building, checking and converting the same fields every step was most of its host time."""

from __future__ import annotations

import torch

from ._operator import ArgsCache

__all__ = ["HeldFields"]

_UNUSED = ArgsCache()  # what a module without its own cache yet hands the glue while compiling (which stores nothing)


class HeldFields:
    """A mixin of the :class:`torch.nn.Module` s that call the kernels' glue themselves (the loss modules' and the
    heads' direct paths): :meth:`_held_fields` and :meth:`_cache`. Any attribute assignment drops the held fields
    (the hyperparameters are plain attributes: a schedule assigns them); a copy or a pickle makes its own."""

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        self.__dict__["_held"] = None  # a hyperparameter or buffer assigned: the direct calls make their fields again
        self.__dict__["_hold_off"] = False

    def _class_tensor(self, name: str):
        """The class tensor ``name`` (a prior, margins, cloud, class weights; or None): the module's buffer, or what
        replaced it, an ``nn.Parameter`` (a learned adjustment) or a parametrization, read as an attribute. Such a
        tensor changes without an assignment or a buffer's version (an optimizer step, a parametrization made anew
        at each read), so then no fields are held (:meth:`_held_fields` makes them every call)."""
        try:
            return self._buffers[name]
        except KeyError:
            self.__dict__["_hold_off"] = True
            return getattr(self, name)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # a copy or a pickle makes its own fields and kernel arguments
        state.pop("_held", None)
        state.pop("_args_cache", None)
        state.pop("_last_call", None)
        return state

    def _replicate_for_data_parallel(self):
        """``nn.DataParallel``'s replicas (one per GPU, made again every forward, run by as many threads) copy the
        module's ``__dict__``: each starts with nothing held rather than share one cache between threads."""
        replica = super()._replicate_for_data_parallel()
        replica.__dict__.pop("_held", None)
        replica.__dict__.pop("_args_cache", None)
        replica.__dict__.pop("_last_call", None)
        return replica

    def _cache(self) -> ArgsCache:
        """This module's cache of its kernels' arguments (their checks, conversions, launch plans): its own, so that
        two modules in one step (two heads, two losses summed) do not evict each other's every step (one shared
        entry made such a step of two loss modules ~250 us of host time instead of ~170)."""
        cache = self.__dict__.get("_args_cache")
        if cache is None:
            if torch.compiler.is_compiling():  # nothing is cached while compiling: no attribute set (a side effect
                return _UNUSED                 # that torch.compile refuses inside a checkpointed region)
            cache = self.__dict__["_args_cache"] = ArgsCache()
        return cache

    def _held_fields(self, make) -> dict:
        """``make()``'s fields of a direct call, made once while the module stays as it is: again after any attribute
        assignment, a move or cast (nn.Module swaps the buffers without ``__setattr__``: other tensors), or an
        in-place change of a buffer (its version) or of its storage (``swap_tensors``, ``.data =``), or a buffer
        made to require grad (``requires_grad_()``: the kernels' check must see it, and GCL's folded cloud hid it:
        :class:`fastlt._operator.FoldedSpread`). Never changed
        once made, so the arguments cache knows it by identity (:class:`fastlt._operator.ArgsCache`): a step skips
        building, checking and comparing its fields."""
        if torch.compiler.is_compiling() or self.__dict__.get("_hold_off"):  # traced (the ops path, which caches
            return make()                                                   # nothing), or a class tensor not held
        try:
            state = [(id(b), b._version, b.data_ptr(), b.requires_grad) for b in self._buffers.values()
                     if b is not None]
        except RuntimeError:  # inference tensors have no version counter
            return make()
        held = self.__dict__.get("_held")
        if held is None or held[0] != state:
            held = self.__dict__["_held"] = (state, make())
        return held[1]
