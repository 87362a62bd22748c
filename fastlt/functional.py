"""The losses as functions, with a ``backend`` switch: ``'torch'`` runs :mod:`fastlt.reference`,
``'triton'`` the fused kernels, ``'auto'`` (default) the kernels for CUDA tensors and the reference
elsewhere. Signatures match :mod:`fastlt.reference`, plus ``backend`` and, for the row operator,
``grad_in_forward`` (compute the gradient inside the forward and store it over the logits: no extra
memory, but the caller's logits tensor is overwritten — see :func:`adjusted_cross_entropy`).
"""

from __future__ import annotations

import torch

from . import _validation as V
from . import reference as R

__all__ = [
    "adjusted_cross_entropy",
    "logit_adjusted_cross_entropy",
    "balanced_softmax_cross_entropy",
    "ldam_cross_entropy",
    "gcl_cross_entropy",
    "lade_loss",
    "use_triton",
]


def use_triton(backend: str, logits: torch.Tensor) -> bool:
    """Resolve ``backend`` for these logits; ``'triton'`` raises if the kernels cannot run here."""
    V.check_choice("backend", backend, V.BACKENDS)
    if backend == "torch":
        return False
    if backend == "auto":
        return isinstance(logits, torch.Tensor) and logits.is_cuda and _kernels_available()
    if not _kernels_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not importable here")
    if isinstance(logits, torch.Tensor) and not logits.is_cuda and not _interpreting():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
            f"which runs the kernels on the CPU); got a tensor on {logits.device}"
        )
    return True


def _kernels_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def adjusted_cross_entropy(logits, target, *, prior=None, tau=1.0, cloud=None, noise_mul=0.0, noise=None,
                           seed=None, margin=None, scale=1.0, gamma=0.0, weight=None, ignore_index=-100,
                           reduction="mean", label_smoothing=0.0, backend="auto",
                           grad_in_forward=False) -> torch.Tensor:
    """SPEC 2.4's operator; see :func:`fastlt.reference.adjusted_cross_entropy` for the math.

    ``grad_in_forward=True`` (Triton backend only) computes d loss / d logits in the forward pass and
    writes it over ``logits`` (which must then be a leaf-free, contiguous-rows tensor you no longer
    need); the backward only rescales it by ``grad_output`` (skipped, on the GPU, when that is 1).

    ``seed`` (GCL noise): an int, or a one-element int64 tensor on the logits' device, which the kernels read
    from device memory (a CUDA graph that redraws it in place, e.g. ``seed_t.random_(0, 2**62)``, gets fresh
    noise on every replay; an int is baked into the graph). ``None`` draws one from torch's CPU generator (the
    reference path draws the same); under ``torch.compile`` the draw is an op of the graph instead, so every call
    of the compiled graph gets fresh noise without a graph break.
    """
    if not use_triton(backend, logits):
        if grad_in_forward:
            raise ValueError("grad_in_forward=True needs the Triton backend (CUDA tensors)")
        return R.adjusted_cross_entropy(logits, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul,
                                        noise=noise, seed=seed, margin=margin, scale=scale, gamma=gamma,
                                        weight=weight, ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing)
    from ._autograd import adjusted_cross_entropy_triton

    return adjusted_cross_entropy_triton(logits, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul,
                                         noise=noise, seed=seed, margin=margin, scale=scale, gamma=gamma,
                                         weight=weight, ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=label_smoothing, grad_in_forward=grad_in_forward)


def logit_adjusted_cross_entropy(logits, target, log_prior, tau=1.0, *, weight=None, ignore_index=-100,
                                 reduction="mean", label_smoothing=0.0, backend="auto",
                                 grad_in_forward=False) -> torch.Tensor:
    """``CE(z + tau * log_prior, y)`` (Menon et al., 2021); ``log_prior`` (C,) from ``fastlt.priors``."""
    return adjusted_cross_entropy(logits, target, prior=log_prior, tau=tau, weight=weight,
                                  ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing, backend=backend,
                                  grad_in_forward=grad_in_forward)


def balanced_softmax_cross_entropy(logits, target, log_prior, *, weight=None, ignore_index=-100,
                                   reduction="mean", label_smoothing=0.0, backend="auto",
                                   grad_in_forward=False) -> torch.Tensor:
    """Balanced Softmax (Ren et al., 2020): logit-adjusted CE with tau = 1."""
    return logit_adjusted_cross_entropy(logits, target, log_prior, 1.0, weight=weight, ignore_index=ignore_index,
                                        reduction=reduction, label_smoothing=label_smoothing, backend=backend,
                                        grad_in_forward=grad_in_forward)


def ldam_cross_entropy(logits, target, margins, s=30.0, *, weight=None, ignore_index=-100, reduction="mean",
                       label_smoothing=0.0, backend="auto", grad_in_forward=False) -> torch.Tensor:
    """LDAM: ``CE(s * (z - margins[y] * onehot(y)), y)``; ``margins`` (C,) from ``fastlt.priors.ldam_margins``."""
    V.check_finite_float("s", s)
    return adjusted_cross_entropy(logits, target, margin=margins, scale=s, weight=weight, ignore_index=ignore_index,
                                  reduction=reduction, label_smoothing=label_smoothing, backend=backend,
                                  grad_in_forward=grad_in_forward)


def gcl_cross_entropy(cosine, target, cloud, m=0.5, s=30.0, noise_mul=1.0, gamma=0.0, *, seed=None, noise=None,
                      weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, backend="auto",
                      grad_in_forward=False) -> torch.Tensor:
    """GCL on cosine logits; see :func:`fastlt.reference.gcl_cross_entropy`. Noise follows ``seed``
    (drawn from torch's generator when None), the same numbers on every backend."""
    V.check_finite_float("m", m)
    V.check_finite_float("s", s)
    return adjusted_cross_entropy(cosine, target, cloud=cloud, noise_mul=noise_mul, noise=noise, seed=seed,
                                  margin=m, scale=s, gamma=gamma, weight=weight, ignore_index=ignore_index,
                                  reduction=reduction, label_smoothing=label_smoothing, backend=backend,
                                  grad_in_forward=grad_in_forward)


def lade_loss(logits, target, prior, alpha=0.1, remine_lambda=0.1, *, weight=None, ignore_index=-100,
              reduction="mean", label_smoothing=0.0, backend="auto") -> torch.Tensor:
    """LADE: ``PriorCE(z) + alpha * LADER(z)``; ``prior`` (C,) is pi (see :func:`fastlt.reference.lade_loss`)."""
    if not use_triton(backend, logits):
        return R.lade_loss(logits, target, prior, alpha, remine_lambda, weight=weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    from ._autograd import lade_loss_triton

    return lade_loss_triton(logits, target, prior, alpha, remine_lambda, weight=weight, ignore_index=ignore_index,
                            reduction=reduction, label_smoothing=label_smoothing)


from .heads import cosine_cross_entropy, linear_cross_entropy  # noqa: E402
from .lade_head import lade_linear_loss  # noqa: E402

__all__ += ["linear_cross_entropy", "cosine_cross_entropy", "lade_linear_loss"]
