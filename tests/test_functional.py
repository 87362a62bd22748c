"""fastlt.functional: the backend switch and the presets' argument checks, CPU only."""

from __future__ import annotations

import pytest
import torch
from test_losses import INTERPRET, inputs

from fastlt import functional as LF
from fastlt import priors as P
from fastlt import reference as R


def test_functional_errors_name_s_and_m():
    cos, y, counts = inputs(seed=4, cosine=True)
    cloud = P.gcl_cloud(counts)
    with pytest.raises(ValueError, match=r"^s must be finite"):
        LF.gcl_cross_entropy(cos, y, cloud, s=float("inf"))
    with pytest.raises(ValueError, match=r"^m must be finite"):
        R.gcl_cross_entropy(cos, y, cloud, m=float("nan"))
    with pytest.raises(TypeError, match=r"^s must be a real number"):
        LF.ldam_cross_entropy(cos, y, P.ldam_margins(counts), s="30")


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs Triton on the CPU")
def test_functional_backend_triton_on_cpu_raises():
    z, y, counts = inputs(seed=16)
    with pytest.raises(RuntimeError, match="(?i)cuda|triton"):
        LF.logit_adjusted_cross_entropy(z, y, P.log_prior(counts), backend="triton")
    with pytest.raises(RuntimeError, match="(?i)cuda|triton"):
        LF.lade_loss(z, y, P.prior(counts), backend="triton")


def test_functional_torch_backend_equals_reference():
    z, y, counts = inputs(seed=18)
    cos = z.tanh()
    lp, pi = P.log_prior(counts), P.prior(counts)
    pairs = [
        (LF.logit_adjusted_cross_entropy(z, y, lp, 0.8, backend="torch"),
         R.logit_adjusted_cross_entropy(z, y, lp, 0.8)),
        (LF.balanced_softmax_cross_entropy(z, y, lp, backend="torch"),
         R.balanced_softmax_cross_entropy(z, y, lp)),
        (LF.ldam_cross_entropy(z, y, P.ldam_margins(counts), 30.0, backend="torch"),
         R.ldam_cross_entropy(z, y, P.ldam_margins(counts), 30.0)),
        (LF.gcl_cross_entropy(cos, y, P.gcl_cloud(counts), seed=3, backend="torch"),
         R.gcl_cross_entropy(cos, y, P.gcl_cloud(counts), seed=3)),
        (LF.lade_loss(z, y, pi, backend="torch"), R.lade_loss(z, y, pi)),
        (LF.adjusted_cross_entropy(z, y, log_prior=lp, margin=0.2, scale=2.0, gamma=1.0, backend="auto"),
         R.adjusted_cross_entropy(z, y, log_prior=lp, margin=0.2, scale=2.0, gamma=1.0)),
    ]
    for got, exp in pairs:
        assert torch.equal(got, exp)
    assert LF.use_triton("torch", z) is False
    assert LF.use_triton("auto", z) is False


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what 'auto' decides from, without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_auto_takes_the_kernels_for_cuda_tensors_of_their_dtypes_only():
    """'auto' picks the kernels for CUDA tensors they take, and the reference for float64 ones (the kernels would
    raise a TypeError: a float64 precision check on the GPU runs as asked)."""
    from fastlt._backend import kernels_available

    if not kernels_available():
        pytest.skip("triton is not importable here")
    for dtype, kernels in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, True),
                           (torch.float64, False)):
        z = torch.Tensor._make_subclass(_OnCuda, torch.zeros(2, 3, dtype=dtype))
        assert LF.use_triton("auto", z) is kernels, dtype
