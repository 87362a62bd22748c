"""Loss modules that feel like ``torch.nn.CrossEntropyLoss``: ``loss = criterion(logits, target)``.

Each takes the per-class training counts once (validated; zero counts need ``count_smoothing > 0``), keeps the
derived per-class vectors as buffers (they follow ``.to(device)``; a float64 module makes them again from the
counts in float64: :mod:`fastlt._count_buffers`), and the usual ``weight``, ``ignore_index``, ``reduction``,
``label_smoothing``, plus ``backend='auto'|'torch'|'triton'`` ('auto': fused Triton kernels for CUDA tensors, the
pure-PyTorch reference elsewhere, float64 included), ``dp_group`` (data parallel: the loss of the global batch) and
``shard`` (class parallel: local logits of a :class:`fastlt.distributed.ClassShard`); see
:func:`fastlt.functional.adjusted_cross_entropy` and :mod:`fastlt.distributed`. Float hyperparameters keep the
papers' names (tau, s, m, max_margin, noise_mul, gamma, alpha) and are plain attributes: schedule them freely
(``count_smoothing``, added to the counts when the module is built, is read-only; assigning ``class_counts``
makes the per-class vectors again from them). Their
mapping to the adjusted cross-entropy's parameters is written once, in :mod:`fastlt._operator` (``la_fields``,
``ldam_fields``, ``gcl_fields``), which :mod:`fastlt.functional` applies, and so do the modules where they hand plain
(N, C) logits to the kernels themselves (``_direct``: the same checks and kernels without the functional dispatch's
host time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validation as V
from . import functional as LF
from ._count_buffers import CountBuffers, MarginSchedule
from ._held_fields import HeldFields
from ._operator import LADE_WITHOUT_NONE, FoldedSpread, gcl_fields, la_fields, ldam_fields
from .distributed.class_shard import ClassShard
from .distributed.data_parallel import kernels_direct, split_warning, warn_without_group
from .noise import draw_seed
from .priors import gcl_cloud_from, ldam_margins_from, log_prior_from, prior_from

__all__ = ["LogitAdjustedLoss", "BalancedSoftmaxLoss", "LDAMLoss", "GCLLoss", "LADELoss"]

F64 = torch.float64


class _LastCall(NamedTuple):
    """What a direct call checked and made, kept for the next call like it (:meth:`_LongTailLoss._repeated`)."""

    fields: dict  # the held fields it ran with: the same object while the module and its buffers stay as they were
    signature: tuple  # the logits' and the targets' (:func:`_signature`), checked
    ignore_index: int  # (the targets' range is checked on the CPU every call, as fastlt._validation.check_target)
    warning: str | None  # what the call warns about under several ranks without dp_group (split_warning)
    run: Callable  # the glue's checked tail: fastlt._glue.adjusted_ce_checked or lade_checked
    run_args: tuple  # its arguments after (logits, target) but the seed and the plans
    draws_seed: bool  # GCL without a given seed: one drawn per call
    plans: object  # the launches' plans of these tensors (fastlt.kernels.launch.StepPlans)


def _signature(logits: Tensor, target: Tensor) -> tuple:
    """What the checks and the launch plans of a direct call read of its plain tensors: shapes, dtypes, devices, the
    logits' strides, the targets' layout."""
    return (logits.shape, logits.stride(), logits.dtype, logits.device, target.shape, target.dtype, target.device,
            target.is_contiguous())


class _LongTailLoss(HeldFields, CountBuffers):
    """Shared arguments and buffers: ``class_counts`` (the validated, smoothed counts) and the class ``weight``;
    subclasses add their per-class vectors (:meth:`_count_vectors`) and call ``init_count_buffers``."""

    def __init__(self, class_counts, *, weight=None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, backend: str = "auto", count_smoothing: float = 0.0, dp_group=None,
                 shard=None):
        super().__init__()
        self.dp_group = dp_group
        self.shard = shard
        self._counts_in = V.as_class_counts(class_counts, smoothing=count_smoothing)
        self.num_classes = self._counts_in.numel()
        self.count_smoothing = count_smoothing
        V.init_loss_options(self, "weight", weight, self.num_classes, ignore_index=ignore_index,
                            reduction=reduction, label_smoothing=label_smoothing, backend=backend)

    @property
    def count_smoothing(self) -> float:
        """What was added to the class counts at construction (read-only: see the setter)."""
        return self.__dict__.get("_count_smoothing", self.__dict__.get("count_smoothing", 0.0))  # (older pickles)

    @count_smoothing.setter
    def count_smoothing(self, value) -> None:
        # the per-class buffers are made from the smoothed counts, which keep no trace of the raw ones: a later
        # assignment was accepted and changed nothing (the float hyperparameters all take effect when assigned)
        if "_counts_exact" in self.__dict__:
            raise AttributeError("count_smoothing is added to the class counts once, when the module is built (its "
                                 "per-class buffers come from the smoothed counts): build a new module for another "
                                 "count_smoothing")
        self.__dict__["_count_smoothing"] = value

    def _init_buffers(self) -> None:
        self.init_count_buffers(self.__dict__.pop("_counts_in"), smoothing=self.count_smoothing)

    def _common(self) -> dict:
        return dict(weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, backend=self.backend, dp_group=self.dp_group,
                    shard=self.shard)

    # The direct calls read the buffers from ``_buffers`` (where nn.Module keeps them, assignments included): an
    # attribute read of a buffer goes through nn.Module.__getattr__, ~0.7 us each on a small step's host path.

    def _direct(self, logits: Tensor, warning: str | None = None) -> bool:
        """Whether this call goes to the kernels' glue straight
        (:func:`fastlt.distributed.data_parallel.kernels_direct`); ``warning``: that of a loss that depends on the
        batch split (see there; default: the cross-entropy's)."""
        if warning is None:
            warning = split_warning(self._class_tensor("weight"), self.reduction)
        return kernels_direct(logits, self.backend, self.dp_group, self.shard, warning)

    def _direct_call(self, logits: Tensor, target: Tensor, fields: dict, lade: bool = False) -> Tensor:
        """The adjusted cross-entropy of ``fields`` (LADE's: ``lade``) on the kernels' glue straight
        (:meth:`_direct`), kept for the next call like it (:meth:`_remember`)."""
        if lade:
            loss = LF._lade_kernels_call(logits, target, fields, self._cache())
        else:
            loss = LF._kernels_call(logits, target, fields, grad_in_forward=self.grad_in_forward, cache=self._cache())
        self._remember(fields, logits, target, lade)
        return loss

    def _fields(self, **operator) -> dict:
        """The operator's fields of a direct call: ``operator``'s (:mod:`fastlt._operator`'s ``*_fields``) and the
        shared options."""
        return dict(operator, weight=self._class_tensor("weight"), ignore_index=self.ignore_index,
                    reduction=self.reduction, label_smoothing=self.label_smoothing)

    # A step of a small batch is host-bound: each call of the same module on tensors like the last call's (shapes,
    # strides, dtypes, devices), with its fields and buffers unchanged, skips the checks that call passed and the
    # launch plans' lookups (~14 us of a ~99 us LogitAdjustedLoss step with the kernels stubbed:
    # benchmarks/host_overhead.py) and runs the glue's checked tail with the last call's arguments and its
    # launch.StepPlans. What a call can change without changing that signature is checked again: the
    # module's state (its held fields), torch.compile, jit tracing and torch.func (which the direct call does not
    # take), the targets' range (CPU), the multi-rank warning, grad_in_forward's conditions (in the tail), GCL's
    # drawn seed.

    def _repeated(self, logits: Tensor, target: Tensor, make) -> Tensor | None:
        """The loss of a call like the last direct one (:class:`_LastCall`), or None: the full path then runs.
        ``make``: the module's fields (:meth:`_held_fields`)."""
        if torch.compiler.is_compiling():  # (first: Dynamo reads nothing kept, so an eager call's changes of it do
            return None                    # not recompile a compiled step)
        last = self.__dict__.get("_last_call")
        if (last is None or type(logits) is not Tensor or type(target) is not Tensor or torch.jit.is_tracing()
                or V.under_transform(logits) or _signature(logits, target) != last.signature
                or self._held_fields(make) is not last.fields):
            return None
        if not target.is_cuda:  # (no range check on a GPU: a host sync)
            V.check_target(target, logits, last.ignore_index)
        if last.warning is not None and self.dp_group is None:
            warn_without_group(last.warning)
        return last.run(logits, target, *last.run_args, draw_seed() if last.draws_seed else None, last.plans)

    def _remember(self, fields: dict, logits: Tensor, target: Tensor, lade: bool = False) -> None:
        """Keep the direct call just made with ``fields`` (LADE's: ``lade``) for :meth:`_repeated`: when its
        class-index targets were taken as they are (int64 or int32, contiguous) and the glue kept its arguments (the
        module's cache holds them under these fields: not while compiling, nor for a tensor that requires grad), and
        ``fields`` are the held ones (not GCL's of a given seed, made per call)."""
        if torch.compiler.is_compiling():  # (first: as _repeated)
            return
        entry = self._cache()._entry
        held = self.__dict__.get("_held")
        if (entry is None or entry[2] is not fields or held is None or held[1] is not fields
                or type(target) is not Tensor or target.dtype not in (torch.int64, torch.int32)
                or not target.is_contiguous()):
            return
        glue = LF._glue()
        if lade:
            run, run_args, draws, warning = glue.lade_checked, entry[3], False, _LADE_WARNING
        else:
            args = entry[3]
            draws = fields.get("seed", 0) is None and args.has_noise
            run, run_args = glue.adjusted_ce_checked, (args, self.grad_in_forward)
            warning = split_warning(self._class_tensor("weight"), self.reduction)
        self.__dict__["_last_call"] = _LastCall(fields, _signature(logits, target), fields["ignore_index"], warning,
                                                run, run_args, draws, glue.launch.StepPlans())

    def _checked_direct(self, logits: Tensor, name: str = "logits", warning: str | None = None) -> bool:
        """:meth:`_check_input`, then :meth:`_direct`. A plain (N, C) floating tensor of the module's class count
        without a shard, the usual call, passes the checks in one test (host time); anything else takes the full
        checks, which name what is wrong."""
        if not (type(logits) is Tensor and logits.dim() == 2 and self.shard is None and logits.dtype in V.FLOAT_DTYPES
                and logits.shape[1] == self.num_classes):
            self._check_input(logits, name)
        return self._direct(logits, warning)

    def _check_input(self, logits: Tensor, name: str = "logits") -> None:
        V.check_shaped_logits(name, logits, min_classes=1 if self.shard is None else 0)  # (a shard may be empty)
        if self.shard is None:  # a class shard's local logits are checked against it (fastlt.distributed)
            V.check_num_classes(logits, self.num_classes)
        elif not isinstance(self.shard, ClassShard):  # (as the functions say it: not an AttributeError below)
            raise TypeError(f"shard must be a fastlt.distributed.ClassShard, got {type(self.shard).__name__}")
        elif self.shard.num_classes != self.num_classes:
            raise ValueError(f"the shard describes {self.shard.num_classes} classes but class_counts "
                             f"{self.num_classes}")

    def extra_repr(self) -> str:
        out = f"num_classes={self.num_classes}, reduction={self.reduction!r}, backend={self.backend!r}"
        weight = self._class_tensor("weight")
        options = dict(weight=None if weight is None else f"({weight.shape[0]},)", ignore_index=self.ignore_index,
                       label_smoothing=self.label_smoothing, count_smoothing=self.count_smoothing,
                       grad_in_forward=self.__dict__.get("grad_in_forward", False))
        defaults = dict(weight=None, ignore_index=-100, label_smoothing=0.0, count_smoothing=0.0, grad_in_forward=False)
        return out + "".join(f", {k}={v}" for k, v in options.items() if v != defaults[k])  # those not the default


class LogitAdjustedLoss(_LongTailLoss):
    """Logit-adjusted cross-entropy (Menon et al., ICLR 2021): ``CE(z + tau * log pi, y)``.

    Args:
        class_counts: (C,) training counts per class (a sequence, array or tensor of whole numbers).
        tau: the weight of the prior offset.
        grad_in_forward: (Triton only) compute the gradient during the forward and store it over the logits: no
            extra memory, but the logits tensor is overwritten (use it only when nothing else reads them after).
        weight, ignore_index, reduction, label_smoothing, backend, count_smoothing, dp_group: see the module
            docstring.

    ``forward(logits, target)``: (N, C) logits of any float dtype, (N,) int targets.
    """

    def __init__(self, class_counts, tau: float = 1.0, *, grad_in_forward: bool = False, **kwargs):
        super().__init__(class_counts, **kwargs)
        self.tau = V.check_finite_float("tau", tau)
        self.grad_in_forward = bool(grad_in_forward)
        self._init_buffers()

    def _count_vectors(self, counts: Tensor) -> dict[str, Tensor]:
        return {**super()._count_vectors(counts), "log_prior": log_prior_from(counts, F64)}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if (loss := self._repeated(logits, target, self._la_fields)) is not None:
            return loss
        if self._checked_direct(logits):
            return self._direct_call(logits, target, self._held_fields(self._la_fields))
        return LF.logit_adjusted_cross_entropy(logits, target, self.log_prior, self.tau,
                                               grad_in_forward=self.grad_in_forward, **self._common())

    def _la_fields(self) -> dict:
        return self._fields(**la_fields(self._class_tensor("log_prior"), self.tau))

    def extra_repr(self) -> str:
        return f"tau={self.tau}, " + super().extra_repr()


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced Softmax (Ren et al., NeurIPS 2020) = logit-adjusted CE with tau = 1 (LADE's PriorCE but for its
    ``log(pi + 1e-9)``)."""

    def __init__(self, class_counts, **kwargs):
        if "tau" in kwargs:
            raise TypeError("BalancedSoftmaxLoss fixes tau = 1; use LogitAdjustedLoss(class_counts, tau=...) for "
                            "another tau")
        super().__init__(class_counts, tau=1.0, **kwargs)

    def __setattr__(self, name: str, value) -> None:
        if name == "tau" and value != 1.0:  # (a schedule of tau would turn it into LogitAdjustedLoss silently)
            raise ValueError(f"BalancedSoftmaxLoss fixes tau = 1, got tau={value!r}: use "
                             "LogitAdjustedLoss(class_counts, tau=...) for another tau")
        super().__setattr__(name, value)


class LDAMLoss(MarginSchedule, _LongTailLoss):
    """LDAM (Cao et al., NeurIPS 2019): ``CE(s * (z - m_y onehot(y)), y)``, ``m_y ∝ n_y^(-1/4)``, max ``max_margin``.

    Args:
        class_counts: (C,) training counts per class.
        max_margin: the largest margin (the rarest class's); setting it later rebuilds ``margins`` (a schedule).
        s: the logit scale.
        grad_in_forward, weight, ignore_index, reduction, label_smoothing, backend, count_smoothing, dp_group: as
            :class:`LogitAdjustedLoss`.

    ``z`` are cosine logits in the official code (its ``NormedLinear``, always on with LDAM; here
    :class:`fastlt.CosineClassifier`): ``s = 30`` on unnormalised logits trains unstably. LDAM-DRW's deferred
    re-weighting is ``weight=`` from the DRW epoch on (``(1 - beta) / (1 - beta^n_j)``, normalised to sum C).
    """

    def __init__(self, class_counts, max_margin: float = 0.5, s: float = 30.0, *, grad_in_forward: bool = False,
                 **kwargs):
        super().__init__(class_counts, **kwargs)
        self.max_margin = max_margin
        self.s = V.check_scale("s", s)
        self.grad_in_forward = bool(grad_in_forward)
        self._init_buffers()

    def _count_vectors(self, counts: Tensor) -> dict[str, Tensor]:
        return {**super()._count_vectors(counts), "margins": ldam_margins_from(counts, self.max_margin, F64)}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if (loss := self._repeated(logits, target, self._ldam_fields)) is not None:
            return loss
        if self._checked_direct(logits):
            return self._direct_call(logits, target, self._held_fields(self._ldam_fields))
        return LF.ldam_cross_entropy(logits, target, self.margins, self.s, grad_in_forward=self.grad_in_forward,
                                     **self._common())

    def _ldam_fields(self) -> dict:
        return self._fields(**ldam_fields(self._class_tensor("margins"), self.s))

    def extra_repr(self) -> str:
        return f"max_margin={self.max_margin}, s={self.s}, " + super().extra_repr()


class GCLLoss(_LongTailLoss):
    """Gaussian clouded logit adjustment (Li, Cheung, Lu, CVPR 2022) on (N, C) cosine logits.

    ``CE(s * (cos - noise_mul * e * delta/max(delta) - m * onehot(y)), y)`` with half-normal noise ``e`` (sigma 1/3,
    clipped at 1) drawn per element from (seed, row, column): on the GPU inside the kernel. The noise is drawn in
    ``eval()`` mode too, as the official code draws it (compare models on the raw logits, or with ``noise_mul=0``).

    Args:
        class_counts: (C,) training counts per class.
        m: the target margin; s: the logit scale; noise_mul: the cloud's scale; gamma: the focal exponent.
        rows_per_rank: with ``dp_group``, the per-rank batch size: rank r's rows draw noise rows
            ``r * rows_per_rank + i`` (default: the rank's row count; pass it when the last batch may be short).
        grad_in_forward, weight, ignore_index, reduction, label_smoothing, backend, count_smoothing, dp_group: as
            :class:`LogitAdjustedLoss`.

    Defaults are the official loss class's (m=0.5, s=30, noise_mul=1, gamma=0); the official scripts use m=0, s=30,
    noise_mul=0.5 for the backbone stage and m=0.1, s=20, noise_mul=0.5, gamma=1 for the classifier re-training stage
    (with :class:`fastlt.data.CBENSampler`). ``forward(cosine, target, seed=None)``: the seed is drawn from torch's
    generator unless given (an int, or a one-element int64 tensor on the device for CUDA graphs: see
    :func:`fastlt.functional.adjusted_cross_entropy`).
    """

    def __init__(self, class_counts, m: float = 0.5, s: float = 30.0, noise_mul: float = 1.0, gamma: float = 0.0, *,
                 grad_in_forward: bool = False, rows_per_rank: int | None = None, **kwargs):
        super().__init__(class_counts, **kwargs)
        self.rows_per_rank = None if rows_per_rank is None else V.check_int("rows_per_rank", rows_per_rank, 1)
        self.m = V.check_finite_float("m", m)
        self.s = V.check_scale("s", s)
        self.noise_mul = V.check_finite_float("noise_mul", noise_mul, min_value=0.0)
        self.gamma = V.check_finite_float("gamma", gamma, min_value=0.0)
        self.grad_in_forward = bool(grad_in_forward)
        self._fold = FoldedSpread()
        self._init_buffers()

    def _count_vectors(self, counts: Tensor) -> dict[str, Tensor]:
        return {**super()._count_vectors(counts), "cloud": gcl_cloud_from(counts, F64)}

    def forward(self, cosine: Tensor, target: Tensor, seed: int | Tensor | None = None) -> Tensor:
        if seed is None and (loss := self._repeated(cosine, target, self._gcl_fields)) is not None:
            return loss
        if self._checked_direct(cosine, "cosine"):
            return self._direct_call(cosine, target,
                                     self._held_fields(self._gcl_fields) if seed is None else self._gcl_fields(seed))
        return LF.gcl_cross_entropy(cosine, target, self.cloud, self.m, self.s, self.noise_mul, self.gamma,
                                    seed=seed, grad_in_forward=self.grad_in_forward, rows_per_rank=self.rows_per_rank,
                                    **self._common())

    def _gcl_fields(self, seed: int | Tensor | None = None) -> dict:
        """The fields of a direct call (``seed`` None: drawn per call by the glue)."""
        cloud, noise_mul = self._fold(self._class_tensor("cloud"), self.noise_mul)  # (FoldedSpread)
        return self._fields(**gcl_fields(cloud, self.m, self.s, noise_mul, self.gamma), seed=seed)

    def extra_repr(self) -> str:
        return (f"m={self.m}, s={self.s}, noise_mul={self.noise_mul}, gamma={self.gamma}, "
                + super().extra_repr())


_LADE_WARNING = "LADELoss / lade_loss"  # (LADE's value depends on the batch split whatever its weights)


class LADELoss(_LongTailLoss):
    """LADE (Hong et al., CVPR 2021): ``PriorCE(z) + alpha * LADER(z)`` (the official code's form).

    Args:
        class_counts: (C,) training counts per class; the ``prior`` buffer is pi.
        alpha: the weight of LADER; remine_lambda: LADER's quadratic penalty.
        reduction: 'mean' or 'sum' (LADER is a batch statistic).
        weight, ignore_index, label_smoothing, backend, count_smoothing: as :class:`LogitAdjustedLoss`.
        dp_group: data parallel: LADER's column statistics and PriorCE's mean over the global batch (as the official
            code's single-process ``nn.DataParallel``); see :func:`fastlt.functional.lade_loss`.

    Inference: PriorCE trains ``z + log pi``, so the raw logits ``z`` already leave out the training prior. For a
    balanced test set predict ``argmax z``; toward a target prior ``p_t`` take
    ``fastlt.posthoc.pc_softmax(z + log pi, class_counts, p_t)`` (= ``softmax(z + log p_t)``).
    ``pc_softmax(z, class_counts)`` itself would remove the prior twice.
    """

    def __init__(self, class_counts, alpha: float = 0.1, remine_lambda: float = 0.1, **kwargs):
        super().__init__(class_counts, **kwargs)
        self.alpha = V.check_finite_float("alpha", alpha, min_value=0.0)
        self.remine_lambda = V.check_finite_float("remine_lambda", remine_lambda, min_value=0.0)
        self._init_buffers()

    def __setattr__(self, name: str, value) -> None:
        if name == "reduction" and value == "none":  # given, or assigned later (then refused there, not at a call)
            raise ValueError(LADE_WITHOUT_NONE)
        super().__setattr__(name, value)

    def _count_vectors(self, counts: Tensor) -> dict[str, Tensor]:
        return {**super()._count_vectors(counts), "prior": prior_from(counts, F64)}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if (loss := self._repeated(logits, target, self._lade_fields)) is not None:
            return loss
        if self._checked_direct(logits, warning=_LADE_WARNING):
            return self._direct_call(logits, target, self._held_fields(self._lade_fields), lade=True)
        return LF.lade_loss(logits, target, self.prior, self.alpha, self.remine_lambda, **self._common())

    def _lade_fields(self) -> dict:
        return dict(prior=self._class_tensor("prior"), alpha=self.alpha, remine_lambda=self.remine_lambda,
                    weight=self._class_tensor("weight"), ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, remine_lambda={self.remine_lambda}, " + super().extra_repr()
