"""The kernels' arguments reused between calls with the same fields (:class:`fastlt._operator.ArgsCache`): reused
only while every tensor is the same object, unchanged, and every scalar equal; the loss always that of the values
passed (the kernels in the interpreter without a GPU)."""

import pytest
import torch
from conftest import DEVICE

import fastlt
from fastlt import _glue
from fastlt import functional as LF
from fastlt import reference as R

F64 = torch.float64


def _data(C=11, N=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    lp = torch.log_softmax(torch.randn(C, generator=gen), 0).to(DEVICE)
    return z, y, lp


def _want(z, y, **kw):
    return R.adjusted_cross_entropy(z.cpu().double(), y.cpu(), **{k: (v.cpu().double() if isinstance(v, torch.Tensor)
                                                                       else v) for k, v in kw.items()})


def test_reused_while_the_fields_are_the_same_and_rebuilt_when_they_change():
    z, y, lp = _data()
    LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.5, backend="triton")
    first = _glue._LAST_ARGS._args
    loss = LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.5, backend="triton")
    assert _glue._LAST_ARGS._args is first  # the same tensors, unchanged: reused
    torch.testing.assert_close(loss.cpu().double(), _want(z, y, log_prior=lp, tau=0.5), rtol=1e-5, atol=1e-5)
    lp.mul_(3.0)  # in place: a new version
    loss = LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.5, backend="triton")
    assert _glue._LAST_ARGS._args is not first
    torch.testing.assert_close(loss.cpu().double(), _want(z, y, log_prior=lp, tau=0.5), rtol=1e-5, atol=1e-5)
    second = _glue._LAST_ARGS._args
    loss = LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.25, backend="triton")  # another scalar
    assert _glue._LAST_ARGS._args is not second
    torch.testing.assert_close(loss.cpu().double(), _want(z, y, log_prior=lp, tau=0.25), rtol=1e-5, atol=1e-5)
    third = _glue._LAST_ARGS._args
    other = lp.clone()  # equal values, another tensor
    LF.adjusted_cross_entropy(z, y, log_prior=other, tau=0.25, backend="triton")
    assert _glue._LAST_ARGS._args is not third
    z_wide, y_wide, lp_wide = _data(C=13)  # another class count
    loss = LF.adjusted_cross_entropy(z_wide, y_wide, log_prior=lp_wide, tau=0.25, backend="triton")
    torch.testing.assert_close(loss.cpu().double(), _want(z_wide, y_wide, log_prior=lp_wide, tau=0.25), rtol=1e-5,
                               atol=1e-5)


def test_a_module_and_a_temporary_vector_each_step():
    """A module's buffers make every later step a hit; a vector rebuilt each step (its id may be reused once freed)
    is never mistaken for the last one, since the cache keeps the last one alive."""
    z, y, _ = _data()
    counts = torch.arange(1, 12)
    crit = fastlt.LogitAdjustedLoss(counts, tau=0.7, backend="triton").to(DEVICE)
    want = R.logit_adjusted_cross_entropy(z.cpu().double(), y.cpu(), torch.log(fastlt.priors.prior(counts)).double(),
                                          0.7)
    for _ in range(3):
        torch.testing.assert_close(crit(z, y).cpu().double(), want, rtol=1e-5, atol=1e-5)
    for k in range(4):
        lp = torch.full((11,), -float(k), device=DEVICE)  # a new tensor every step, other values
        got = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
        torch.testing.assert_close(got.cpu().double(), R.logit_adjusted_cross_entropy(
            z.cpu().double(), y.cpu(), lp.cpu().double()), rtol=1e-5, atol=1e-5)


def test_inference_tensors_are_not_cached():
    z, y, _ = _data()
    before = _glue._LAST_ARGS._entry
    with torch.inference_mode():
        lp = torch.zeros(11, device=DEVICE)
        a = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
        b = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
    torch.testing.assert_close(a, b)
    assert _glue._LAST_ARGS._entry is before  # nothing stored (no version counter to key on)


def test_gcl_spread_of_a_module_made_under_inference_mode():
    """A GCLLoss and a CosineGCLHead made under inference_mode (their buffers inference tensors) with noise_mul 0.5:
    the folded spread read the cloud's version counter ('Inference tensors do not track version counter'); now
    folded per call, the reference's loss."""
    import fastlt

    z, y, _ = _data()
    counts = torch.arange(1, 12) * 10
    with torch.inference_mode():
        crit = fastlt.GCLLoss(counts, s=8.0, noise_mul=0.5, backend="triton").to(DEVICE)
        head = fastlt.CosineGCLHead(5, 11, counts, s=8.0, noise_mul=0.5, backend="triton").to(DEVICE)
        f = torch.randn(z.shape[0], 5, device=DEVICE)
        got = crit(torch.tanh(z), y, seed=2)
        got_head = head(f, y, seed=2)
        head(f, y)  # the module's own path (a drawn seed)
    want = R.gcl_cross_entropy(torch.tanh(z).cpu().double(), y.cpu(), crit.cloud.cpu().double(), crit.m, 8.0, 0.5,
                               seed=2)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got_head)


def _plans(args):
    return args.memo.get("plans", {})


def test_launch_plans_follow_the_batch_shape_and_stay_bounded():
    """A module's launch plans (kernels/launch.py: tiles, grid, constant kernel arguments) are kept per shape,
    stride and dtype: a last batch of another length, a transposed view, another dtype each get their own and the
    loss and gradient of their values; past 16 shapes the plans start over (variable-length batches)."""
    from fastlt.kernels import launch

    counts = torch.arange(1, 12)
    crit = fastlt.LogitAdjustedLoss(counts, tau=0.7, backend="triton").to(DEVICE)
    lp = torch.log(fastlt.priors.prior(counts)).double()
    cases = [(5, torch.float32, False), (3, torch.float32, False), (5, torch.float32, True), (5, torch.bfloat16, False),
             (5, torch.float32, False)]
    for N, dtype, transposed in cases:
        z, y, _ = _data(N=N, seed=N)
        z = (z.t().contiguous().t() if transposed else z).to(dtype).requires_grad_()
        loss = crit(z, y)
        loss.backward()
        zd = z.detach().cpu().double().requires_grad_()
        want = R.logit_adjusted_cross_entropy(zd, y.cpu(), lp, 0.7)
        want.backward()
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(z.grad.cpu().double(), zd.grad, rtol=tol, atol=tol)
    args = crit._cache()._args
    kinds = sorted(key[0] for key in _plans(args))
    assert kinds == ["forward"] * 4 + ["grad"] * 4  # the last case reused the first one's plans
    z, y, _ = _data(N=2)
    for N in range(2, 2 + launch._MAX_PLANS):
        crit(torch.randn(N, 11, device=DEVICE), torch.randint(0, 11, (N,), device=DEVICE))
    assert 0 < len(_plans(crit._cache()._args)) <= launch._MAX_PLANS


def test_drawn_seeds_are_drawn_on_every_call_beside_the_cached_arguments(monkeypatch):
    """GCL draws a seed each step, as the reference draws it (the same losses after the same torch.manual_seed):
    a step after the first reuses the cached arguments (their plans and argument groups) and passes its drawn seed
    to the launches in place of theirs, forward and backward alike."""
    from fastlt.kernels import launch

    seen = []  # the seed each row-kernel launch was given

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(**kwargs):
                seen.append(kwargs["seed"])
                return self.kernel[grid](**kwargs)
            return run

    monkeypatch.setattr(launch, "row_loss_forward", Spy(launch.row_loss_forward))
    monkeypatch.setattr(launch, "row_loss_grad", Spy(launch.row_loss_grad))
    z, y, _ = _data()
    counts = torch.arange(1, 12)
    crit = fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=1.0, backend="triton").to(DEVICE)
    ref = fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=1.0, backend="torch")
    zs = [z.clone().requires_grad_() for _ in range(3)]
    torch.manual_seed(3)
    got = []
    for zk in zs:
        got.append(crit(zk, y))
        got[-1].backward()
    cached = crit._cache()._args
    torch.manual_seed(3)
    zr = [z.cpu().clone().requires_grad_() for _ in range(3)]
    want = []
    for zk in zr:
        want.append(ref(zk, y.cpu()))
        want[-1].backward()
    assert len({float(g.detach()) for g in got}) == 3  # fresh noise each call
    for g, w, zk, zw in zip(got, want, zs, zr, strict=True):
        torch.testing.assert_close(g.detach().cpu(), w.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zk.grad.cpu(), zw.grad, rtol=1e-5, atol=1e-5)
    # the first call drew its seed into the arguments it cached; the next two drew one each, for both launches
    assert seen[:2] == [cached.seed] * 2 and len(seen) == 6 and seen[2] == seen[3] and seen[4] == seen[5]
    assert len({cached.seed, seen[2], seen[4]}) == 3
    assert crit._cache()._args is cached and _plans(cached)


def _module_cases(counts):
    """(name, module on the kernels, its twin on the reference, a change to make to both) per loss module: each
    change is one a user makes between steps (a hyperparameter assigned, a buffer edited in place)."""
    def assign(name, value):
        return lambda m: setattr(m, name, value)

    return [
        ("la tau", fastlt.LogitAdjustedLoss, dict(tau=0.7), assign("tau", 0.3)),
        ("la smoothing", fastlt.LogitAdjustedLoss, dict(tau=0.7), assign("label_smoothing", 0.2)),
        ("la ignore_index", fastlt.LogitAdjustedLoss, dict(tau=0.7), assign("ignore_index", 3)),
        ("la reduction", fastlt.LogitAdjustedLoss, dict(tau=0.7), assign("reduction", "sum")),
        ("la prior in place", fastlt.LogitAdjustedLoss, dict(tau=0.7), lambda m: m.log_prior.mul_(2.0)),
        ("la weight assigned", fastlt.LogitAdjustedLoss, dict(tau=0.7),
         assign("weight", torch.linspace(0.5, 2.0, len(counts)))),
        ("ldam s", fastlt.LDAMLoss, dict(max_margin=0.4, s=8.0), assign("s", 4.0)),
        ("ldam max_margin", fastlt.LDAMLoss, dict(max_margin=0.4, s=8.0), assign("max_margin", 0.8)),
        ("gcl m", fastlt.GCLLoss, dict(m=0.1, s=8.0, noise_mul=0.5), assign("m", 0.3)),
        ("gcl noise_mul", fastlt.GCLLoss, dict(m=0.1, s=8.0, noise_mul=0.5), assign("noise_mul", 0.25)),
        ("gcl cloud in place", fastlt.GCLLoss, dict(m=0.1, s=8.0, noise_mul=0.5), lambda m: m.cloud.mul_(0.5)),
        ("lade alpha", fastlt.LADELoss, dict(alpha=0.1), assign("alpha", 0.5)),
        ("lade remine_lambda", fastlt.LADELoss, dict(alpha=0.1), assign("remine_lambda", 0.7)),
        ("lade prior in place", fastlt.LADELoss, dict(alpha=0.1),
         lambda m: m.prior.copy_(torch.full_like(m.prior, 1.0 / m.prior.numel()))),
    ]


def _module_step(crit, z, y, seed):
    torch.manual_seed(seed)
    zk = z.clone().requires_grad_()
    loss = crit(zk, y)
    loss.backward()
    return loss.detach().cpu().double(), zk.grad.cpu().double()


@pytest.mark.parametrize("case", range(14))
def test_a_module_step_after_a_change_is_the_loss_of_the_new_values(case):
    """A module's steps reuse their fields (``_LongTailLoss._held_fields``: the same dict each step, which the
    arguments cache knows by identity) until the module changes: each change a user makes between steps (assigning
    a hyperparameter or a buffer, editing a buffer in place, a max_margin schedule) reaches the next step's loss
    and gradient, which equal the reference module's after the same change."""
    counts = torch.tensor([50, 20, 9, 6, 4, 3, 2, 1, 1, 1, 1])
    name, cls, kw, change = _module_cases(counts)[case]
    z, y, _ = _data(N=6)
    y[1] = 3  # a row for ignore_index=3
    crit = cls(counts, backend="triton", **kw).to(DEVICE)
    ref = cls(counts, backend="torch", **kw).double()
    for step in range(2):  # the second step is a hit
        got, want = _module_step(crit, z, y, step), _module_step(ref, z.cpu().double(), y.cpu(), step)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    held = crit.__dict__["_held"]
    assert held is not None and crit._cache()._fields is held[1]
    change(crit)
    change(ref)
    for step in range(2, 4):
        got, want = _module_step(crit, z, y, step), _module_step(ref, z.cpu().double(), y.cpu(), step)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert crit.__dict__["_held"][1] is not held[1]


def test_held_fields_follow_moves_casts_and_copies():
    """A cast (``.half()``, nn.Module's ``_apply``: buffers swapped without ``__setattr__``), a deepcopy and a pickled
    copy each make their own fields, of their own buffers."""
    import copy
    import pickle

    counts = torch.tensor([50, 20, 9, 6, 4, 3, 2, 1, 1, 1, 1])
    z, y, _ = _data(N=6)
    crit = fastlt.LogitAdjustedLoss(counts, tau=0.7, backend="triton").to(DEVICE)
    want = R.logit_adjusted_cross_entropy(z.cpu().double(), y.cpu(), torch.log(fastlt.priors.prior(counts)).double(),
                                          0.7)
    torch.testing.assert_close(crit(z, y).cpu().double(), want, rtol=1e-5, atol=1e-5)
    crit.half()  # the module's own class vectors stay float32 (made again: a new tensor)
    assert crit.log_prior.dtype == torch.float32
    torch.testing.assert_close(crit(z, y).cpu().double(), want, rtol=1e-5, atol=1e-5)
    assert crit.__dict__["_held"][1]["log_prior"] is crit.log_prior
    crit.float()
    crit.log_prior = crit.log_prior.clone()  # the user's: a cast converts it as any buffer, without __setattr__
    crit(z, y)
    held = crit.__dict__["_held"][1]
    crit.half()
    assert crit.log_prior.dtype == torch.float16
    torch.testing.assert_close(crit(z, y).cpu().double(), want, rtol=2e-3, atol=2e-3)
    assert crit.__dict__["_held"][1] is not held
    assert crit.__dict__["_held"][1]["log_prior"] is crit.log_prior
    crit.float()  # the fp16-rounded prior, widened
    want = R.logit_adjusted_cross_entropy(z.cpu().double(), y.cpu(), crit.log_prior.cpu().double(), 0.7)
    torch.testing.assert_close(crit(z, y).cpu().double(), want, rtol=1e-5, atol=1e-5)
    for other in (copy.deepcopy(crit), pickle.loads(pickle.dumps(crit))):
        other.log_prior.mul_(0.5)  # its own buffer, in place: the original keeps its loss
        half = R.logit_adjusted_cross_entropy(z.cpu().double(), y.cpu(), other.log_prior.cpu().double(), 0.7)
        torch.testing.assert_close(other(z, y).cpu().double(), half, rtol=1e-5, atol=1e-5)
        assert other.__dict__["_held"][1]["log_prior"] is other.log_prior
        torch.testing.assert_close(crit(z, y).cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_two_modules_in_one_step_keep_their_own_arguments():
    """Two loss modules in one step (two heads; a loss summed with another) each keep their kernels' arguments
    (``_LongTailLoss._cache``): one shared entry made each evict the other every step (a full check and rebuild:
    ~250 us of host time instead of ~150 for the pair). Each step's losses are still each module's own."""
    counts = torch.tensor([50, 20, 9, 6, 4, 3, 2, 1, 1, 1, 1])
    z, y, _ = _data(N=6)
    la = fastlt.LogitAdjustedLoss(counts, tau=0.7, backend="triton").to(DEVICE)
    gcl = fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, backend="triton").to(DEVICE)
    lade = fastlt.LADELoss(counts, backend="triton").to(DEVICE)
    refs = [fastlt.LogitAdjustedLoss(counts, tau=0.7, backend="torch"),
            fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, backend="torch"),
            fastlt.LADELoss(counts, backend="torch")]
    firsts = None
    for step in range(3):
        torch.manual_seed(step)
        got = [m(z, y) for m in (la, gcl, lade)]
        torch.manual_seed(step)
        want = [m(z.cpu().double(), y.cpu()) for m in refs]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu().double(), w, rtol=1e-5, atol=1e-5)
        args = [m._cache()._args for m in (la, gcl, lade)]
        firsts = firsts or args
        assert all(a is f for a, f in zip(args, firsts, strict=True))  # made once each, kept across the steps


def test_a_head_reuses_its_arguments_and_its_chunks_launch_plans():
    """A fused head's steps reuse the operator's arguments of the last call (its own cache, ``HeldFields._cache``)
    and, per row chunk, the offset arguments with their launch plans (``heads.passes.rows_from``): no plan is made
    after the first step. A change of a hyperparameter reaches the next step; a drawn GCL seed is never cached."""
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([50, 20, 9, 6, 4, 3, 2, 1, 1, 1, 1])
    head = fastlt.LinearLossHead(4, 11, counts, loss="la", tau=0.7, chunk_rows=2, backend="triton").to(DEVICE)
    f = torch.randn(5, 4, generator=gen).to(DEVICE)
    y = torch.randint(0, 11, (5,), generator=gen).to(DEVICE)

    def want():
        z = torch.nn.functional.linear(f.cpu().double(), head.weight.detach().cpu().double(),
                                       head.bias.detach().cpu().double())
        return R.logit_adjusted_cross_entropy(z, y.cpu(), torch.log(fastlt.priors.prior(counts)).double(), head.tau)

    made = []
    for _ in range(3):
        loss = head(f.clone().requires_grad_(), y)
        loss.backward()
        torch.testing.assert_close(loss.cpu().double(), want(), rtol=1e-5, atol=1e-5)
        args = head._cache()._args
        chunks = [args] + [args.memo[("rows from", r0)] for r0 in (2, 4)]  # rows 0-1, 2-3, 4
        made.append([id(a) for a in chunks] + [id(p) for a in chunks for p in _plans(a).values()])
    assert made[0] == made[1] == made[2]  # the same arguments and plans each step
    head.tau = 0.2
    torch.testing.assert_close(head(f, y).cpu().double(), want(), rtol=1e-5, atol=1e-5)



def test_a_cosine_gcl_head_keeps_its_arguments_and_draws_a_seed_each_step():
    """GCL's head without ``seed=`` keeps its arguments too, and passes a seed drawn each step beside them
    (``HeadParams.seed``, to every launch of the row and class chunks, forward and backward): each step's loss and
    gradients equal the reference's after the same ``torch.manual_seed``, and differ from step to step."""
    gen = torch.Generator().manual_seed(6)
    counts = torch.tensor([50, 20, 9, 6, 4, 3, 2, 1, 1, 1, 1])
    f = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 11, (5,), generator=gen)
    for chunks in (dict(chunk_rows=2), dict(chunk_classes=8)):
        head = fastlt.CosineGCLHead(4, 11, counts, s=8.0, backend="triton", **chunks).to(DEVICE)
        ref = fastlt.CosineGCLHead(4, 11, counts, s=8.0, backend="torch").double()
        ref.load_state_dict(head.state_dict())
        kept, losses = None, []
        for step in range(3):
            fk, fr = f.float().to(DEVICE).requires_grad_(), f.clone().requires_grad_()
            torch.manual_seed(step)
            loss = head(fk, y.to(DEVICE))
            loss.backward()
            torch.manual_seed(step)
            want = ref(fr, y)
            want.backward()
            torch.testing.assert_close(loss.cpu().double(), want.detach(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fk.grad.cpu().double(), fr.grad, rtol=1e-3, atol=1e-4)
            kept = kept or head._cache()._args
            assert head._cache()._args is kept
            losses.append(float(loss.detach()))
        assert len(set(losses)) == 3


def test_two_heads_and_a_lade_head_in_one_step_keep_their_own_arguments():
    """Two fused heads in one step (and a LADE head beside them) each keep their arguments across steps, in their
    own cache (the functions' shared one made them evict each other every step), and each step's losses are each
    head's own; a hyperparameter assigned to one reaches its next step only."""
    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor([50, 20, 9, 6, 4, 3, 2, 1, 1, 1, 1])
    f = torch.randn(5, 4, generator=gen).to(DEVICE)
    y = torch.randint(0, 11, (5,), generator=gen).to(DEVICE)
    heads = [fastlt.LinearLossHead(4, 11, counts, loss="la", tau=0.7, backend="triton").to(DEVICE),
             fastlt.LinearLossHead(4, 11, counts, loss="ldam", max_margin=0.4, s=8.0, backend="triton").to(DEVICE),
             fastlt.LinearLossHead(4, 11, counts, loss="lade", alpha=0.3, backend="triton").to(DEVICE),
             fastlt.CosineGCLHead(4, 11, counts, s=8.0, noise_mul=0.5, backend="triton").to(DEVICE)]

    def want(head, step):
        ref = type(head)(4, 11, counts, **_head_kwargs(head), backend="torch").double()
        ref.load_state_dict(head.state_dict())
        torch.manual_seed(step)
        return ref(f.cpu().double(), y.cpu())

    firsts = None
    for step in range(3):
        if step == 2:
            heads[0].tau = 0.2
            heads[2].alpha = 0.6
        got = []
        for head in heads:
            torch.manual_seed(step)
            got.append(head(f, y))
        for head, g in zip(heads, got, strict=True):
            torch.testing.assert_close(g.detach().cpu().double(), want(head, step), rtol=1e-4, atol=1e-4)
        args = [h._cache()._args for h in heads]
        if step < 2:
            firsts = firsts or args
            assert all(a is b for a, b in zip(args, firsts, strict=True))  # made once each, kept across the steps
        else:  # made again for the heads that changed only
            assert [a is b for a, b in zip(args, firsts, strict=True)] == [False, True, False, True]


def _head_kwargs(head) -> dict:
    if isinstance(head, fastlt.CosineGCLHead):
        return dict(m=head.m, s=head.s, noise_mul=head.noise_mul, gamma=head.gamma)
    return dict(loss=head.loss, tau=head.tau, max_margin=head.max_margin, s=head.s, alpha=head.alpha)


def test_data_parallel_replicas_hold_nothing_of_the_module():
    """``nn.DataParallel`` replicates a module by copying its ``__dict__`` and runs the replicas in threads: each
    replica (a loss module, a head) starts with no held fields and its own arguments cache, not the module's."""
    counts = torch.tensor([50, 20, 9, 6, 4, 3, 2, 1, 1, 1, 1])
    z, y, _ = _data(N=6)
    f = torch.randn(6, 4).to(DEVICE)
    for module, inputs in ((fastlt.LogitAdjustedLoss(counts, backend="triton").to(DEVICE), (z, y)),
                           (fastlt.LinearLossHead(4, 11, counts, backend="triton").to(DEVICE), (f, y))):
        want = module(*inputs)
        replica = module._replicate_for_data_parallel()  # (DataParallel then gives it its device's parameters)
        assert replica.__dict__.get("_held") is None and replica.__dict__.get("_args_cache") is None
        assert module.__dict__["_held"] is not None and module.__dict__["_args_cache"] is not None
        for name, p in module.named_parameters():
            setattr(replica, name, p)
        torch.testing.assert_close(replica(*inputs), want)
        assert replica._cache() is not module._cache()


def test_functional_calls_in_turn_keep_their_arguments_up_to_the_shared_size():
    """Two functional losses called in turn every step (a main and an auxiliary loss) each keep their arguments in
    the functions' shared cache (it keeps the last ``SHARED_CACHE_SIZE`` calls'; one entry made them evict each
    other every step: ~260 us of host time for the pair instead of ~155); a call beyond that many others is made
    again. Each call's loss stays its own."""
    z, y, lp = _data()
    m = torch.linspace(0.1, 0.5, 11, device=DEVICE)

    def la():
        return LF.logit_adjusted_cross_entropy(z, y, lp, 0.7, backend="triton")

    def ldam():
        return LF.ldam_cross_entropy(z, y, m, 4.0, backend="triton")

    want_la = _want(z, y, log_prior=lp, tau=0.7)
    want_ldam = R.ldam_cross_entropy(z.cpu().double(), y.cpu(), m.cpu().double(), 4.0)
    made = []
    for _ in range(3):
        torch.testing.assert_close(la().cpu().double(), want_la, rtol=1e-5, atol=1e-5)
        first = _glue._LAST_ARGS._args
        torch.testing.assert_close(ldam().cpu().double(), want_ldam, rtol=1e-5, atol=1e-5)
        made.append((first, _glue._LAST_ARGS._args))
    assert all(a is made[0][0] and b is made[0][1] for a, b in made)  # made once each, then found
    for k in range(_glue.SHARED_CACHE_SIZE):  # as many other calls as the cache keeps: the first is dropped
        LF.logit_adjusted_cross_entropy(z, y, lp, 0.1 * (k + 1), backend="triton")
    la()
    assert _glue._LAST_ARGS._args is not made[0][0]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_class_tensor_swapped_in_place_is_not_a_hit(dtype):
    """``torch.utils.swap_tensors`` (nn.Module._apply swaps parameters so under
    ``torch.__future__.set_swap_module_params_on_conversion``) keeps the tensor's id, and its version can be the same
    number: the cache took it for the cached tensor (a float64 prior's old fp32 copy: 1.889 for 2.863), and a
    swapped-in tensor of another shape skipped the (C,) check."""
    z, y, _ = _data(C=6)
    lp = torch.randn(6, dtype=dtype).to(DEVICE)
    LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
    new = (torch.randn(6, dtype=dtype) * 3).to(DEVICE)
    torch.utils.swap_tensors(lp, new)
    torch.testing.assert_close(LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton").double(),
                               _want(z, y, log_prior=lp.double(), tau=1.0), rtol=2e-5, atol=2e-5)
    torch.utils.swap_tensors(lp, torch.randn(9, dtype=dtype).to(DEVICE))
    with pytest.raises(ValueError, match=r"log_prior must have shape \(C,\)"):
        LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")


def test_a_lade_prior_is_freed_with_its_module():
    """The log-prior cache is weak in its keys, but a contiguous fp32 prior is its own fp32 pi, which its entry held:
    every prior ever used stayed alive (8 MB of GPU memory per LADE head at 10^6 classes)."""
    import gc
    import weakref

    z, y, _ = _data(C=6)
    crit = fastlt.LADELoss([50, 20, 9, 4, 2, 1], backend="triton").to(DEVICE)
    crit(z, y)
    dead = weakref.ref(crit.prior), weakref.ref(crit)
    del crit
    fresh = []
    for _ in range(3 * _glue.SHARED_CACHE_SIZE):  # fresh priors: only the shared cache's last few stay
        prior = torch.softmax(torch.randn(6), 0).to(DEVICE)
        fresh.append(weakref.ref(prior))
        LF.lade_loss(z, y, prior, backend="triton")
        del prior
    gc.collect()
    assert all(ref() is None for ref in dead)
    assert sum(ref() is not None for ref in fresh) <= _glue.SHARED_CACHE_SIZE  # (not by the log-prior cache's count:
    # earlier tests' priors may still sit in other shared caches)


@pytest.mark.parametrize("module", [False, True])
def test_a_refused_value_equal_to_a_cached_one_is_still_refused(module):
    """``True == 1.0`` and ``2.0 == 2``: a call with ``tau=True`` (or ``ignore_index=2.0``) after one with
    ``tau=1.0`` (``ignore_index=2``) found that checked entry and ran, where the reference path refuses it."""
    z, y, lp = _data(C=6)
    counts = torch.tensor([5.0, 4, 3, 2, 2, 1])
    for kw, bad in [(dict(tau=1.0), dict(tau=True)), (dict(ignore_index=2), dict(ignore_index=2.0)),
                    (dict(label_smoothing=1.0), dict(label_smoothing=True))]:
        name = next(iter(bad))
        if module:
            loss = fastlt.LogitAdjustedLoss(counts, backend="triton", **kw).to(DEVICE)
            loss(z, y)
            setattr(loss, name, bad[name])
            with pytest.raises(TypeError, match=name):
                loss(z, y)
        else:
            LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton", **kw)
            with pytest.raises(TypeError, match=name):
                LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton", **bad)
