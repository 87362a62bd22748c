"""Every argument check: the error type and a message that names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastlt
from fastlt import functional as LF
from fastlt import priors as P
from fastlt import reference as R

NAN, INF = float("nan"), float("inf")
COUNTS = [100, 30, 10, 3]
C = len(COUNTS)


def data(N=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return z, y


def la(z, y, **kw):
    return R.logit_adjusted_cross_entropy(z, y, P.log_prior(COUNTS), **kw)


# ----------------------------------------------------------------------------------------------
# logits
# ----------------------------------------------------------------------------------------------

def test_logits_need_a_class_dimension():
    """0-dim logits are refused naming the argument; (C,) and (N, C, d1, ...) are F.cross_entropy's shapes
    (tests/test_shapes.py), whose targets must match them."""
    z = torch.zeros(())
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="logits"):
        R.adjusted_cross_entropy(z, y)
    with pytest.raises(ValueError, match="logits"):
        fastlt.LogitAdjustedLoss(COUNTS)(z, y)
    with pytest.raises(ValueError, match="cosine"):
        fastlt.GCLLoss(COUNTS)(z, y)
    with pytest.raises(ValueError, match="logits"):
        R.lade_loss(z, y, P.prior(COUNTS))
    C = len(COUNTS)
    with pytest.raises(ValueError, match="0-dim target"):
        fastlt.LogitAdjustedLoss(COUNTS)(torch.zeros(C), y)
    with pytest.raises(ValueError, match=r"\(N, d1, \.\.\.\)"):
        R.adjusted_cross_entropy(torch.zeros(2, C, 4), y)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_logits_must_be_floating(dtype):
    z = torch.zeros(6, C, dtype=dtype)
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(TypeError, match="logits"):
        R.adjusted_cross_entropy(z, y)
    with pytest.raises(TypeError, match="logits"):
        fastlt.LDAMLoss(COUNTS)(z, y)
    with pytest.raises(TypeError, match="logits"):
        R.lade_loss(z, y, P.prior(COUNTS))


def test_logits_need_a_class():
    z = torch.zeros(6, 0)
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="logits"):
        R.adjusted_cross_entropy(z, y)
    with pytest.raises(ValueError, match="logits"):
        R.lade_loss(z, y, torch.zeros(0))


def test_logits_not_a_tensor():
    with pytest.raises(TypeError, match="logits"):
        R.adjusted_cross_entropy(np.zeros((6, C), dtype=np.float32), torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="logits"):
        R.adjusted_cross_entropy([[0.0, 1.0]], torch.zeros(1, dtype=torch.long))


def test_logits_class_count_must_match_module():
    mods = [fastlt.LogitAdjustedLoss(COUNTS), fastlt.LDAMLoss(COUNTS), fastlt.GCLLoss(COUNTS),
            fastlt.LADELoss(COUNTS), fastlt.BalancedSoftmaxLoss(COUNTS)]
    z = torch.zeros(6, C + 1)
    y = torch.zeros(6, dtype=torch.long)
    for mod in mods:
        with pytest.raises(ValueError, match="class_counts"):
            mod(z, y)


# ----------------------------------------------------------------------------------------------
# target
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5,), (7,), (6, 1), ()])
def test_target_shape(shape):
    z, _ = data()
    y = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match="target"):
        la(z, y)
    with pytest.raises(ValueError, match="target"):
        fastlt.GCLLoss(COUNTS)(z, y)
    with pytest.raises(ValueError, match="target"):
        R.lade_loss(z, y, P.prior(COUNTS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.float16])
def test_target_dtype(dtype):
    z, y = data()
    with pytest.raises(TypeError, match="target"):
        la(z, y.to(dtype))
    with pytest.raises(TypeError, match="target"):
        fastlt.LADELoss(COUNTS)(z, y.to(dtype))


def test_target_not_a_tensor():
    z, y = data()
    with pytest.raises(TypeError, match="target"):
        la(z, y.tolist())


@pytest.mark.parametrize("bad", [-1, -5, C, C + 10])
def test_target_out_of_range(bad):
    z, y = data()
    y[2] = bad
    with pytest.raises(ValueError, match="target"):
        la(z, y)
    with pytest.raises(ValueError, match="target"):
        fastlt.LDAMLoss(COUNTS)(z, y)
    with pytest.raises(ValueError, match="target"):
        fastlt.GCLLoss(COUNTS)(z, y)
    with pytest.raises(ValueError, match="target"):
        fastlt.LADELoss(COUNTS)(z, y)


def test_target_out_of_range_message_names_the_class():
    z, y = data()
    y[1] = 9
    with pytest.raises(ValueError, match="9"):
        la(z, y)


@pytest.mark.parametrize("ignore_index", [-100, -1, 7, 1000])
def test_ignore_index_rows_are_accepted(ignore_index):
    z, y = data()
    y[0] = ignore_index
    y[3] = ignore_index
    out = la(z, y, ignore_index=ignore_index, reduction="none")
    assert out[0].item() == 0.0 and out[3].item() == 0.0 and (out[[1, 2, 4, 5]] > 0).all()
    assert torch.isfinite(fastlt.LADELoss(COUNTS, ignore_index=ignore_index)(z, y))
    assert torch.isfinite(fastlt.GCLLoss(COUNTS, ignore_index=ignore_index)(z.tanh(), y))
    # but another out-of-range value still raises
    y[4] = -3
    with pytest.raises(ValueError, match="target"):
        la(z, y, ignore_index=ignore_index)


def test_ignore_index_does_not_hide_out_of_range_uint8_targets():
    """uint8 class 156 with ignore_index=-100 (156 mod 256): still out of range for C = 4."""
    z, _ = data(2)
    y = torch.tensor([156, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="target"):
        la(z, y)


def test_ignore_index_type():
    z, y = data()
    with pytest.raises(TypeError, match="ignore_index"):
        la(z, y, ignore_index=1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        la(z, y, ignore_index=True)
    with pytest.raises(TypeError, match="ignore_index"):
        fastlt.LogitAdjustedLoss(COUNTS, ignore_index=-100.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignore_index_numpy_integers_are_taken_as_f_cross_entropy_takes_them(backend):
    """``F.cross_entropy`` takes any integer with ``__index__`` but a bool; a numpy integer was refused here."""
    z, y = data()
    y[0] = 2
    lp = P.log_prior(COUNTS)
    want = torch.nn.functional.cross_entropy(z.double() + lp.double(), y, ignore_index=2)
    for value in (np.int64(2), np.int32(2)):
        got = LF.logit_adjusted_cross_entropy(z, y, lp, ignore_index=value, backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        module = fastlt.LogitAdjustedLoss(COUNTS, ignore_index=value, backend=backend)
        assert type(module.ignore_index) is int
        torch.testing.assert_close(module(z, y).double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        LF.logit_adjusted_cross_entropy(z, y, lp, ignore_index=2**64, backend=backend)


def test_target_on_another_device():
    z, _ = data()
    y = torch.zeros(6, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="target"):
        la(z, y)


# ----------------------------------------------------------------------------------------------
# class counts
# ----------------------------------------------------------------------------------------------

MODULES = [fastlt.LogitAdjustedLoss, fastlt.BalancedSoftmaxLoss, fastlt.LDAMLoss, fastlt.GCLLoss,
           fastlt.LADELoss]


@pytest.mark.parametrize("cls", MODULES)
def test_class_counts_negative(cls):
    with pytest.raises(ValueError, match="class_counts"):
        cls([10, -2, 3])


@pytest.mark.parametrize("cls", MODULES)
def test_class_counts_zero_without_smoothing(cls):
    with pytest.raises(ValueError, match="count_smoothing"):
        cls([10, 0, 3])
    with pytest.raises(ValueError, match="count_smoothing"):
        cls(torch.tensor([0, 0]))


@pytest.mark.parametrize("cls", MODULES)
def test_class_counts_non_integer(cls):
    with pytest.raises(TypeError, match="class_counts"):
        cls([10.5, 2, 3])
    with pytest.raises(TypeError, match="class_counts"):
        cls(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="class_counts"):
        cls(["a", "b"])


@pytest.mark.parametrize("cls", MODULES)
def test_class_counts_empty_or_not_1d(cls):
    with pytest.raises(ValueError, match="class_counts"):
        cls([])
    with pytest.raises(ValueError, match="class_counts"):
        cls(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="class_counts"):
        cls([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="class_counts"):
        cls(5)


@pytest.mark.parametrize("cls", MODULES)
def test_class_counts_not_finite(cls):
    with pytest.raises(ValueError, match="class_counts"):
        cls([1.0, INF])
    with pytest.raises(ValueError, match="class_counts"):
        cls([1.0, NAN])


@pytest.mark.parametrize("cls", MODULES)
def test_count_smoothing_invalid(cls):
    for bad in (-1.0, NAN, INF):
        with pytest.raises(ValueError, match="count_smoothing"):
            cls([1, 2], count_smoothing=bad)


# ----------------------------------------------------------------------------------------------
# hyperparameters
# ----------------------------------------------------------------------------------------------

BAD_FLOATS = [NAN, INF, -INF]


@pytest.mark.parametrize("bad", BAD_FLOATS)
def test_nonfinite_hyperparameters_in_modules(bad):
    cases = [
        (fastlt.LogitAdjustedLoss, dict(tau=bad), "tau"),
        (fastlt.LDAMLoss, dict(s=bad), r"\bs\b"),
        (fastlt.LDAMLoss, dict(max_margin=bad), "max_margin"),
        (fastlt.GCLLoss, dict(m=bad), r"\bm\b"),
        (fastlt.GCLLoss, dict(s=bad), r"\bs\b"),
        (fastlt.GCLLoss, dict(noise_mul=bad), "noise_mul"),
        (fastlt.GCLLoss, dict(gamma=bad), "gamma"),
        (fastlt.LADELoss, dict(alpha=bad), "alpha"),
        (fastlt.LADELoss, dict(remine_lambda=bad), "remine_lambda"),
        (fastlt.LogitAdjustedLoss, dict(label_smoothing=bad), "label_smoothing"),
    ]
    for cls, kw, name in cases:
        with pytest.raises(ValueError, match=name):
            cls(COUNTS, **kw)


@pytest.mark.parametrize("bad", BAD_FLOATS)
def test_nonfinite_hyperparameters_in_functions(bad):
    z, y = data()
    cos = z.tanh()
    cloud, pi, lp = P.gcl_cloud(COUNTS), P.prior(COUNTS), P.log_prior(COUNTS)
    margins = P.ldam_margins(COUNTS)
    cases = [
        (lambda: R.logit_adjusted_cross_entropy(z, y, lp, bad), "tau"),
        (lambda: R.ldam_cross_entropy(z, y, margins, bad), "scale|\\bs\\b"),
        (lambda: R.gcl_cross_entropy(cos, y, cloud, m=bad), "margin|\\bm\\b"),
        (lambda: R.gcl_cross_entropy(cos, y, cloud, s=bad), "scale|\\bs\\b"),
        (lambda: R.gcl_cross_entropy(cos, y, cloud, noise_mul=bad), "noise_mul"),
        (lambda: R.gcl_cross_entropy(cos, y, cloud, gamma=bad), "gamma"),
        (lambda: R.lade_loss(z, y, pi, alpha=bad), "alpha"),
        (lambda: R.lade_loss(z, y, pi, remine_lambda=bad), "remine_lambda"),
        (lambda: R.adjusted_cross_entropy(z, y, label_smoothing=bad), "label_smoothing"),
        (lambda: LF.logit_adjusted_cross_entropy(z, y, lp, bad, backend="torch"), "tau"),
        (lambda: LF.gcl_cross_entropy(cos, y, cloud, noise_mul=bad, backend="torch"), "noise_mul"),
        (lambda: LF.lade_loss(z, y, pi, alpha=bad, backend="torch"), "alpha"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def test_hyperparameters_changed_to_nan_after_construction_raise():
    z, y = data()
    mod = fastlt.LogitAdjustedLoss(COUNTS)
    mod.tau = NAN
    with pytest.raises(ValueError, match="tau"):
        mod(z, y)
    gcl = fastlt.GCLLoss(COUNTS)
    gcl.noise_mul = INF
    with pytest.raises(ValueError, match="noise_mul"):
        gcl(z.tanh(), y)
    lade = fastlt.LADELoss(COUNTS)
    lade.alpha = NAN
    with pytest.raises(ValueError, match="alpha"):
        lade(z, y)


@pytest.mark.parametrize("bad", [-0.1, 1.5, 2.0])
def test_label_smoothing_out_of_range(bad):
    z, y = data()
    with pytest.raises(ValueError, match="label_smoothing"):
        la(z, y, label_smoothing=bad)
    for cls in MODULES:
        with pytest.raises(ValueError, match="label_smoothing"):
            cls(COUNTS, label_smoothing=bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        R.lade_loss(z, y, P.prior(COUNTS), label_smoothing=bad)


def test_label_smoothing_bounds_are_allowed():
    z, y = data()
    for ls in (0.0, 1.0):
        assert torch.isfinite(la(z, y, label_smoothing=ls))


def test_gamma_negative():
    z, y = data()
    with pytest.raises(ValueError, match="gamma"):
        R.gcl_cross_entropy(z.tanh(), y, P.gcl_cloud(COUNTS), gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        fastlt.GCLLoss(COUNTS, gamma=-0.5)


def test_max_margin_negative():
    with pytest.raises(ValueError, match="max_margin"):
        fastlt.LDAMLoss(COUNTS, max_margin=-0.1)


@pytest.mark.parametrize("bad", ["1.0", None, [1.0], True])
def test_hyperparameters_of_the_wrong_type(bad):
    z, y = data()
    with pytest.raises(TypeError, match="tau"):
        fastlt.LogitAdjustedLoss(COUNTS, tau=bad)
    with pytest.raises(TypeError, match="tau"):
        la(z, y, tau=bad)
    with pytest.raises(TypeError, match="alpha"):
        fastlt.LADELoss(COUNTS, alpha=bad)


def test_numpy_scalars_are_accepted():
    z, y = data()
    out = la(z, y, tau=np.float32(0.5))
    torch.testing.assert_close(out, la(z, y, tau=0.5))
    assert fastlt.GCLLoss(COUNTS, s=np.float64(20.0)).s == 20.0


# ----------------------------------------------------------------------------------------------
# class vectors, reduction, backend, noise, seed
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [C - 1, C + 1])
def test_weight_wrong_length(length):
    z, y = data()
    w = torch.ones(length)
    with pytest.raises(ValueError, match="weight"):
        la(z, y, weight=w)
    with pytest.raises(ValueError, match="weight"):
        R.lade_loss(z, y, P.prior(COUNTS), weight=w)
    for cls in MODULES:
        with pytest.raises(ValueError, match="weight"):
            cls(COUNTS, weight=w)
    with pytest.raises(ValueError, match="weight"):
        fastlt.LogitAdjustedLoss(COUNTS, weight=[1.0] * length)


def test_weight_wrong_dtype_or_type():
    z, y = data()
    with pytest.raises(TypeError, match="weight"):
        la(z, y, weight=torch.ones(C, dtype=torch.long))
    with pytest.raises(TypeError, match="weight"):
        la(z, y, weight=[1.0] * C)
    with pytest.raises(ValueError, match="weight"):
        la(z, y, weight=torch.ones(C, device="meta"))


def test_module_weight_of_a_wrong_type_or_not_finite():
    """A module's weight= is checked before any conversion (the error names it) and must be finite: a NaN weight
    would make every loss NaN."""
    for cls in MODULES:
        with pytest.raises(TypeError, match="weight"):
            cls(COUNTS, weight="abc")
        with pytest.raises(ValueError, match="weight must be finite"):
            cls(COUNTS, weight=[float("nan")] + [1.0] * (C - 1))
        with pytest.raises(ValueError, match="weight must be finite"):
            cls(COUNTS, weight=torch.full((C,), float("inf")))


def test_module_weight_on_the_meta_device():
    """Building on the meta device (deferred initialisation) skips the finiteness check: no values to read."""
    mod = fastlt.LogitAdjustedLoss(COUNTS, weight=torch.ones(C, device="meta"))
    assert mod.weight.device.type == "meta"


def test_balanced_softmax_rejects_tau():
    with pytest.raises(TypeError, match="LogitAdjustedLoss"):
        fastlt.BalancedSoftmaxLoss(COUNTS, tau=2.0)


def test_unsigned_targets_are_widened():
    """uint16/32/64 targets (numpy arrays of those types) are class indices like any other integer dtype."""
    z, y = data()
    expected = la(z, y)
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        torch.testing.assert_close(la(z, y.to(dtype)), expected, rtol=0, atol=0)


def test_other_class_vectors():
    z, y = data()
    with pytest.raises(ValueError, match="prior"):
        R.logit_adjusted_cross_entropy(z, y, torch.zeros(C + 1))
    with pytest.raises(ValueError, match="prior"):
        R.lade_loss(z, y, torch.ones(C - 1) / (C - 1))
    with pytest.raises(ValueError, match="cloud"):
        R.gcl_cross_entropy(z.tanh(), y, torch.zeros(C + 2))
    with pytest.raises(ValueError, match="margin"):
        R.ldam_cross_entropy(z, y, torch.zeros(2))
    with pytest.raises(ValueError, match="margin"):
        R.adjusted_cross_entropy(z, y, margin=NAN)


@pytest.mark.parametrize("bad", ["avg", "Mean", None, "batchmean"])
def test_reduction_invalid(bad):
    z, y = data()
    with pytest.raises(ValueError, match="reduction"):
        la(z, y, reduction=bad)
    with pytest.raises(ValueError, match="reduction"):
        R.lade_loss(z, y, P.prior(COUNTS), reduction=bad)
    for cls in MODULES:
        with pytest.raises(ValueError, match="reduction"):
            cls(COUNTS, reduction=bad)


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None, "numpy"])
def test_backend_invalid(bad):
    z, y = data()
    with pytest.raises(ValueError, match="backend"):
        LF.logit_adjusted_cross_entropy(z, y, P.log_prior(COUNTS), backend=bad)
    with pytest.raises(ValueError, match="backend"):
        LF.lade_loss(z, y, P.prior(COUNTS), backend=bad)
    for cls in MODULES:
        with pytest.raises(ValueError, match="backend"):
            cls(COUNTS, backend=bad)


@pytest.mark.parametrize("shape", [(6, C + 1), (5, C), (6 * C,), (1, C)])
def test_noise_wrong_shape(shape):
    z, y = data()
    cloud = P.gcl_cloud(COUNTS)
    with pytest.raises(ValueError, match="noise"):
        R.gcl_cross_entropy(z.tanh(), y, cloud, noise=torch.zeros(shape))
    with pytest.raises(ValueError, match="noise"):
        LF.gcl_cross_entropy(z.tanh(), y, cloud, noise=torch.zeros(shape), backend="torch")


def test_noise_not_a_tensor_or_wrong_device():
    z, y = data()
    cloud = P.gcl_cloud(COUNTS)
    with pytest.raises(ValueError, match="noise"):
        R.gcl_cross_entropy(z.tanh(), y, cloud, noise=np.zeros((6, C), dtype=np.float32))
    with pytest.raises(ValueError, match="noise"):
        R.gcl_cross_entropy(z.tanh(), y, cloud, noise=torch.zeros(6, C, device="meta"))


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (-(2**40), ValueError), (2**63, ValueError),
                                       (1.5, TypeError), ("3", TypeError), (True, TypeError),
                                       (torch.tensor([3], dtype=torch.int32), TypeError),
                                       (torch.tensor([1.0]), TypeError), (torch.tensor([1, 2]), ValueError),
                                       (torch.tensor([-5]), ValueError),
                                       (torch.tensor([3], device="meta"), ValueError)],
                         ids=lambda v: repr(v) if not isinstance(v, torch.Tensor) else f"tensor-{v.dtype}-{v.shape}-"
                         f"{v.device}")
def test_seed_invalid(bad, error):
    z, y = data()
    cloud = P.gcl_cloud(COUNTS)
    with pytest.raises(error, match="seed"):
        R.gcl_cross_entropy(z.tanh(), y, cloud, seed=bad)
    with pytest.raises(error, match="seed"):
        fastlt.GCLLoss(COUNTS)(z.tanh(), y, seed=bad)


def test_valid_edge_values_are_accepted():
    z, y = data()
    cloud = P.gcl_cloud(COUNTS)
    assert torch.isfinite(R.gcl_cross_entropy(z.tanh(), y, cloud, seed=0))
    assert torch.isfinite(R.gcl_cross_entropy(z.tanh(), y, cloud, seed=2**63 - 1))
    assert torch.isfinite(R.gcl_cross_entropy(z.tanh(), y, cloud, m=0.0, noise_mul=0.0, gamma=0.0))
    assert torch.isfinite(la(z, y, tau=0.0))
    for reduction in ("mean", "sum", "none"):
        la(z, y, reduction=reduction)


def test_prior_the_old_name_of_log_prior_is_refused():
    """``prior=`` of the adjusted cross-entropy, the reference and the heads held log pi, where ``lade_loss``'s
    ``prior`` and ``fastlt.priors.prior`` are pi: pi given there was taken as log pi, a wrong loss behind a
    DeprecationWarning that Python hides outside ``__main__``. It is a TypeError naming ``log_prior=``."""
    z, y = data()
    pi = P.prior(COUNTS)
    f, w = torch.randn(z.shape[0], 3), torch.randn(C, 3)
    for call in (lambda: LF.adjusted_cross_entropy(z, y, prior=pi, tau=0.5),
                 lambda: R.adjusted_cross_entropy(z, y, prior=pi, tau=0.5),
                 lambda: LF.adjusted_cross_entropy(z, y, prior=pi, log_prior=pi),
                 lambda: LF.linear_cross_entropy(f, w, y, prior=pi),
                 lambda: LF.cosine_cross_entropy(f, w, y, prior=pi)):
        with pytest.raises(TypeError, match=r"prior= is not taken here: the argument is log_prior="):
            call()


def test_numpy_integers_are_taken_wherever_an_int_is():
    """A numpy integer (a size or seed read from an array, a config loaded with numpy) is an int everywhere: the
    noise seed, a head's sizes, chunking and top-k, the samplers' ranks. Each was a TypeError/ValueError."""
    z, y = data(N=4)
    cloud = torch.tensor([0.0, 0.3, 0.6, 0.9])
    for backend in ("torch", "triton"):
        want = LF.gcl_cross_entropy(z.tanh(), y, cloud, seed=7, backend=backend)
        got = LF.gcl_cross_entropy(z.tanh(), y, cloud, seed=np.int64(7), backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    head = fastlt.heads.LinearLossHead(np.int64(3), np.int32(C), COUNTS, chunk_rows=np.int64(2))
    assert (type(head.in_features), type(head.num_classes)) == (int, int)
    features = torch.randn(4, 3)
    torch.testing.assert_close(head(features, y), head(features, y))
    assert head.topk(features, np.int64(2), chunk_rows=np.int64(3)).indices.shape == (4, 2)
    sampler = fastlt.data.ClassBalancedSampler([0, 1, 1, 2, 3, 3], num_replicas=np.int64(2), rank=np.int64(1),
                                                seed=np.int64(3))
    assert len(list(sampler)) == len(sampler)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_numpy_logits_are_refused_by_name_on_both_backends(backend):
    """The reference path took numpy logits to its first tensor method: a bare AttributeError."""
    z, y = data()
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        LF.logit_adjusted_cross_entropy(z.numpy(), y, P.log_prior(COUNTS), backend=backend)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        LF.lade_loss(z.numpy(), y, P.prior(COUNTS), backend=backend)


def test_torch_jit_trace_is_refused_where_it_would_bake_in_a_draw_or_a_launch():
    """``torch.jit.trace`` recorded GCL's drawn seed as a constant (every call of the trace the same noise), and on
    the kernels failed inside the launch plans (``'Tensor' object has no attribute 'bit_length'``). Both raise a
    clear RuntimeError now; a given seed traces (and the trace repeats it, as asked)."""
    z, y = data()
    z = z.tanh()
    gcl = fastlt.GCLLoss(COUNTS, backend="torch")
    with pytest.raises(RuntimeError, match="jit.trace would record GCL's drawn noise seed"):
        torch.jit.trace(lambda a: gcl(a, y), (z,), check_trace=False)
    traced = torch.jit.trace(lambda a: gcl(a, y, seed=5), (z,), check_trace=False)
    torch.testing.assert_close(traced(z), gcl(z, y, seed=5))
    la = fastlt.LogitAdjustedLoss(COUNTS, backend="triton")
    with pytest.raises(RuntimeError, match="jit.trace cannot trace the Triton kernels"):
        torch.jit.trace(lambda a: la(a, y), (z,), check_trace=False)


def test_a_module_built_under_inference_mode_trains():
    """Its count vectors and class weights were inference tensors, which LADE's reference saves for the backward
    (``Inference tensors cannot be saved for backward``), as any loss with weights and smoothing does."""
    with torch.inference_mode():
        crits = [fastlt.LADELoss(COUNTS, weight=torch.ones(C), label_smoothing=0.1, backend="torch"),
                 fastlt.LogitAdjustedLoss(COUNTS, weight=torch.ones(C), label_smoothing=0.1, backend="torch")]
    z, y = data()
    for crit in crits:
        leaf = z.clone().requires_grad_()
        crit(leaf, y).backward()
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_class_vectors_with_bad_values_are_refused_on_the_cpu(backend):
    """A class vector's values are checked where they can be read without a GPU sync (CPU tensors), once per
    tensor (the arguments cache): NaN or +inf in a log prior (-inf leaves a class out), a non-finite weight, margin
    or cloud, and a LADE prior that is not pi (log-probabilities, counts, zeros: NaN, a negative loss, a finite
    nonsense). Each gave a silent NaN or a wrong loss, the LADE module's assigned prior too."""
    z, y = data()
    lp = P.log_prior(COUNTS)
    pi = P.prior(COUNTS)
    nan = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    inf = torch.tensor([0.0, float("inf"), 0.0, 0.0])
    refused = [
        (lambda: LF.logit_adjusted_cross_entropy(z, y, lp + nan, backend=backend), "log_prior must not hold NaN"),
        (lambda: LF.logit_adjusted_cross_entropy(z, y, lp + inf, backend=backend), "log_prior must not hold NaN"),
        (lambda: LF.adjusted_cross_entropy(z, y, weight=1 + inf, backend=backend), "weight must be finite"),
        (lambda: LF.ldam_cross_entropy(z, y, 0.1 + nan, backend=backend), "margin must be finite"),
        (lambda: LF.gcl_cross_entropy(z.tanh(), y, 0.5 + nan, seed=1, backend=backend), "cloud must be finite"),
        (lambda: LF.lade_loss(z, y, lp, backend=backend), "prior must be pi"),
        (lambda: LF.lade_loss(z, y, torch.tensor(COUNTS, dtype=torch.float32), backend=backend), "got sum 143"),
        (lambda: LF.lade_loss(z, y, torch.zeros(C), backend=backend), "prior must be pi"),
        (lambda: LF.lade_loss(z, y, pi + nan, backend=backend), "prior must be finite"),
    ]
    for call, match in refused:
        with pytest.raises(ValueError, match=match):
            call()
    lade = fastlt.LADELoss(COUNTS, backend=backend)
    lade(z, y)
    lade.prior = lp  # a log prior assigned in place of pi: refused at the next call
    with pytest.raises(ValueError, match="prior must be pi"):
        lade(z, y)
    masked = lp.clone()
    masked[3] = -float("inf")  # a class the prior leaves out: taken
    assert torch.isfinite(LF.logit_adjusted_cross_entropy(z, torch.tensor([0, 1, 2, 0, 1, 2]), masked,
                                                          backend=backend))
    assert torch.isfinite(LF.lade_loss(z, y, (pi * 1.0005).to(torch.float32), backend=backend))  # within 1e-3


def test_scales_and_weights_of_the_papers_hyperparameters_are_bounded():
    """s <= 0 (a constant log C loss at 0, flipped logits below), a negative noise_mul (the noise added instead of
    taken away) and a negative LADE alpha or remine_lambda (a regulariser that rewards, unbounded) were accepted, on
    the modules, the heads and the functions; each is a ValueError naming it, at construction and when assigned."""
    z, y = data()
    counts = COUNTS
    for make, match in [
        (lambda: fastlt.LDAMLoss(counts, s=0.0), "s must be > 0"),
        (lambda: fastlt.GCLLoss(counts, s=-30.0), "s must be > 0"),
        (lambda: fastlt.GCLLoss(counts, noise_mul=-1.0), "noise_mul must be >= 0"),
        (lambda: fastlt.LADELoss(counts, alpha=-0.1), "alpha must be >= 0"),
        (lambda: fastlt.LADELoss(counts, remine_lambda=-0.1), "remine_lambda must be >= 0"),
        (lambda: fastlt.LinearLossHead(3, C, counts, loss="ldam", s=0.0), "s must be > 0"),
        (lambda: fastlt.CosineGCLHead(3, C, counts, noise_mul=-2.0), "noise_mul must be >= 0"),
        (lambda: LF.ldam_cross_entropy(z, y, torch.full((C,), 0.3), s=0.0), "s must be > 0"),
        (lambda: LF.gcl_cross_entropy(z.tanh(), y, torch.ones(C), noise_mul=-1.0, seed=1), "noise_mul must be >= 0"),
        (lambda: R.gcl_cross_entropy(z.tanh(), y, torch.ones(C), s=-1.0, seed=1), "s must be > 0"),
        (lambda: LF.lade_loss(z, y, P.prior(counts), alpha=-1.0), "alpha must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    for crit in (fastlt.LDAMLoss(counts, backend="torch"), fastlt.GCLLoss(counts, backend="torch")):
        crit.s = -1.0  # a schedule's bad value: refused at the next call
        with pytest.raises(ValueError, match="s must be > 0"):
            crit(z.tanh(), y)


def test_common_target_mistakes_name_their_fix():
    """One-hot rows as integers (F.one_hot) and an (N, 1) target are refused with what to do (``target.float()``,
    ``target.squeeze(1)``), and a class vector on another device says to move the module."""
    z, y = data(N=4)
    crit = fastlt.LogitAdjustedLoss(COUNTS, backend="torch")
    with pytest.raises(ValueError, match=r"target\.float\(\) for one-hot rows"):
        crit(z, torch.nn.functional.one_hot(y, C))
    with pytest.raises(ValueError, match=r"target\.squeeze\(1\)"):
        crit(z, y[:, None])
    with pytest.raises(ValueError, match=r"move it with \.to\(logits\.device\)"):
        crit.to("meta")(z, y)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_term_weight_without_its_class_vector_is_refused(backend):
    """``tau`` without ``log_prior`` and ``noise_mul`` without ``cloud`` were ignored (the plain cross-entropy came
    back); each is a ValueError naming the missing vector. tau 0 or 1 and noise_mul 0 (the defaults, "off") pass."""
    z, y = data()
    with pytest.raises(ValueError, match="tau=2.0 weighs log_prior, which is not given"):
        LF.adjusted_cross_entropy(z, y, tau=2.0, backend=backend)
    with pytest.raises(ValueError, match="noise_mul=1.0 scales GCL's noise by cloud, which is not given"):
        LF.adjusted_cross_entropy(z, y, noise_mul=1.0, seed=3, backend=backend)
    with pytest.raises(ValueError, match="noise_mul=0.5 scales"):
        LF.cosine_cross_entropy(torch.randn(6, 3), torch.randn(C, 3), y, noise_mul=0.5, seed=3, backend=backend)
    want = torch.nn.functional.cross_entropy(z, y)
    for kw in (dict(tau=0.0), dict(tau=1.0), dict(noise_mul=0.0)):
        torch.testing.assert_close(LF.adjusted_cross_entropy(z, y, backend=backend, **kw), want)


def test_a_prior_is_held_to_its_sum_within_its_dtype_and_not_when_learned():
    """A 16-bit prior's sum is off by its rounding (fp16 subnormals: a uniform prior of 10^6 classes sums to 1.013),
    and a learned prior (an nn.Parameter) moves with each optimiser step: both pass the prior check, which refused
    them (and warned about a tensor that requires grad read as a number); a negative entry still fails."""
    import warnings

    from fastlt import _validation as V

    V.check_class_values("prior", torch.full((10 ** 6,), 1e-6).half(), V.PRIOR)
    learned = torch.nn.Parameter(P.prior(COUNTS) * 1.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        V.check_class_values("prior", learned, V.PRIOR)
    with pytest.raises(ValueError, match="prior must be pi"):
        V.check_class_values("prior", torch.tensor([1.2, -0.2]), V.PRIOR)
    with pytest.raises(ValueError, match=r"within 0\.001"):
        V.check_class_values("prior", torch.tensor([0.6, 0.6]), V.PRIOR)


def test_a_zero_count_points_to_counting_labels():
    """Training labels passed as class_counts usually hold a zero (class 0's label): the zero-count error, which
    pointed to count_smoothing only, also says how to count labels."""
    with pytest.raises(ValueError, match=r"fastlt\.data\.class_counts\(labels, num_classes\)"):
        fastlt.LogitAdjustedLoss([0, 1, 1, 2, 0, 1])
