"""The numerics the kernels share: where a running maximum starts, and ``exp`` as one special-function instruction."""

import triton
import triton.language as tl

# The start of every running max: the most negative finite float32, so any finite logit (torch.finfo(dtype).min,
# the usual masking value, too) is >= it, while exp(m_old - m_new) stays NaN-free where only -inf was seen.
NEG_BIG: tl.constexpr = tl.constexpr(-3.4028234663852886e38)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def exp(x):
    """``exp(x)`` as one ``MUFU.EX2`` (fp32). ``tl.exp`` lowers to ``ex2.approx.f32``, which ptxas follows with a
    three-instruction fix-up per element for results below 2^-126; ``exp2`` flushes those denormals to 0 (they
    add nothing to a sum that holds a 1 and flush in any half-precision gradient). Same value otherwise."""
    return tl.math.exp2(x * LOG2E)


@triton.jit
def one_minus_exp_neg(x):
    """``1 - exp(-x)`` for ``x >= 0`` (fp32), accurate where ``x`` is small (the focal base ``1 - p_y`` of a confident
    row, ``x = ce``): the Taylor series to ``x^9 / 9!`` below 1/2 (truncation below 1e-9 relative; ``1 - exp(-x)``
    would lose ``log2(1/x)`` bits to cancellation), ``1 - exp(-x)`` above, where it magnifies exp's error at most
    1.55 times. (The series stopped at 1/32 before: there the GPU's ``ex2.approx``, a few ulps off, came 32 times
    magnified, ~4e-6 relative. Once per row: its cost does not matter.)"""
    series = x * (1.0 - x * (0.5 - x * (1.0 / 6.0 - x * (1.0 / 24.0 - x * (1.0 / 120.0 - x * (
        1.0 / 720.0 - x * (1.0 / 5040.0 - x * (1.0 / 40320.0 - x * (1.0 / 362880.0)))))))))
    return tl.where(x < 0.5, series, 1.0 - exp(-x))
