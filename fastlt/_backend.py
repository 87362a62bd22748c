"""Which backend runs a call: the Triton kernels or the pure-PyTorch reference (the bottom of the package: it
imports nothing of fastlt but the argument checks)."""

from __future__ import annotations

import os
import sys

import torch

from . import _validation as V

__all__ = ["use_triton", "kernels_available", "interpreting", "autocast_inputs"]


def use_triton(backend: str, logits) -> bool:
    """Resolve ``backend`` ('auto', 'torch' or 'triton') for ``logits`` (or features): 'auto' takes the kernels for
    CUDA tensors of the dtypes they take (float32, bfloat16, float16) when Triton is importable, the reference
    otherwise (float64: a precision check runs as asked, not into the kernels' TypeError; a tensor of a
    ``torch.func`` transform or forward-mode AD, :func:`fastlt._validation.under_transform`); 'triton' raises
    ``RuntimeError`` where the kernels cannot run (no triton, CPU tensors without ``TRITON_INTERPRET=1``, or under
    a transform or forward-mode AD)."""
    V.check_choice("backend", backend, V.BACKENDS)
    if backend == "torch":
        return False
    if isinstance(logits, torch.Tensor) and V.under_transform(logits):
        if backend == "auto":
            return False
        raise RuntimeError("backend='triton' cannot run under torch.func transforms (grad, vmap, jacrev, ...) or "
                           "forward-mode AD (torch.autograd.forward_ad): its autograd Functions are first-order "
                           "kernels, not functorch rules, and give a class tensor's tangent nothing; use "
                           "backend='torch' (or 'auto', which takes the reference path there)")
    if backend == "auto":
        return (isinstance(logits, torch.Tensor) and logits.is_cuda and logits.dtype != torch.float64
                and kernels_available())
    if not kernels_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not importable here")
    if isinstance(logits, torch.Tensor) and not logits.is_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
            f"which runs the kernels on the CPU); got a tensor on {logits.device}"
        )
    return True


_AVAILABLE: bool | None = None  # kernels_available's answer, once asked


# Dynamo calls these two as they are and takes their answers as constants: traced, they guarded on their globals
# (``_AVAILABLE is None``), so an eager call after the first compiled one compiled the graph again
def _constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (~1.1 s of ``import
    fastlt``, and of ``fastlt --version``) where nothing has yet: torch's decorator only sets this attribute, which
    Dynamo reads when it traces a call (tests/test_kernels_compile.py compares the two marks)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def kernels_available() -> bool:
    """Whether triton imports here (tried once, at the first call)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            available = False
        else:
            available = True
        if torch.compiler.is_compiling():  # no global set while tracing (torch.compile refuses that side effect
            return available               # inside a checkpointed region); the next eager call keeps it
        _AVAILABLE = available
    return _AVAILABLE


_INTERPRETING: bool | None = None  # interpreting's answer, once asked


@_constant_result
def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``: on the CPU). Read once, at the
    first call: Triton reads the variable when it decorates the kernels, as they are imported, so a later change
    would not change how they run."""
    global _INTERPRETING
    if _INTERPRETING is None:
        answer = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if torch.compiler.is_compiling():  # (no global set while tracing: see kernels_available)
            return answer
        _INTERPRETING = answer
    return _INTERPRETING


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def loss_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of a loss of the logits (or a head's features) ``t``: float32 under ``torch.autocast`` (CUDA or CPU)
    for half-precision ``t``, as ``nn.CrossEntropyLoss``'s there (autocast runs ``cross_entropy`` in float32: a
    ``GradScaler``'s 2^16 is inf in fp16, and a bf16 loss keeps 3 digits); else ``t``'s dtype."""
    dtype = t.dtype
    if dtype is not torch.float16 and dtype is not torch.bfloat16 or not _any_autocast():  # (first: host time)
        return dtype
    dev = t.device.type
    return torch.float32 if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) else dtype


def in_loss_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`loss_dtype`: half-precision logits in float32 under ``torch.autocast``, as autocast runs
    ``cross_entropy`` (the reference paths take them so, a data-parallel or class-sharded rank as one process); else
    ``t`` itself."""
    return t.to(loss_dtype(t))


def autocast_inputs(features, weight, bias):
    """``(features, weight, bias, device_type)`` in the autocast dtype under ``torch.autocast`` (CUDA or CPU), as
    ``nn.Linear`` would run a head, with the device type whose autocast is on; else as given and None (non-tensors
    too: the head's checks raise for those)."""
    if not all(isinstance(t, torch.Tensor) for t in (features, weight) + (() if bias is None else (bias,))):
        return features, weight, bias, None
    dev = features.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return features.to(dt), weight.to(dt), None if bias is None else bias.to(dt), dev
    return features, weight, bias, None
