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
