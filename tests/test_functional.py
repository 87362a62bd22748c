"""fastlt.functional: the backend switch and the presets' argument checks, CPU only."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tau_zero_turns_a_log_prior_with_minus_inf_off(backend):
    """tau = 0 is no offset, even where the hand-made log prior is -inf (a class of prior 0): plain cross-entropy,
    not 0 * -inf = NaN in every row (the kernels and the reference alike)."""
    z, y, counts = inputs(seed=21)
    lp = P.log_prior(counts).clone()
    lp[1] = float("-inf")
    z, y, lp = z.to(DEVICE).requires_grad_(), y.to(DEVICE), lp.to(DEVICE)
    loss = LF.logit_adjusted_cross_entropy(z, y, lp, 0.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, z)
    z64 = z.detach().double().requires_grad_()
    want = torch.nn.functional.cross_entropy(z64, y)
    (want_grad,) = torch.autograd.grad(want, z64)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    # a nonzero tau still takes the -inf: that class's logit is -inf, its gradient 0
    loss = LF.logit_adjusted_cross_entropy(z, torch.where(y == 1, 0, y), lp, 0.5, backend=backend)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and (grad[:, 1] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_half_rows_past_fp16_in_their_sum_agree_on_both_backends(reduction):
    """fp16 rows whose sum overflows but whose mean does not: the kernels sum in float32, and so does the reference
    (it summed in fp16: inf against the kernels' 1e4)."""
    z = torch.zeros(8, 5, device=DEVICE)
    z[:, 0] = -1e4
    z, y = z.half(), torch.zeros(8, dtype=torch.long, device=DEVICE)
    lp = torch.zeros(5, device=DEVICE)
    got = [LF.logit_adjusted_cross_entropy(z, y, lp, 0.0, reduction=reduction, backend=b) for b in ("triton", "torch")]
    torch.testing.assert_close(got[0], got[1])
    assert bool(torch.isfinite(got[0])) == (reduction == "mean")
