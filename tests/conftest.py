"""Test setup and the helpers every test file shares.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1), which must be set before triton is
first imported, so it is set here, at collection time. ``DEVICE`` is where the kernel tests put their tensors
(CUDA when there is one: the same tests then run natively), ``DTYPES`` the logits dtypes every kernel is tested in.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_rounds_bf16_to_nearest() -> bool:
    """Make the Triton interpreter convert fp32 to bf16 as the GPU does (``cvt.rn``: to nearest, ties to even) and
    torch does, where it truncates (round toward zero: every stored bf16 value biased one way, which moved the
    bf16 head tests to 0.5-1.4 of their bounds across seeds). A test-only patch of the interpreter's private
    ``InterpreterBuilder.cast_impl`` (triton 3.4-3.9); False (truncation kept) where it is not there."""
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None or not hasattr(interpreter, "TensorHandle"):
        return False

    def cast_to_nearest(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data).view(np.uint32)
            out = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            out = np.where((bits & 0x7FFFFFFF) > 0x7F800000, ((bits >> 16) | 0x40).astype(np.uint16), out)  # NaN
            return interpreter.TensorHandle(out.reshape(np.shape(src.data)), dst_type.scalar)
        return cast(self, src, dst_type)

    builder.cast_impl = cast_to_nearest
    return True


INTERPRETER_BF16_TO_NEAREST = _interpreter_rounds_bf16_to_nearest()

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seeded_torch():
    """torch's default generator starts from a random seed in each process (torch 2.13): every test starts it from
    the same one, so what a test draws from it (an upstream gradient, a stand-in tensor, GCL's drawn seed) is the
    same on every run, and a failure can be rerun."""
    torch.manual_seed(0)


def long_tail_counts(C: int, gen: torch.Generator) -> torch.Tensor:
    """(C,) int64 training counts in [1, 500) with a clear head class (class 0: 1000)."""
    counts = torch.randint(1, 500, (C,), generator=gen)
    counts[0] = 1000
    return counts


def class_vectors(C: int, gen: torch.Generator) -> dict:
    """Per-class vectors of :func:`long_tail_counts`: ``log_prior``, ``cloud``, LDAM ``margins`` (float32, CPU) and
    class ``weight`` in [0.1, 1.1)."""
    from fastlt.priors import gcl_cloud, ldam_margins, log_prior

    counts = long_tail_counts(C, gen)
    return dict(log_prior=log_prior(counts), cloud=gcl_cloud(counts), margins=ldam_margins(counts),
                weight=torch.rand(C, generator=gen) + 0.1)


def to_device(kw: dict, dtype=None, device=DEVICE) -> dict:
    """``kw`` with its tensors moved to ``device`` (and to ``dtype`` when given); other values as they are."""
    return {k: (v.to(device=device, dtype=dtype or v.dtype) if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}


def random_operator(rng, cv: dict, *, scales=(30.0, 0.25, 8.0), smoothing: bool = True,
                    weight_key: str = "weight") -> dict:
    """Random operator terms for the seeded fuzzes (``rng`` a ``random.Random``, ``cv`` :func:`class_vectors`):
    each of the prior offset, GCL's noise, a margin (per class or one float), a scale from ``scales``, the focal
    exponent, class weights (under ``weight_key``: the heads call them ``weight_classes``) and label smoothing
    (unless ``smoothing`` is False) with some probability."""
    kw = {}
    if rng.random() < 0.5:
        kw.update(log_prior=cv["log_prior"], tau=rng.choice([1.0, 0.7, -0.5]))
    if rng.random() < 0.4:
        kw.update(cloud=cv["cloud"], noise_mul=rng.choice([1.0, 0.5]), seed=rng.randrange(2**40))
    r = rng.random()
    if r < 0.25:
        kw["margin"] = cv["margins"]
    elif r < 0.5:
        kw["margin"] = rng.choice([0.5, 0.1, -0.2])
    if rng.random() < 0.5:
        kw["scale"] = rng.choice(scales)
    if rng.random() < 0.3:
        kw["gamma"] = rng.choice([1.0, 2.0])
    if rng.random() < 0.4:
        kw[weight_key] = cv["weight"]
    if smoothing and rng.random() < 0.4:
        kw["label_smoothing"] = rng.choice([0.1, 0.5])
    return kw


class IdentityView(torch.autograd.Function):
    """An identity returning a view of its input, the gradient handed on: a non-leaf input standing for the layer
    below (as grad_in_forward needs), and a view made by a custom Function (autograd treats such views apart)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad
