"""A loss module's repeated call (:class:`fastlt.losses._LastCall`): a call like the last direct one (logits and
targets of the same shapes, dtypes, devices and layout; the module and its buffers unchanged) runs the kernels with
that call's checked arguments and launch plans, and skips the checks. Whatever a call can change that the checks read
is checked again every call: each case below makes a module's call the kept one, changes one thing, and compares the
next call's outcome (its loss and gradient, or its error) with that of a copy of the module (which keeps nothing, so
it runs the full path). The kernels run in the interpreter without a GPU."""

import copy
import itertools

import pytest
import torch
from conftest import DEVICE

import fastlt
import fastlt._operator as O
from fastlt.kernels import launch

C, N = 11, 6


def _data(seed=0, n=N, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=gen).to(DEVICE, dtype)
    y = torch.randint(0, C, (n,), generator=gen).to(DEVICE)
    return z, y


def _counts():
    return torch.arange(1, C + 1) * 3


MODULES = {
    "la": lambda **kw: fastlt.LogitAdjustedLoss(_counts(), tau=0.7, backend="triton", **kw),
    "la_rows": lambda **kw: fastlt.LogitAdjustedLoss(_counts(), tau=0.7, reduction="none", backend="triton", **kw),
    "ldam": lambda **kw: fastlt.LDAMLoss(_counts(), s=8.0, backend="triton", **kw),
    "gcl": lambda **kw: fastlt.GCLLoss(_counts(), m=0.1, s=8.0, noise_mul=0.5, gamma=1.0, backend="triton", **kw),
    "lade": lambda **kw: fastlt.LADELoss(_counts(), backend="triton", **kw),
}


def _layer(z):
    """``z`` as a layer's output (not a leaf), whose gradient is read from the leaf behind it."""
    leaf = z.clone().requires_grad_()
    return leaf, leaf * 1.0


def _outcome(crit, z, y, seed=5):
    """``("ok", loss, grad)`` of one call (the noise seed drawn after ``torch.manual_seed(seed)``), or ``("raised",
    type, message)``."""
    torch.manual_seed(seed)
    leaf, logits = _layer(z) if z.is_floating_point() else (None, z)
    try:
        loss = crit(logits, y)
        loss.sum().backward()  # ('none': the rows')
    except (TypeError, ValueError, RuntimeError) as exc:
        return "raised", type(exc), str(exc)
    return "ok", loss.detach().double().cpu(), leaf.grad.double().cpu()


def _assert_same(got, want):
    assert got[0] == want[0], (got, want)
    if got[0] == "raised":
        assert got[1:] == want[1:]
    else:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def _kept(crit, z, y):
    """Two calls: the first is kept for the next, the second is one such (its plans made)."""
    for seed in (1, 2):
        assert _outcome(crit, z, y, seed)[0] == "ok"
    assert crit.__dict__.get("_last_call") is not None


@pytest.mark.parametrize("name", MODULES)
def test_repeated_calls_skip_the_checks_and_the_plans_lookup(name, monkeypatch):
    """After the first call, no call checks the operator's arguments again, and after the second none looks a launch
    plan up; every call's loss and gradient are those of the full path (a fresh copy of the module)."""
    calls = {"check_rows": 0, "plans": 0}
    check_rows, forward_plan, grad_plan = O.check_rows, launch._forward_plan, launch._grad_plan

    def counted(key, fn):
        def run(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(O, "check_rows", counted("check_rows", check_rows))
    monkeypatch.setattr(launch, "_forward_plan", counted("plans", forward_plan))
    monkeypatch.setattr(launch, "_grad_plan", counted("plans", grad_plan))
    crit = MODULES[name]()
    z, y = _data()
    seen = []
    for step in range(4):
        fresh = copy.deepcopy(crit)  # (keeps nothing: the full path)
        want = _outcome(fresh, z, y, seed=step)
        before = dict(calls)
        _assert_same(_outcome(crit, z, y, seed=step), want)
        seen.append({key: calls[key] - before[key] for key in calls})
    assert seen[0]["check_rows"] >= 1 and seen[0]["plans"] >= 1  # the full path
    assert all(s["check_rows"] == 0 for s in seen[1:])
    assert seen[1]["plans"] == 2 and seen[2]["plans"] == seen[3]["plans"] == 0  # (the forward's and the gradient's)


def _out_of_range(crit, z, y):
    y = y.clone()
    y[0] = C
    return z, y


def _another_batch(crit, z, y):
    return _data(seed=3, n=N + 3)


def _int16_targets(crit, z, y):
    return z, y.to(torch.int16)


def _int32_targets(crit, z, y):
    return z, y.to(torch.int32)


def _strided_targets(crit, z, y):
    return z, torch.stack([y, y.flip(0)], 1)[:, 1]


def _transposed_logits(crit, z, y):
    return z.t().contiguous().t(), y


def _float64_logits(crit, z, y):
    return z.double(), y


def _bf16_logits(crit, z, y):
    return z.to(torch.bfloat16), y


def _another_class_count(crit, z, y):
    return torch.randn(N, C + 1, device=DEVICE), y


def _float_targets(crit, z, y):
    return z, torch.softmax(torch.randn(N, C, device=DEVICE), 1)


_VECTORS = {"LogitAdjustedLoss": "log_prior", "LDAMLoss": "margins", "GCLLoss": "cloud", "LADELoss": "prior"}


def _buffer_edited(crit, z, y):
    buf = getattr(crit, _VECTORS[type(crit).__name__])
    buf.mul_(0.5)
    return z, y


def _buffer_requires_grad(crit, z, y):
    for buf in crit.buffers():
        if buf.is_floating_point():
            buf.requires_grad_()
    return z, y


def _hyperparameter_assigned(crit, z, y):
    name = {"LogitAdjustedLoss": "tau", "LDAMLoss": "s", "GCLLoss": "s", "LADELoss": "alpha"}
    setattr(crit, name[type(crit).__name__], 0.3)
    return z, y


def _weight_assigned(crit, z, y):
    crit.weight = torch.linspace(0.5, 2.0, C, device=DEVICE)
    return z, y


def _moved_to_float64(crit, z, y):
    crit.double()  # the buffers swapped without __setattr__ (nn.Module._apply)
    return z, y


CHANGES = [_out_of_range, _another_batch, _int16_targets, _int32_targets, _strided_targets, _transposed_logits,
           _float64_logits, _bf16_logits, _another_class_count, _float_targets, _buffer_edited, _buffer_requires_grad,
           _hyperparameter_assigned, _weight_assigned, _moved_to_float64]


@pytest.mark.parametrize(("name", "change"), [(name, change) for name in MODULES for change in CHANGES
                                               if not (name == "lade" and change is _float_targets)],  # (LADE: indices)
                         ids=lambda v: v if isinstance(v, str) else v.__name__.strip("_"))
def test_a_changed_call_has_the_full_paths_outcome(name, change):
    crit = MODULES[name]()
    z, y = _data()
    _kept(crit, z, y)
    z2, y2 = change(crit, z, y)
    want = _outcome(copy.deepcopy(crit), z2, y2)
    _assert_same(_outcome(crit, z2, y2), want)
    if change in (_out_of_range, _float64_logits, _another_class_count, _buffer_requires_grad):
        assert want[0] == "raised"  # (the copy's error: the check it is about ran)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
@pytest.mark.parametrize("name", MODULES)
def test_torch_func_and_jit_trace_are_refused_on_a_repeated_call(name):
    """The direct call does not take torch.func transforms or jit tracing (backend='triton' refuses them, clearly);
    a repeated call must not slip past that."""
    crit = MODULES[name]()
    z, y = _data()
    _kept(crit, z, y)
    with pytest.raises(RuntimeError, match="torch.func|forward-mode"):
        torch.func.grad(lambda t: crit(t, y))(z)
    with pytest.raises(RuntimeError, match="jit.trace"):
        torch.jit.trace(lambda t: crit(t, y), (z,), check_trace=False)


@pytest.mark.parametrize("name", ["la", "la_rows", "ldam", "gcl"])
def test_grad_in_forward_is_checked_on_every_call(name):
    """grad_in_forward's conditions depend on the logits tensor itself: a leaf is refused on a repeated call too, and
    without grad mode the logits keep their values."""
    crit = MODULES[name](grad_in_forward=True)
    z, y = _data()
    _kept(crit, z, y)
    leaf = z.clone().requires_grad_()
    with pytest.raises(ValueError, match="leaf"):
        crit(leaf, y)
    held = z.clone()
    torch.manual_seed(7)
    with torch.no_grad():
        loss = crit(held, y)
    assert torch.equal(held, z)
    torch.manual_seed(7)
    want = copy.deepcopy(crit)(z.clone(), y).detach()
    torch.testing.assert_close(loss.double().cpu(), want.double().cpu(), rtol=0, atol=0)


def test_step_plans_are_void_after_the_tile_settings_change(monkeypatch):
    """A module's kept plans were made under the tile settings of their first launch: a change of them (tests and
    tuning change tiles.GENERATION or launch.STORE_PROBS) makes the next launch plan again."""
    from fastlt.kernels import tiles

    plans = launch.StepPlans()
    forward = plans.forward_slot(False, False, False)
    flags = itertools.product([False, True], repeat=3)
    assert len({plans.forward_slot(*f) for f in flags} | {plans.GRAD, plans.GRAD_COLUMN_TERM}) == plans.SIZE
    plans.put(forward, "plan")
    assert plans.get(forward) == "plan" and plans.get(plans.GRAD) is None
    monkeypatch.setattr(launch, "STORE_PROBS", "always")
    assert plans.get(forward) is None
    monkeypatch.undo()
    assert plans.get(forward) == "plan"
    monkeypatch.setattr(tiles, "GENERATION", tiles.GENERATION + 1)
    assert plans.get(forward) is None
    plans.put(plans.GRAD, "grad plan")  # (the others, made under the old settings, are dropped)
    assert plans.get(plans.GRAD) == "grad plan" and plans.get(forward) is None


@pytest.mark.parametrize("offload_first", [False, True])
@pytest.mark.parametrize("name", MODULES)
def test_saved_logits_in_another_layout_get_their_own_gradient_plan(name, offload_first):
    """The backward launches on the saved logits, which saved-tensor hooks may hand back in a layout of their own
    (``save_on_cpu`` packs a contiguous copy when it copies): a repeated call's kept gradient plan, made for the other
    layout, read other elements (found in review: inf, or wrong values, where the copy's full path was right)."""
    crit = MODULES[name]()
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(N, C + 5, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)

    def step(c, offload):
        torch.manual_seed(3)
        leaf = wide.clone().requires_grad_()
        pack = (lambda t: t.clone(memory_format=torch.contiguous_format)) if offload else (lambda t: t)
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)  # (an offload's packed copy)
        with hooks:
            loss = c((leaf * 1.0)[:, :C], y)  # rows C + 5 apart
        loss.sum().backward()
        return leaf.grad

    step(crit, offload_first)
    step(crit, offload_first)
    fresh = copy.deepcopy(crit)
    torch.testing.assert_close(step(crit, not offload_first), step(fresh, not offload_first), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODULES)
def test_a_class_tensor_made_a_parameter_is_read_on_every_call(name):
    """A class tensor replaced by an ``nn.Parameter`` (a learned adjustment, here frozen) changes without a buffer's
    version or an assignment (an optimizer step): the module holds no fields for it, so no call is repeated from
    a kept one, and an in-place edit between calls is seen."""
    crit = MODULES[name]()
    vector = _VECTORS[type(crit).__name__]
    setattr(crit, vector, torch.nn.Parameter(getattr(crit, vector).detach().clone(), requires_grad=False))
    z, y = _data()
    _kept(crit, z, y)
    with torch.no_grad():
        getattr(crit, vector).mul_(0.5)
    _assert_same(_outcome(crit, z, y), _outcome(copy.deepcopy(crit), z, y))
