"""Per-class buffers made from the counts (fastlt._count_buffers): they follow .to(), a float64 module makes them again
from the counts in float64, a scheduled max_margin rebuilds them, and the modules pickle and copy with them."""

from __future__ import annotations

import pytest
import torch
from test_losses import F64, all_modules, close, gen, inputs

import fastlt
from fastlt import priors as P
from fastlt import reference as R


def test_ldam_max_margin_can_be_scheduled():
    """Setting max_margin rebuilds the margins (device and dtype kept); a bad value names the argument."""
    z, y, counts = inputs(seed=3)
    loss = fastlt.LDAMLoss(counts, max_margin=0.5, s=20.0, backend="torch").double()
    loss.max_margin = 0.2
    assert loss.max_margin == 0.2 and loss.margins.dtype == torch.float64
    torch.testing.assert_close(loss.margins, P.ldam_margins(counts, 0.2).double())
    torch.testing.assert_close(loss(z.double(), y), R.ldam_cross_entropy(z.double(), y, P.ldam_margins(counts, 0.2)
                                                                         .double(), 20.0))
    with pytest.raises(ValueError, match="max_margin"):
        loss.max_margin = -0.1
    assert loss.max_margin == 0.2


def _exact_buffers(counts, name: str = "") -> dict:
    """The count buffers' float64 values; ``name``'s module (a LADE head's log prior is PriorCE's log(pi + 1e-9))."""
    c = torch.as_tensor(counts, dtype=F64)
    log_prior = (P.prior(counts, dtype=F64) + 1e-9).log() if name == "lade-head" else P.log_prior(counts, dtype=F64)
    return {"class_counts": c, "log_prior": log_prior,
            "margins": P.ldam_margins(counts, 0.5, dtype=F64), "cloud": P.gcl_cloud(counts, dtype=F64),
            "prior": P.prior(counts, dtype=F64)}


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade"])
def test_buffers_follow_dtype_and_device(name):
    z, y, counts = inputs(seed=8)
    mod = all_modules(counts)[name]
    buffers = dict(mod.named_buffers())
    assert buffers, "per-class vectors must be registered buffers"
    assert all(b.dtype == torch.float32 for b in buffers.values())
    out32 = mod(z, y, seed=3) if name == "gcl" else mod(z, y)
    mod64 = mod.to(F64)
    assert mod64 is mod
    exact = _exact_buffers(counts)
    for key, b in mod.named_buffers():
        assert b.dtype == F64, key
        # count-derived buffers are computed again in float64 (not the float32 roundings widened)
        close(b, exact[key] if key in exact else buffers[key].to(F64), 0)
        close(b.float(), buffers[key], 0)
    out64 = mod(z.to(F64), y, seed=3) if name == "gcl" else mod(z.to(F64), y)
    assert out64.dtype == F64
    close(out64.float(), out32, 1e-5)
    mod.to("cpu")
    assert all(b.device.type == "cpu" for b in mod.buffers())
    own = set(mod._count_own)
    mod.half()  # the module's own class vectors stay float32 (a model cast whole); the rest as any buffer
    for key, b in mod.named_buffers():
        if key in own:
            assert b.dtype == torch.float32, key
            close(b, buffers[key], 0)
        else:
            assert b.dtype == torch.float16, key


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade", "la-head", "ldam-head", "lade-head", "gcl-head"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_casts_keep_the_class_vectors_exact(name, dtype):
    """A module cast to half precision (a model cast whole, its criterion inside) keeps its class vectors in float32,
    the values it had: bfloat16 moved the log prior by up to ~0.03 and so the loss (was: every buffer cast); a head
    cast after construction equals one made in that dtype; a cast back to float32 changes nothing."""
    counts = [3000, 700, 90, 13, 2]
    mod = _every_counted_module(counts)[name]
    before = {k: b.clone() for k, b in mod.named_buffers() if k in mod._count_own}
    assert before
    mod.to(dtype)
    after = dict(mod.named_buffers())
    for key, b in before.items():
        assert after[key].dtype == torch.float32, key
        close(after[key], b, 0)
    mod.float()
    for key, b in before.items():
        close(dict(mod.named_buffers())[key], b, 0)


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade"])
def test_float64_module_equals_the_float64_formula(name):
    """A module made float64 computes its per-class vectors from the counts in float64: its loss is the float64
    reference's with float64 priors to ~1e-15, not the ~1e-8 that widened float32 roundings would give."""
    counts = [3, 100, 7, 1000, 29]
    z = torch.randn(6, 5, generator=gen(5), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mod = all_modules(counts)[name]
    mod.double()
    ex = _exact_buffers(counts)
    w = mod.weight
    if name in ("la", "bs"):
        expected = R.logit_adjusted_cross_entropy(z, y, ex["log_prior"], mod.tau, weight=w)
    elif name == "ldam":
        expected = R.ldam_cross_entropy(z, y, ex["margins"], mod.s)
    elif name == "gcl":
        expected = R.gcl_cross_entropy(z, y, ex["cloud"], mod.m, mod.s, mod.noise_mul, seed=11)
    else:
        expected = R.lade_loss(z, y, ex["prior"], mod.alpha, mod.remine_lambda)
    got = mod(z, y, seed=11) if name == "gcl" else mod(z, y)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    if name == "ldam":  # a scheduled margin stays exact in float64 too
        mod.max_margin = 0.25
        close(mod.margins, P.ldam_margins(counts, 0.25, dtype=F64), 0)


def _every_counted_module(counts):
    C = len(counts)
    return {**all_modules(counts),
            **{f"{loss}-head": fastlt.LinearLossHead(3, C, counts, loss=loss) for loss in ("la", "ldam", "lade")},
            "gcl-head": fastlt.CosineGCLHead(3, C, counts)}


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade", "la-head", "ldam-head", "lade-head", "gcl-head"])
def test_modules_pickle_and_copy_with_their_count_buffers(name):
    """torch.save of a whole module round-trips (the count buffers' makers are module-level functions, not
    closures), and a deep copy's LDAM margin schedule rebuilds the copy's margins from the copy's max_margin."""
    import copy
    import io

    counts = [500, 100, 20, 4]
    mod = _every_counted_module(counts)[name]
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for (key, b), (key2, b2) in zip(mod.named_buffers(), loaded.named_buffers(), strict=True):
        assert key == key2
        close(b2, b, 0)
    loaded.double()
    for key, b in loaded.named_buffers():
        assert b.dtype == F64, key
    if "ldam" in name:
        twin = copy.deepcopy(mod)
        twin.max_margin = 0.1
        close(twin.margins, P.ldam_margins(counts, 0.1), 0)
        close(mod.margins, P.ldam_margins(counts, 0.5), 0)


def test_count_buffers_the_user_set_or_edited_are_only_converted():
    """A float64 conversion makes the module's own count buffers again from the counts, and only those: one the user
    assigned or edited in place is widened as any buffer; conversions that keep float64 (a device move,
    share_memory) leave every buffer alone; the class_counts buffer is no alias of the exact counts."""
    counts = [500, 100, 20, 4]
    mod = fastlt.LogitAdjustedLoss(counts)
    mod.log_prior = torch.zeros(4)
    mod.double()
    close(mod.log_prior, torch.zeros(4, dtype=F64), 0)
    mod = fastlt.LDAMLoss(counts)
    mod.margins.mul_(2.0)
    mod.double()
    close(mod.margins, (2.0 * P.ldam_margins(counts, 0.5)).double(), 0)
    mod = fastlt.LogitAdjustedLoss(counts).double()
    mod.class_counts.add_(1000.0)
    mod.cpu()
    close(mod.log_prior, P.log_prior(counts, dtype=F64), 0)
    mod = fastlt.GCLLoss(counts).double().share_memory()
    assert all(b.is_shared() for b in mod.buffers())


def test_float64_head_made_so_equals_one_converted():
    counts = [500, 100, 20, 4]
    for loss in ("la", "ldam", "lade"):
        made = fastlt.LinearLossHead(3, 4, counts, loss=loss, dtype=F64)
        converted = fastlt.LinearLossHead(3, 4, counts, loss=loss).double()
        for (name, a), (_, b) in zip(made.named_buffers(), converted.named_buffers(), strict=True):
            assert a.dtype == F64, name
            close(a, b, 0)
    assert fastlt.CosineGCLHead(3, 4, counts, dtype=F64).cloud.dtype == F64
    assert fastlt.LinearLossHead(3, 4, counts, dtype=torch.bfloat16).log_prior.dtype == torch.float32


def test_buffer_values():
    counts = [500, 100, 20, 4]
    mods = all_modules(counts)
    close(mods["la"].log_prior, P.log_prior(counts), 0)
    close(mods["ldam"].margins, P.ldam_margins(counts, 0.5), 0)
    close(mods["gcl"].cloud, P.gcl_cloud(counts), 0)
    close(mods["lade"].prior, P.prior(counts), 0)
    assert all(m.num_classes == 4 for m in mods.values())


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", ["la", "ldam", "gcl", "lade", "la-head", "ldam-head", "lade-head", "gcl-head"])
def test_a_copy_keeps_its_count_buffers_its_own(name, copy_with):
    """A copy's count buffers are still its own (a copied tensor's version counter starts again, and they were
    taken for user-edited ones): a copy cast to bfloat16 keeps them float32, and one made float64 makes them again
    from the counts (the float32 values only widened were 3e-7 off)."""
    import copy
    import io
    import pickle

    counts = [100000, 3000, 20, 1]
    mod = _every_counted_module(counts)[name]
    if copy_with == "deepcopy":
        twin = copy.deepcopy(mod)
    elif copy_with == "pickle":
        twin = pickle.loads(pickle.dumps(mod))
    else:
        buf = io.BytesIO()
        torch.save(mod, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    exact = _exact_buffers(counts, name)
    half, wide = copy.deepcopy(twin).to(torch.bfloat16), copy.deepcopy(twin).double()
    for key, b in half.named_buffers():
        if key in exact:
            assert b.dtype == torch.float32, key
            close(b, exact[key].float(), 0)
    for key, b in wide.named_buffers():
        if key in exact:
            close(b, exact[key], 0)


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade", "la-head", "ldam-head", "lade-head", "gcl-head"])
def test_made_on_the_meta_device_then_to_empty(name):
    """The FSDP2 / init_empty_weights pattern: a module made under ``torch.device('meta')`` (counts given as a list),
    then ``to_empty()`` and the state dict loaded, computes what one made directly does (the count buffers, not in
    the state dict, were uninitialised memory: a loss of 3.9e22)."""
    counts = [500, 100, 20, 4]
    mod = _every_counted_module(counts)[name]
    with torch.device("meta"):
        meta = _every_counted_module(counts)[name]
    assert all(b.is_meta for b in meta.buffers())
    meta.to_empty(device="cpu")
    meta.load_state_dict(mod.state_dict())
    exact = _exact_buffers(counts, name)
    for key, b in meta.named_buffers():
        if key in exact:
            close(b, exact[key].to(b.dtype), 0)
    g = gen(5)
    x = torch.randn(6, 3 if "head" in name else 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    torch.manual_seed(1)
    want = mod(x, y)
    torch.manual_seed(1)
    close(meta(x, y), want, 0)


def test_meta_counts_are_refused_by_name():
    with pytest.raises(ValueError, match="class_counts is a meta tensor"):
        fastlt.LogitAdjustedLoss(torch.ones(3, device="meta"))
    with pytest.raises(TypeError, match="class_counts must be a sequence of integers within int64"):
        fastlt.LogitAdjustedLoss([2**70, 1, 1])
