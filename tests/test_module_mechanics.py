"""nn.Module mechanics of the loss modules and heads against a fresh float64 reference: copies made after in-place
edits, class tensors replaced by an nn.Parameter or a parametrization, hyperparameters assigned later, repr."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import DEVICE
from torch import nn
from torch.nn.utils import parametrize

import fastlt
from fastlt import priors as P
from fastlt import reference as R

F64 = torch.float64
COUNTS = [400, 90, 20, 6, 1]
C = len(COUNTS)


def _inputs(seed: int, D: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, D or C, generator=g, dtype=F64)
    y = torch.randint(0, C, (6,), generator=g)
    return (x if D else x.clamp(-1, 1)).to(DEVICE), y.to(DEVICE)


def _copy(mod, how: str):
    if how == "deepcopy":
        return copy.deepcopy(mod)
    if how == "pickle":
        return pickle.loads(pickle.dumps(mod))
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _copied_after_two_cloud_edits(mod, x, y, how: str):
    """Halve ``mod``'s cloud in place, call it, halve it again, then copy it ``how``."""
    with torch.no_grad():
        mod.cloud.mul_(0.5)
    mod(x, y, seed=3)
    with torch.no_grad():
        mod.cloud.mul_(0.5)
    return _copy(mod, how)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_gcl_copy_made_after_cloud_edits_uses_the_edited_cloud(backend, how):
    """noise_mul * cloud is kept between calls, known by the cloud's version: a copied cloud's version counter starts
    again, so a copy made after a second in-place edit used the product of the first (loss 5.5e-2, gradient 0.38
    off). Loss module and cosine head, against the reference with the same noise."""
    z, y = _inputs(0)
    crit = fastlt.GCLLoss(COUNTS, noise_mul=0.5, backend=backend).to(DEVICE)
    twin = _copied_after_two_cloud_edits(crit, z.float(), y, how)
    cloud = P.gcl_cloud(COUNTS, dtype=F64).to(DEVICE) * 0.25
    want = R.gcl_cross_entropy(z, y, cloud, m=0.5, s=30.0, noise_mul=0.5, seed=3)
    for mod in (twin, crit):
        torch.testing.assert_close(mod(z.float(), y, seed=3).double(), want, rtol=2e-5, atol=2e-5)

    f, y = _inputs(1, D=3)
    head = fastlt.CosineGCLHead(3, C, COUNTS, noise_mul=0.5, backend=backend).to(DEVICE)
    twin = _copied_after_two_cloud_edits(head, f.float(), y, how)
    want = R.reference_cosine_cross_entropy(f, head.weight.detach().double(), y, cloud=cloud, noise_mul=0.5,
                                            margin=0.5, scale=30.0, seed=3)
    torch.testing.assert_close(twin(f.float(), y, seed=3).double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_class_tensor_replaced_by_a_parameter(backend):
    """``crit.log_prior = nn.Parameter(...)`` (a learned logit adjustment) moved it out of the buffers, and the
    kernels' path read it there: a bare KeyError. Under no_grad it is used, and follows in-place edits (an optimizer
    step); in grad mode the kernels refuse it by name, the reference differentiates it."""
    z, y = _inputs(2)
    crit = fastlt.LogitAdjustedLoss(COUNTS, backend=backend).to(DEVICE)
    crit.log_prior = nn.Parameter(crit.log_prior.clone())
    base = P.log_prior(COUNTS, dtype=F64).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(crit(z.float(), y).double(), R.adjusted_cross_entropy(z, y, log_prior=base, tau=1.0),
                                   rtol=2e-6, atol=2e-6)
        crit.log_prior.add_(torch.arange(C, device=DEVICE))
        torch.testing.assert_close(crit(z.float(), y).double(),
                                   R.adjusted_cross_entropy(z, y, log_prior=base + torch.arange(C, device=DEVICE),
                                                            tau=1.0), rtol=2e-6, atol=2e-6)
    if backend == "triton":
        with pytest.raises(ValueError, match="log_prior requires grad"):
            crit(z.float(), y)
    else:
        crit(z.float(), y).backward()
        assert crit.log_prior.grad is not None and crit.log_prior.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_learned_class_weights_given_to_the_constructor_are_kept(backend):
    """``weight=nn.Parameter(...)`` (``weight_classes=`` of a head) was detached into a float32 buffer: no error on
    the kernels, no gradient on the reference. It is now the module's parameter, as assigning it makes it; another
    tensor that requires grad (which a copy would leave without a gradient) is refused by name."""
    z, y = _inputs(3)
    w = nn.Parameter(torch.linspace(0.5, 2.0, C, device=DEVICE))
    for module in (fastlt.LogitAdjustedLoss(COUNTS, weight=w, backend=backend),
                   fastlt.heads.LinearLossHead(C, C, COUNTS, weight_classes=w, backend=backend)):
        name = "weight" if isinstance(module, fastlt.LogitAdjustedLoss) else "weight_classes"
        module.to(DEVICE)
        assert getattr(module, name) is w and dict(module.named_parameters())[name] is w
        if backend == "triton":
            with pytest.raises(ValueError, match=f"{name} requires grad"):
                module(z.float(), y)
            continue
        w.grad = None
        module(z.float(), y).backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="weight requires grad.*nn.Parameter"):
        fastlt.LogitAdjustedLoss(COUNTS, weight=w * 2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_parametrized_class_weight_is_read_anew_every_call(backend):
    """A parametrization of ``weight`` (KeyError on both backends before): its value is made from the original at
    each call, so an edit of the original is seen at the next call (no fields held across it)."""
    class Abs(nn.Module):
        def forward(self, w):
            return w.abs()

    z, y = _inputs(3)
    crit = fastlt.LogitAdjustedLoss(COUNTS, weight=torch.ones(C), backend=backend).to(DEVICE)
    parametrize.register_parametrization(crit, "weight", Abs())
    base = P.log_prior(COUNTS, dtype=F64).to(DEVICE)
    for w in (torch.ones(C), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])):
        with torch.no_grad():
            crit.parametrizations.weight.original.copy_(-w)
        want = R.adjusted_cross_entropy(z, y, log_prior=base, tau=1.0, weight=w.to(DEVICE, F64))
        torch.testing.assert_close(crit(z.float(), y).double(), want, rtol=2e-6, atol=2e-6)


def test_max_margin_refuses_margins_it_cannot_remake():
    crit = fastlt.LDAMLoss(COUNTS)
    crit.margins = nn.Parameter(crit.margins.clone())
    with pytest.raises(ValueError, match="max_margin cannot remake margins"):
        crit.max_margin = 0.3
    assert crit.max_margin == 0.5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_noise_mul_assigned_later_is_checked_on_the_kernels_too(value):
    """A NaN or infinite noise_mul set after construction gave a NaN loss on the kernels (folded into the cloud
    unchecked) where the reference raised."""
    z, y = _inputs(4)
    f, _ = _inputs(4, D=3)
    crit = fastlt.GCLLoss(COUNTS, backend="triton").to(DEVICE)
    head = fastlt.CosineGCLHead(3, C, COUNTS, backend="triton").to(DEVICE)
    crit.noise_mul = head.noise_mul = value
    with pytest.raises(ValueError, match="noise_mul must be finite"):
        crit(z.float(), y)
    with pytest.raises(ValueError, match="noise_mul must be finite"):
        head(f.float(), y)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_hyperparameters_assigned_later_are_refused_by_their_names(backend):
    """A head's s or m set to a non-finite value after construction was refused under the operator's names
    ("scale must be finite", "margin must be finite"); the loss modules name them as their arguments."""
    f, y = _inputs(4, D=3)
    for make, name in [(lambda: fastlt.CosineGCLHead(3, C, COUNTS, backend=backend), "s"),
                       (lambda: fastlt.CosineGCLHead(3, C, COUNTS, backend=backend), "m"),
                       (lambda: fastlt.LinearLossHead(3, C, COUNTS, loss="ldam", backend=backend), "s"),
                       (lambda: fastlt.LinearLossHead(3, C, None, loss="ce", backend=backend), "s")]:
        head = make().to(DEVICE)
        setattr(head, name, float("inf"))
        with pytest.raises(ValueError, match=f"^{name} must be finite"):
            head(f.float(), y)


def test_balanced_softmax_refuses_a_tau_assigned_later():
    """The constructors refuse tau != 1 for Balanced Softmax; an assignment did not (the loss became logit
    adjustment silently)."""
    crit = fastlt.BalancedSoftmaxLoss(COUNTS)
    crit.tau = 1.0
    with pytest.raises(ValueError, match="BalancedSoftmaxLoss fixes tau = 1"):
        crit.tau = 0.5
    head = fastlt.LinearLossHead(3, C, COUNTS, loss="balanced_softmax")
    with pytest.raises(ValueError, match="fixes tau = 1"):
        head.tau = 0.5
    assert crit.tau == 1.0 and head.tau == 1.0


def test_repr_names_the_options_not_at_their_default():
    crit = fastlt.LogitAdjustedLoss(COUNTS, weight=torch.ones(C), ignore_index=3, label_smoothing=0.1,
                                    grad_in_forward=True, count_smoothing=0.5)
    text = repr(crit)
    for part in ("tau=1.0", f"num_classes={C}", "weight=(5,)", "ignore_index=3", "label_smoothing=0.1",
                 "grad_in_forward=True", "count_smoothing=0.5"):
        assert part in text, (part, text)
    assert "ignore_index" not in repr(fastlt.LogitAdjustedLoss(COUNTS))


def _assign(t, values, how: str):
    """Give buffer ``t`` other values without an in-place op: ``t.data = values`` or ``torch.utils.swap_tensors``
    (both keep its id, and can keep its version)."""
    if how == "data":
        t.data = values
    else:
        torch.utils.swap_tensors(t, values.clone())


@pytest.mark.parametrize("how", ["data", "swap"])
def test_data_assignment_and_swaps_reach_the_kernels(how):
    """GCL's folded spread and LADE's log prior were kept while the buffer's version stayed: ``cloud.data = new`` or
    a swap was ignored (GCL 5.3135 for 5.3386), LADE mixed the new pi with the old log pi, and a LADE prior once
    used on the kernels could no longer be swapped (a weak reference to it). Each call now matches a module made
    with the new values."""
    z, y = _inputs(4)
    z = z.float()
    gcl = fastlt.GCLLoss(COUNTS, noise_mul=0.5, backend="triton")
    gcl(z, y, seed=5)
    new_cloud = torch.linspace(0.1, 1.0, C)
    _assign(gcl.cloud, new_cloud, how)
    want = R.gcl_cross_entropy(z.double(), y, new_cloud.double(), m=0.5, s=30.0, noise_mul=0.5, seed=5)
    torch.testing.assert_close(gcl(z, y, seed=5).double(), want, rtol=2e-5, atol=2e-5)

    lade = fastlt.LADELoss(COUNTS, backend="triton")
    lade(z, y)
    new_prior = torch.softmax(torch.arange(C, dtype=torch.float32), 0)
    _assign(lade.prior, new_prior, how)
    want = R.lade_loss(z.double(), y, new_prior.double(), 0.1, 0.1)
    torch.testing.assert_close(lade(z, y).double(), want, rtol=2e-5, atol=2e-5)


def test_a_lade_prior_parameter_cast_with_the_module():
    """A LADE prior replaced by an nn.Parameter (no grad), used on the kernels, then the module cast with
    ``.half()``: the cast kept the parameter's id and version, so the kernels got the cached pi, now fp16 (a
    dtype error in the kernel). Now the same loss as before the cast, within fp16's rounding of the prior."""
    z, y = _inputs(5)
    lade = fastlt.LADELoss(COUNTS, backend="triton")
    lade.prior = nn.Parameter(lade.prior.clone(), requires_grad=False)
    before = lade(z.float(), y)
    lade.half()
    assert lade.prior.dtype == torch.float16
    torch.testing.assert_close(lade(z.float(), y), before, rtol=2e-3, atol=2e-3)


def test_a_learned_cloud_is_refused_after_a_no_grad_call():
    """A GCL cloud made an nn.Parameter (noise_mul not 0 or 1): the kernels refuse it in grad mode, but one call
    under no_grad (a validation step) kept the folded product, made without grad, and every later training call
    ran with the cloud left without a gradient. Now the fold leaves a cloud that requires grad alone."""
    z, y = _inputs(6)
    crit = fastlt.GCLLoss(COUNTS, noise_mul=0.5, backend="triton")
    crit.cloud = nn.Parameter(crit.cloud.clone())
    with torch.no_grad():
        crit(z.float(), y, seed=1)
    with pytest.raises(ValueError, match="cloud requires grad"):
        crit(z.float(), y, seed=1)
    # the buffer made learnable in place after a step (the held fields held the folded product: no refusal)
    for mod, x in [(fastlt.GCLLoss(COUNTS, noise_mul=0.5, backend="triton"), z.float()),
                   (fastlt.CosineGCLHead(3, C, COUNTS, noise_mul=0.5, backend="triton"), _inputs(6, D=3)[0].float())]:
        mod(x, y)  # (a drawn seed: the held fields' path)
        mod.cloud.requires_grad_(True)
        with pytest.raises(ValueError, match="cloud requires grad"):
            mod(x, y)


def test_a_count_buffer_given_other_data_is_not_remade_by_a_cast():
    """``crit.margins.data = values`` kept the buffer's id and version, so it passed for the module's own, and a
    later ``.double()`` made it again from the counts: the assigned values were lost."""
    crit = fastlt.LDAMLoss(COUNTS)
    values = torch.linspace(0.0, 0.4, C)
    crit.margins.data = values.clone()
    crit.double()
    torch.testing.assert_close(crit.margins, values.double())


def test_margins_remade_after_a_half_cast_are_float32():
    """Margins edited in place (so not the module's own), the module cast to fp16 (which casts such a buffer), then
    max_margin set: the margins were remade from the counts in fp16, where a module's own vectors stay float32."""
    crit = fastlt.LDAMLoss(COUNTS)
    with torch.no_grad():
        crit.margins.mul_(2)
    crit.half()
    assert crit.margins.dtype == torch.float16
    crit.max_margin = 0.3
    fresh = fastlt.LDAMLoss(COUNTS, max_margin=0.3).half()
    assert crit.margins.dtype == fresh.margins.dtype == torch.float32
    torch.testing.assert_close(crit.margins, fresh.margins, rtol=0, atol=0)


def test_a_gcl_module_pickled_by_the_previous_version_runs_on_the_kernels():
    """FoldedSpread became a HeldDerived, whose maker is an attribute; a GCL module saved before (its FoldedSpread's
    state {"_held": None}) had none, and its first kernel call raised AttributeError."""
    from fastlt._operator import FoldedSpread

    old = FoldedSpread.__new__(FoldedSpread)
    old.__dict__.update({"_held": None})  # what pickle restores from the old state (no __setstate__)
    cloud = torch.linspace(0.1, 1.0, C)
    spread, noise_mul = old(cloud, 0.5)
    assert noise_mul == 1.0
    torch.testing.assert_close(spread, cloud * 0.5)


@pytest.mark.parametrize("cls", ["LogitAdjustedLoss", "LDAMLoss", "GCLLoss", "LADELoss", "BalancedSoftmaxLoss"])
def test_a_float64_class_weight_stays_float64(cls):
    """nn.CrossEntropyLoss keeps its weight's dtype: a float64 weight was rounded to a float32 buffer, which a later
    .double() could not undo (a float64 model's weighted loss 1e-9 off). Other weights (a list, 16-bit) are float32
    buffers."""
    g = torch.Generator().manual_seed(5)
    w = torch.rand(C, generator=g, dtype=F64) + 0.5
    make = getattr(fastlt, cls)
    mod = make(COUNTS, weight=w, backend="torch")
    assert mod.weight.dtype == F64 and torch.equal(mod.weight, w)
    assert mod.state_dict()["weight"].dtype == F64
    assert make(COUNTS, weight=w.float(), backend="torch").weight.dtype == torch.float32
    assert make(COUNTS, weight=[1.0, 2.0, 3.0, 4.0, 5.0], backend="torch").weight.dtype == torch.float32
    assert make(COUNTS, weight=w.half(), backend="torch").weight.dtype == torch.float32
    if cls == "LogitAdjustedLoss":  # tau = 0 is plain cross-entropy: torch's own, to float64 rounding
        x, y = _inputs(11)
        mod = make(COUNTS, tau=0.0, weight=w, backend="torch").double()
        want = nn.CrossEntropyLoss(weight=w.to(DEVICE))(x, y)
        torch.testing.assert_close(mod(x, y), want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("cls", ["LogitAdjustedLoss", "LDAMLoss", "GCLLoss", "LADELoss", "LinearLossHead",
                                 "CosineGCLHead"])
def test_class_counts_assigned_later_remake_the_class_vectors(cls):
    """``module.class_counts = ...`` after construction makes every per-class vector again from them (with the
    module's count_smoothing, in each vector's dtype and device): it was kept as the class_counts buffer while the
    prior, margins and cloud kept the old counts, a loss that silently did not change. The result equals a module
    built with the new counts; a wrong class count or a zero count raises as the constructor does."""
    new = [7, 7, 30, 2, 9]
    g = torch.Generator().manual_seed(5)
    head = cls.endswith("Head")
    make = (lambda counts, **kw: getattr(fastlt, cls)(3, C, counts, backend="torch", **kw)) if head else \
        (lambda counts, **kw: getattr(fastlt, cls)(counts, backend="torch", **kw))
    mod = make(COUNTS, count_smoothing=0.5).double()
    want = make(new, count_smoothing=0.5).double()
    want.load_state_dict(mod.state_dict())  # (a head's weights)
    mod.class_counts = torch.tensor(new)
    for name, buf in want.named_buffers():
        torch.testing.assert_close(mod.get_buffer(name), buf, rtol=0, atol=0)
        assert mod.get_buffer(name).dtype == torch.float64
    x = torch.randn(6, 3 if head else C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (6,), generator=g)
    call = (lambda m: m(x, y, seed=3)) if cls in ("GCLLoss", "CosineGCLHead") else (lambda m: m(x, y))
    torch.testing.assert_close(call(mod), call(want), rtol=0, atol=0)
    with pytest.raises(ValueError, match="describes 4 classes"):
        mod.class_counts = [1, 2, 3, 4]
    plain = make(COUNTS)  # without count_smoothing: a zero count raises, as in the constructor
    with pytest.raises(ValueError, match="zero count"):
        plain.class_counts = [1, 0, 3, 4, 5]
    # a vector the user assigned (a known prior) is left as it is; the other vectors follow the counts
    name = next(n for n, _ in want.named_buffers() if n != "class_counts")
    custom = torch.zeros(C, dtype=torch.float64)
    setattr(mod, name, custom)
    mod.class_counts = COUNTS
    assert mod.get_buffer(name) is custom
    assert mod.class_counts.tolist() == [c + 0.5 for c in COUNTS]  # read back, smoothed (a head kept none)
    if not head:  # a module pickled before the smoothing was kept for this: its count_smoothing
        del mod.__dict__["_counts_smoothing"]
        mod.class_counts = [1, 0, 3, 4, 5]
        assert mod.class_counts.tolist() == [1.5, 0.5, 3.5, 4.5, 5.5]
    if head:  # a 'ce' head made without counts has nothing to make from them
        with pytest.raises(AttributeError, match="made without class counts"):
            fastlt.LinearLossHead(3, C, None, loss="ce").class_counts = COUNTS


@pytest.mark.parametrize("cls", ["LogitAdjustedLoss", "LDAMLoss", "GCLLoss", "LADELoss"])
def test_count_smoothing_assigned_later_raises(cls):
    """count_smoothing is added to the counts when the module is built; assigning it later was accepted and changed
    nothing (every other float hyperparameter takes effect when assigned)."""
    counts = [3, 0, 2, 1, 1]
    mod = getattr(fastlt, cls)(counts, count_smoothing=1.0, backend="torch")
    assert mod.count_smoothing == 1.0 and "count_smoothing=1.0" in repr(mod)
    with pytest.raises(AttributeError, match="count_smoothing"):
        mod.count_smoothing = 2.0
    assert mod.count_smoothing == 1.0
    for copied in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        assert copied.count_smoothing == 1.0
        with pytest.raises(AttributeError, match="count_smoothing"):
            copied.count_smoothing = 0.5
