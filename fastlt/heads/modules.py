"""The fused heads as modules: :class:`LinearLossHead` (``nn.Linear`` + a long-tail loss) and :class:`CosineGCLHead`
(a cosine classifier + GCL), ``head(features, target) -> loss`` without the (N, C) logits in memory on CUDA (the
reference path elsewhere), with ``logits(features)`` and a row-chunked ``topk(features, k)`` for inference."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as V
from .._backend import use_triton
from .._count_buffers import CountBuffers, MarginSchedule
from .._held_fields import HeldFields
from .._operator import LADE_WITHOUT_NONE, FoldedSpread, gcl_fields, la_fields, ldam_fields
from ..distributed.data_parallel import kernels_direct, split_warning
from ..distributed.sharded_training import check_head_shard, check_outside_ddp, sharded_topk
from ..priors import gcl_cloud_from, ldam_margins_from, log_prior_from, prior_from
from ..reference import _log_of_prior, normalize_rows
from .functional import cosine_cross_entropy, lade_linear_loss, linear_cross_entropy
from .plan import default_chunk_rows, row_chunks

__all__ = ["LinearLossHead", "CosineGCLHead"]

_HEAD_LOSSES = ("ce", "la", "balanced_softmax", "ldam", "lade")
# each loss's hyperparameters that it does not use: a value other than the head's default (s: 1) would be ignored,
# so it is refused, at construction and when assigned (LADE has no scale or focal term; its prior enters at tau = 1)
_UNUSED_BY_LOSS = dict(ce=("tau", "max_margin", "alpha", "remine_lambda"),
                       la=("max_margin", "alpha", "remine_lambda"),
                       balanced_softmax=("max_margin", "alpha", "remine_lambda"),
                       ldam=("tau", "alpha", "remine_lambda"),
                       lade=("tau", "s", "gamma", "max_margin"))
# the operator's fields as linear_cross_entropy passes them by default: no offset, margin, noise or focal factor
_NO_OPERATOR = dict(log_prior=None, tau=1.0, margin=None, scale=1.0, cloud=None, noise_mul=0.0, seed=None, gamma=0.0)
F64 = torch.float64


def _count_dtype(dtype) -> torch.dtype | None:
    """The dtype of a head's count buffers: float64 for a float64 head (exact, as ``.double()`` makes them), else
    float32 (what the kernels read)."""
    return F64 if dtype == F64 else None


class _HeadBase(HeldFields, CountBuffers):
    """Shared arguments: class weights, ignore_index, reduction, label smoothing, backend, the fused path's
    ``chunk_rows`` / ``chunk_classes`` (at most one; see :func:`fastlt.heads.linear_cross_entropy`), ``dp_group``
    (data parallel: the loss of the global batch, :mod:`fastlt.distributed`) and ``shard``, ``gather_inputs``,
    ``features_grad_scale`` (class parallel: the head holds the weight rows of ``shard``'s classes,
    :mod:`fastlt.distributed.sharded_heads`; keep it out of DDP: :func:`fastlt.distributed.exclude_from_ddp`).
    A head made with counts keeps them, smoothed, as its ``class_counts`` buffer (not in the state dict), as the
    loss modules do."""

    def __init__(self, in_features: int, num_classes: int, *, weight_classes=None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, backend: str = "auto",
                 chunk_rows: int | None = None, chunk_classes: int | None = None, dp_group=None, shard=None,
                 gather_inputs: bool = True, features_grad_scale: float | None = None):
        super().__init__()
        self.dp_group = dp_group
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if not V.is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.shard, self.gather_inputs, self.features_grad_scale = shard, gather_inputs, features_grad_scale
        if shard is not None:
            check_head_shard(shard, num_classes, dp_group)
        # weight_classes stays out of the state dict (like the priors): a head's state dict is its layer's
        # (nn.Linear's weight and bias, CosineClassifier's weight), so checkpoints move between the two; learned
        # class weights given as an nn.Parameter are a parameter of the head, and in it
        V.init_loss_options(self, "weight_classes", weight_classes, num_classes, ignore_index=ignore_index,
                            reduction=reduction, label_smoothing=label_smoothing, backend=backend, persistent=False)
        V.check_chunks(chunk_rows, chunk_classes)
        self.chunk_rows, self.chunk_classes = chunk_rows, chunk_classes

    def _counts(self, class_counts, count_smoothing: float) -> Tensor:
        counts = V.as_class_counts(class_counts, smoothing=count_smoothing)
        if counts.numel() != self.num_classes:
            raise ValueError(f"class_counts describes {counts.numel()} classes but num_classes = {self.num_classes}")
        return counts

    def _common(self) -> dict:
        return dict(weight_classes=self.weight_classes, ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, backend=self.backend, chunk_rows=self.chunk_rows,
                    chunk_classes=self.chunk_classes, dp_group=self.dp_group, **self._shard_options())

    @property
    def weight_rows(self) -> int:
        """The rows of the weight this head holds: ``num_classes``, or the shard's classes."""
        return self.num_classes if self.shard is None else self.shard.size

    def _init_generator(self) -> torch.Generator | None:
        """What :meth:`reset_parameters` draws from: torch's generator for a whole head; for a class shard, a generator
        seeded by one draw of torch's (made on every rank, so generators seeded alike stay in step) plus the shard's
        first class, so that ranks seeded alike (the usual DDP set-up) do not start every shard with the same rows
        (class j and j + shard size one vector, which one process never draws)."""
        if self.shard is None or self.weight.device.type == "meta":
            return None
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return torch.Generator(self.weight.device).manual_seed(seed + self.shard.start)

    def _shard_options(self) -> dict:
        if self.shard is None:
            return {}
        check_outside_ddp(self)
        return dict(shard=self.shard, gather_inputs=self.gather_inputs, features_grad_scale=self.features_grad_scale)

    def _direct(self, features: Tensor, warning: str | None) -> bool:
        """Whether this call runs the kernels' glue straight (:func:`fastlt.heads.glue.run_head`, with this head's
        held fields and arguments cache), as the loss modules decide it
        (:func:`fastlt.distributed.data_parallel.kernels_direct`; ``warning`` the same, or None)."""
        if not kernels_direct(features, self.backend, self.dp_group, self.shard, warning):
            return False
        V.check_chunks(self.chunk_rows, self.chunk_classes)  # (attributes: a user may assign them)
        return True

    def _split_warning(self) -> str | None:
        """The functions' warning for a loss whose value depends on the batch split (a class-weighted mean)."""
        return split_warning(self._class_tensor("weight_classes"), self.reduction)

    def _fields(self, **operator) -> dict:
        """The operator's fields of a direct call (all of them, as the functions pass them): ``operator``'s and the
        shared options, the class weights as the operator's ``weight``."""
        return dict(_NO_OPERATOR, **operator, weight=self._class_tensor("weight_classes"),
                    ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing)

    def _check_features(self, features) -> None:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (N, {self.in_features}), got {tuple(features.shape)}")

    def _check_inference_features(self, features) -> None:
        """:meth:`_check_features`, and the weight's dtype outside autocast (as the loss checks it): the linear head
        raised ``F.linear``'s bare RuntimeError, the cosine head cast the weight silently."""
        self._check_features(features)
        V.check_dtype_matches_weight(features, self.weight)

    def _dense_logits(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def logits(self, features: Tensor) -> Tensor:
        """The (N, C) inference logits, dense (see the class docstring for which)."""
        self._check_inference_features(features)
        return self._dense_logits(features)

    @torch.no_grad()
    def topk(self, features: Tensor, k: int = 1, *, chunk_rows: int | None = None):
        """``(values, indices)``, each (N, k), of :meth:`logits`, computed in row chunks, never holding (N, C)
        (chunk as in the loss: ``chunk_rows`` or a <= 512 MiB buffer). No gradient. A class-sharded head ranks
        every class: each rank's top k of its classes, one all-gather, the top k of those (with ``gather_inputs``
        the rows are gathered too, and each rank gets its own rows' answer)."""
        self._check_inference_features(features)
        if not V.is_int(k) or not 1 <= k <= self.num_classes:
            raise ValueError(f"k must be an int in [1, {self.num_classes}], got {k!r}")
        V.check_chunks(chunk_rows, None)
        if self.shard is not None:
            return sharded_topk(self._dense_logits, features, k, self.shard, gather_inputs=self.gather_inputs)
        N = features.shape[0]
        rows = chunk_rows or self.chunk_rows or default_chunk_rows(self.num_classes, features.dtype)
        dtype = self._dense_logits(features[:0]).dtype  # the logits' (an autocast dtype under autocast)
        values = torch.empty((N, k), dtype=dtype, device=features.device)
        indices = torch.empty((N, k), dtype=torch.int64, device=features.device)
        for r0, r1 in row_chunks(N, rows):
            v, i = torch.topk(self._dense_logits(features[r0:r1]), k, dim=1)
            values[r0:r1] = v
            indices[r0:r1] = i
        return torch.return_types.topk((values, indices))

    def extra_repr(self) -> str:
        out = (f"in_features={self.in_features}, num_classes={self.num_classes}, reduction={self.reduction!r}, "
               f"backend={self.backend!r}")
        options = dict(chunk_rows=self.chunk_rows, chunk_classes=self.chunk_classes, shard=self.shard)
        return out + "".join(f", {k}={v}" for k, v in options.items() if v is not None)  # those set


class LinearLossHead(MarginSchedule, _HeadBase):
    """``nn.Linear(in_features, num_classes, bias)`` + a long-tail loss, fused: ``head(features, target) -> loss``
    without the (N, C) logits in memory (on CUDA; the reference path elsewhere).

    Args:
        in_features: D; num_classes: C.
        class_counts: (C,) training counts (optional for 'ce').
        loss: 'ce' (plain cross-entropy), 'la' (logit adjustment, ``CE(z + tau * log pi, y)``), 'balanced_softmax'
            (la with tau = 1), 'ldam' (``CE(s (z - m_y 1_y), y)`` with ``m_y ∝ n_y^(-1/4)``, largest
            ``max_margin``) or 'lade' (``PriorCE + alpha * LADER`` with ``remine_lambda``,
            :func:`fastlt.heads.lade_linear_loss`; 'mean' or 'sum'; ``s`` and ``gamma`` do not apply).
        bias: whether the layer has a bias.
        tau, max_margin, alpha, remine_lambda: the losses' hyperparameters (``max_margin`` can be scheduled;
            'balanced_softmax' and 'lade' fix ``tau`` at 1; a loss refuses another value of a hyperparameter it does
            not use (``tau`` for 'ce' and 'ldam', ``max_margin`` but for 'ldam', ``alpha`` and ``remine_lambda``
            but for 'lade', ``s`` and ``gamma`` for 'lade'), also when assigned later). ``loss`` itself is fixed
            once the head is made.
        s: the logit scale (default 30 for 'ldam', else 1).
        gamma: focal exponent.
        count_smoothing: added to the counts (needed when a count is 0).
        device, dtype: of the parameters (a float64 head makes its count buffers in float64).
        **kwargs: ``weight_classes`` ((C,) class weights of the loss), ``ignore_index``, ``reduction``,
            ``label_smoothing``, ``backend``, ``chunk_rows``, ``chunk_classes``, ``dp_group`` (data parallel: the
            loss of the global batch, see :func:`fastlt.heads.linear_cross_entropy`), ``shard``, ``gather_inputs``,
            ``features_grad_scale`` (class parallel: ``weight`` and ``bias`` hold the shard's rows).

    Parameters ``weight`` (C, D) and ``bias`` (C,) as ``nn.Linear`` (same initialisation). Under ``torch.autocast``
    the head runs in the autocast dtype. Inference: :meth:`logits` returns the raw ``z = f W^T + b``; with loss-side
    adjustment (la, Balanced Softmax, LDAM) ``argmax z`` is already the balanced prediction;
    ``logits(f, adjusted=True)`` adds ``tau * log pi`` (the training-distribution posterior). :meth:`topk` ranks the
    same logits by row chunks.
    """

    def __init__(self, in_features: int, num_classes: int, class_counts=None, loss: str = "la", bias: bool = True,
                 *, tau: float = 1.0, max_margin: float = 0.5, s: float | None = None, gamma: float = 0.0,
                 alpha: float = 0.1, remine_lambda: float = 0.1, count_smoothing: float = 0.0, device=None,
                 dtype=None, **kwargs):
        super().__init__(in_features, num_classes, **kwargs)
        self.loss = V.check_choice("loss", loss, _HEAD_LOSSES)
        tau = V.check_finite_float("tau", tau)
        if loss == "balanced_softmax" and tau != 1.0:  # (was ignored: Balanced Softmax is la with tau = 1)
            raise ValueError(f"loss='balanced_softmax' fixes tau = 1, got tau={tau!r}; use loss='la' for another tau")
        self.tau = tau
        self.max_margin = max_margin
        self.s = V.check_scale("s", (30.0 if loss == "ldam" else 1.0) if s is None else s)
        self.gamma = V.check_finite_float("gamma", gamma, min_value=0.0)
        self.alpha = V.check_finite_float("alpha", alpha, min_value=0.0)
        self.remine_lambda = V.check_finite_float("remine_lambda", remine_lambda, min_value=0.0)
        if loss == "lade" and self.reduction == "none":  # (s, gamma, tau, reduction later: __setattr__ refuses)
            raise ValueError(LADE_WITHOUT_NONE)
        for name in ("log_prior", "margins", "prior"):  # those the loss uses are filled from the counts below
            self.register_buffer(name, None, persistent=False)
        if class_counts is None:
            if loss != "ce":
                raise ValueError(f"loss={loss!r} needs class_counts (the per-class training counts)")
        else:
            self.init_count_buffers(self._counts(class_counts, count_smoothing), dtype=_count_dtype(dtype),
                                    device=device, smoothing=count_smoothing)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty((self.weight_rows, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(self.weight_rows, **factory)) if bias else None
        self.reset_parameters()

    def __setattr__(self, name: str, value) -> None:
        loss = self.__dict__.get("loss")
        if name == "loss" and loss is not None:  # the class buffers and presets were made for it
            raise AttributeError(f"loss is fixed when the head is made (it is {loss!r}): make a new LinearLossHead")
        if loss == "lade" and name == "reduction" and value == "none":
            raise ValueError(LADE_WITHOUT_NONE)
        if loss == "balanced_softmax" and name == "tau" and value != 1.0:
            raise ValueError(f"loss='balanced_softmax' fixes tau = 1, got tau={value!r}: make a head with loss='la' "
                             "for another tau")
        if name in _UNUSED_BY_LOSS.get(loss, ()) and value != _neutral(name):
            raise ValueError(f"loss={loss!r} takes no {name} (it would be ignored): {name} must stay "
                             f"{_neutral(name)}, got {value!r}")
        super().__setattr__(name, value)

    def _count_vectors(self, counts: Tensor) -> dict[str, Tensor]:
        out = super()._count_vectors(counts)
        if self.loss in ("la", "balanced_softmax"):
            out["log_prior"] = log_prior_from(counts, F64)
        if self.loss == "lade":  # PriorCE's offset, the official PriorCELoss's log(pi + 1e-9)
            out["log_prior"] = _log_of_prior(prior_from(counts, F64), F64)
        if self.loss == "lade":
            out["prior"] = prior_from(counts, F64)
        if self.loss == "ldam":
            out["margins"] = ldam_margins_from(counts, self.max_margin, F64)
        return out

    @property
    def pi(self) -> Tensor | None:
        """The training prior of the 'lade' loss (the ``prior`` buffer; kept under its old name)."""
        return self.prior

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (fan-in D, a class shard's too; drawn as :meth:`_init_generator` says)."""
        generator = self._init_generator()
        if self.weight.numel():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound, generator=generator)

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        self._check_features(features)
        lade = self.loss == "lade"
        if self._direct(features, "a LADE head" if lade else self._split_warning()):
            from . import glue  # (imports triton: at the first call that runs the kernels, as the functions do)

            chunks = dict(chunk_rows=self.chunk_rows, chunk_classes=self.chunk_classes, cache=self._cache())
            if lade:
                return glue.run_lade_head(features, self.weight, self.bias, target,
                                          self._held_fields(self._lade_fields), **chunks)
            return glue.run_head(features, self.weight, self.bias, target, self._held_fields(self._head_fields),
                                 cosine=False, eps=0.0, **chunks)
        if lade:
            return lade_linear_loss(features, self.weight, target, self.prior, self.bias, alpha=self.alpha,
                                    remine_lambda=self.remine_lambda, **self._common())
        return linear_cross_entropy(features, self.weight, target, self.bias, **self._operator_fields(),
                                    **self._common())

    def _head_fields(self) -> dict:
        return self._fields(**self._operator_fields())

    def _lade_fields(self) -> dict:
        return dict(prior=self._class_tensor("prior"), alpha=self.alpha, remine_lambda=self.remine_lambda,
                    weight=self._class_tensor("weight_classes"), ignore_index=self.ignore_index,
                    reduction=self.reduction, label_smoothing=self.label_smoothing)

    def _operator_fields(self) -> dict:
        """The loss's hyperparameters as the operator's (the presets of :mod:`fastlt._operator`), plus the logit
        scale and the focal exponent, which every loss but 'lade' takes. ``s`` is checked under its own name (a
        value assigned later said "scale must be finite")."""
        fields = dict(scale=V.check_scale("s", self.s), gamma=self.gamma)
        if self.loss in ("la", "balanced_softmax"):
            fields.update(la_fields(self.log_prior, self.tau))
        elif self.loss == "ldam":
            fields.update(ldam_fields(self.margins, self.s))
        return fields

    def _dense_logits(self, features, adjusted: bool = False):
        if adjusted and self.log_prior is None:  # (was ignored: the raw logits came back)
            raise ValueError(f"adjusted=True adds tau * log pi, which loss={self.loss!r} has no prior for (loss 'la', "
                             "'balanced_softmax' or 'lade')")
        z = F.linear(features, self.weight, self.bias)
        if adjusted:
            lp = self.log_prior if self.shard is None else self.log_prior[self.shard.start:self.shard.stop]
            z = z + (self.tau * lp).to(z.dtype)
        return z

    def logits(self, features: Tensor, *, adjusted: bool = False) -> Tensor:
        """Dense (N, C) ``z = f W^T + b``; ``adjusted=True`` adds ``tau * log pi`` (la, Balanced Softmax, lade). A
        class-sharded head: the (N, shard.size) logits of its classes."""
        self._check_inference_features(features)
        return self._dense_logits(features, adjusted)

    def extra_repr(self) -> str:
        own = {"ldam": f", max_margin={self.max_margin}",
               "lade": f", alpha={self.alpha}, remine_lambda={self.remine_lambda}"}.get(self.loss, "")
        return (f"loss={self.loss!r}, tau={self.tau}, s={self.s}, gamma={self.gamma}{own}, "
                f"bias={self.bias is not None}, " + super().extra_repr())


def _neutral(name: str) -> float:
    """The value of a hyperparameter that its loss does not use: LinearLossHead's default (s: 1, no scale)."""
    return 1.0 if name == "s" else inspect.signature(LinearLossHead.__init__).parameters[name].default


class CosineGCLHead(_HeadBase):
    """Cosine classifier + GCL (Li, Cheung, Lu, CVPR 2022), fused: ``head(features, target, seed=None) -> loss``.

    ``CE(s * (cos - noise_mul * e * delta/max(delta) - m * onehot(y)), y)`` on ``cos_ij = <f_i/|f_i|, w_j/|w_j|>``,
    half-normal noise ``e`` per element from (seed, row, column), inside the kernel; focal ``gamma``.

    Args:
        in_features: D; num_classes: C; class_counts: (C,) training counts.
        m, s, noise_mul, gamma: GCL's hyperparameters (as :class:`fastlt.GCLLoss`).
        count_smoothing: added to the counts; eps: the norms' clamp (as ``F.normalize``).
        rows_per_rank: with ``dp_group``, the per-rank batch size (GCL noise rows, as :class:`fastlt.GCLLoss`).
        device, dtype: of the parameter.
        **kwargs: as :class:`LinearLossHead`.

    Defaults are the official loss class's (m=0.5, s=30, noise_mul=1, gamma=0); the official scripts use m=0, s=30,
    noise_mul=0.5 for the backbone stage and m=0.1, s=20, noise_mul=0.5, gamma=1 to re-train the classifier.
    ``weight`` (C, D) is initialised as :class:`fastlt.CosineClassifier`'s (same layout), so a state dict moves
    between the two. ``noise_mul=0, m=0`` gives a plain scaled-cosine softmax head. Inference: :meth:`logits` returns
    the raw cosine logits ``cos`` in [-1, 1] (as ``CosineClassifier``; multiply by ``s`` for the training
    temperature); :meth:`topk` ranks them by row chunks.
    """

    def __init__(self, in_features: int, num_classes: int, class_counts, m: float = 0.5, s: float = 30.0,
                 noise_mul: float = 1.0, gamma: float = 0.0, *, count_smoothing: float = 0.0, eps: float = 1e-12,
                 rows_per_rank: int | None = None, device=None, dtype=None, **kwargs):
        super().__init__(in_features, num_classes, **kwargs)
        self.rows_per_rank = None if rows_per_rank is None else V.check_int("rows_per_rank", rows_per_rank, 1)
        self.m = V.check_finite_float("m", m)
        self.s = V.check_scale("s", s)
        self.noise_mul = V.check_finite_float("noise_mul", noise_mul, min_value=0.0)
        self.gamma = V.check_finite_float("gamma", gamma, min_value=0.0)
        self.eps = eps
        self._fold = FoldedSpread()
        self.init_count_buffers(self._counts(class_counts, count_smoothing), dtype=_count_dtype(dtype), device=device,
                                smoothing=count_smoothing)
        self.weight = nn.Parameter(torch.empty((self.weight_rows, in_features), device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def eps(self) -> float:
        """The norms' clamp (as ``F.normalize``'s): finite and > 0, checked when assigned (a later 0 gave the kernels
        NaN for an all-zero feature row, unchecked)."""
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = V.check_finite_float("eps", value, min_value=0.0, min_inclusive=False)

    def _count_vectors(self, counts: Tensor) -> dict[str, Tensor]:
        return {**super()._count_vectors(counts), "cloud": gcl_cloud_from(counts, F64)}

    def reset_parameters(self) -> None:
        """:class:`fastlt.CosineClassifier`'s initialisation, ``U(-1/sqrt(D), 1/sqrt(D))`` (drawn as
        :meth:`_init_generator` says)."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound, generator=self._init_generator())

    def forward(self, features: Tensor, target: Tensor, seed: int | Tensor | None = None) -> Tensor:
        self._check_features(features)
        if seed is None and self._direct(features, self._split_warning()):  # (a given seed: the functions)
            from . import glue  # (imports triton: at the first call that runs the kernels, as the functions do)

            return glue.run_head(features, self.weight, None, target, self._held_fields(self._gcl_fields),
                                 cosine=True, eps=self.eps, chunk_rows=self.chunk_rows,
                                 chunk_classes=self.chunk_classes, cache=self._cache())
        cloud, noise_mul = self.cloud, self.noise_mul
        if use_triton(self.backend, features):  # (the reference keeps float64)
            cloud, noise_mul = self._fold(cloud, noise_mul)
        return cosine_cross_entropy(features, self.weight, target, **gcl_fields(cloud, self.m, self.s, noise_mul,
                                                                                self.gamma),
                                    seed=seed, eps=self.eps, rows_per_rank=self.rows_per_rank, **self._common())

    def _gcl_fields(self) -> dict:
        """GCL's fields on the kernels: its spread folded into the cloud (eagerly, as :meth:`forward`'s other path)."""
        cloud, noise_mul = self._fold(self._class_tensor("cloud"), self.noise_mul)
        return self._fields(**gcl_fields(cloud, self.m, self.s, noise_mul, self.gamma))

    def _dense_logits(self, features):
        return F.linear(normalize_rows(features, self.eps), normalize_rows(self.weight, self.eps).to(features.dtype))

    def extra_repr(self) -> str:
        eps = "" if self.eps == 1e-12 else f"eps={self.eps}, "
        return f"m={self.m}, s={self.s}, noise_mul={self.noise_mul}, gamma={self.gamma}, {eps}" + super().extra_repr()
