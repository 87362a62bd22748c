"""LADE on the kernels (PriorCE rows + LADER column statistics in one pass) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from oracle import assert_oracle_close

from fastlt import functional as LF
from fastlt import reference as R
from fastlt._operator import AdjustedCEArgs
from fastlt.kernels import counters, launch, tiles
from fastlt.priors import prior


def _case(N, C, dtype, seed, *, ignore=(), absent_class=None):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 300, (C,), generator=gen)
    pi = prior(counts)
    z = (torch.randn(N, C, generator=gen, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen)
    if absent_class is not None:
        y[y == absent_class] = (absent_class + 1) % C
    for r in ignore:
        y[r] = -100
    return z, y, pi, torch.rand(C, generator=gen) + 0.2


def _compare(z, y, pi, *, reduction="mean", weight=None, label_smoothing=0.0, alpha=0.1, lam=0.1, config=None):
    dtype = z.dtype
    zk = z.to(DEVICE).clone().requires_grad_()
    w = None if weight is None else weight.to(DEVICE)
    orig = launch.pick_tiles
    if config is not None:
        launch.pick_tiles = lambda N, C, device, **k: orig(N, C, device, **{**k, **config})
    try:
        loss = LF.lade_loss(zk, y.to(DEVICE), pi.to(DEVICE), alpha, lam, weight=w, reduction=reduction,
                            label_smoothing=label_smoothing, backend="triton")
    finally:
        launch.pick_tiles = orig
    go = torch.tensor(1.7, dtype=torch.float64)
    loss.backward(go.to(DEVICE, loss.dtype))
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    z64 = z.double().requires_grad_()
    ref64 = R.lade_loss(z64, y, pi.double(), alpha, lam, weight=None if weight is None else weight.double(), **kw)
    ref64.backward(go)
    zs = z.clone().requires_grad_()
    ref_s = R.lade_loss(zs, y, pi.to(dtype), alpha, lam, weight=None if weight is None else weight.to(dtype), **kw)
    ref_s.backward(go.to(dtype))
    assert_oracle_close(loss, ref64, ref_s, dtype, what="loss")
    assert_oracle_close(zk.grad, z64.grad, zs.grad, dtype, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lade_matches_reference(dtype, reduction):
    z, y, pi, _ = _case(40, 23, dtype, 1, ignore=(3, 17), absent_class=5)
    _compare(z, y, pi, reduction=reduction)


@pytest.mark.parametrize("N,C", [(1, 1), (1, 9), (3, 7), (70, 3), (5, 1000)])
def test_lade_odd_shapes(N, C):
    z, y, pi, _ = _case(N, C, torch.float32, N * 31 + C)
    _compare(z, y, pi)


def test_lade_weights_smoothing_hyperparameters():
    z, y, pi, w = _case(33, 19, torch.float32, 2, ignore=(0,))
    _compare(z, y, pi, weight=w, label_smoothing=0.2, alpha=0.7, lam=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", [dict(block_m=4, block_n=16), dict(block_m=4, block_n=32, num_splits=2)],
                         ids=["4x16", "split"])
def test_lade_grouped_statistics(dtype, config):
    """Rows loaded in vectors of 4 (fp32) or 8 (2-byte) columns keep per-thread row statistics over their tiles
    (kernels/adjusted_ce.py: _group_stats) beside the per-tile column partials: C = 104, with class weights and
    smoothing, against float64."""
    z, y, pi, w = _case(21, 104, dtype, 4, ignore=(2,))
    cfg = launch.pick_tiles(21, 104, torch.device(DEVICE), column_stats=True, **config)
    assert launch._stats_group(z, launch.row_align(z), cfg, launch.kernel_flags(AdjustedCEArgs()))[0] > 0
    _compare(z, y, pi, weight=w, label_smoothing=0.1, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lade_grouped_statistics_of_two_elements_a_thread(dtype):
    """An even width that is no multiple of 4 (C = 102: 2-column vectors) in 16-wide tiles of 4 rows: a thread holds
    one vector (2 elements) of a row per tile, its group (LADE's 4096 x 8142 bf16 tiles on a GPU), beside the
    per-tile column partials; class weights, smoothing and an ignored row, against float64."""
    z, y, pi, w = _case(21, 102, dtype, 6, ignore=(3,))
    config = dict(block_m=4, block_n=16)
    cfg = launch.pick_tiles(21, 102, torch.device(DEVICE), column_stats=True, **config)
    assert launch._stats_group(z, launch.row_align(z), cfg, launch.kernel_flags(AdjustedCEArgs())) == (2, 16)
    _compare(z, y, pi, weight=w, label_smoothing=0.1, config=config)


@pytest.mark.parametrize("config", [dict(block_m=4, block_n=16), dict(block_m=1, block_n=16), dict(block_m=8),
                                    dict(block_m=4, block_n=16, num_splits=3),
                                    dict(block_m=4, block_n=16, row_programs=3)],
                         ids=["4x16", "1x16", "8xC", "split", "persistent"])
def test_lade_row_blocks_and_column_tiles(config):
    """Several row blocks (partial column statistics merged), several column tiles per row, split rows, and a
    persistent grid (3 programs walking the 10 row blocks: the partials of every block are still written)."""
    z, y, pi, _ = _case(37, 50, torch.float32, 3, ignore=(5,))
    _compare(z, y, pi, config=config)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lade_long_batch_reduction_matches_reference(reduction, monkeypatch):
    """Beyond ONE_PROGRAM_ROWS rows the loss is reduced by torch ops: PriorCE's sum plus LADER's class-block partials
    (several here, C > 256), and 'mean''s factor scaled in place."""
    monkeypatch.setattr(tiles, "ONE_PROGRAM_ROWS", 0)
    z, y, pi, _ = _case(9, 600, torch.float32, 8, ignore=(2,))
    _compare(z, y, pi, reduction=reduction, alpha=0.4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("where", ["in kernel", "own launch"])
def test_lade_reduction_in_the_finish_launch_or_its_own(reduction, where, monkeypatch):
    """The finish launch's last program adds the PriorCE rows and every class block's LADER part (C = 600: three
    blocks, so three parts) and scales 'mean''s factors; without a counter (inside a CUDA-graph capture before any
    eager call) one reduce_rows launch after it does the same."""
    if where == "own launch":
        monkeypatch.setattr(counters, "reduce_counter", lambda device: None)
    z, y, pi, w = _case(21, 600, torch.float32, 9, ignore=(4,))
    _compare(z, y, pi, reduction=reduction, weight=w, label_smoothing=0.1, alpha=0.4)


def test_lade_all_rows_ignored_gives_torch_semantics():
    z = torch.randn(4, 6, device=DEVICE)
    y = torch.full((4,), -100, device=DEVICE)
    pi = torch.full((6,), 1 / 6, device=DEVICE)
    got = LF.lade_loss(z, y, pi, reduction="sum", backend="triton")
    assert got.item() == 0.0
    assert torch.isnan(LF.lade_loss(z, y, pi, backend="triton"))
    for reduction in ("mean", "sum"):  # the gradient is 0 (as the reference's), not NaN from 1 / 0
        zk = z.clone().requires_grad_()
        LF.lade_loss(zk, y, pi, reduction=reduction, backend="triton").backward()
        zr = z.cpu().clone().requires_grad_()
        R.lade_loss(zr, y.cpu(), pi.cpu(), reduction=reduction).backward()
        assert torch.equal(zr.grad, torch.zeros_like(zr)) and torch.equal(zk.grad, torch.zeros_like(zk))


def _partials(R: int, C: int, seed: int) -> torch.Tensor:
    """(2, R, C) fp32 column partials as the forward writes them: max, sum-exp below it; one row block with no
    valid rows (the float32 minimum, 0) when R > 1."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.stack([torch.randn(R, C, generator=gen) * 3, torch.rand(R, C, generator=gen) * 5 + 1])
    if R > 1:
        p[:, R // 2] = torch.tensor([torch.finfo(torch.float32).min, 0.0])[:, None]
    return p


def _targets(N: int, C: int, seed: int):
    """Targets with ignored rows and target logits; the slots of ignored rows hold NaN (never written by the
    kernel, so never to be read)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=gen)
    y[::5] = -100
    zy = torch.randn(N, generator=gen) * 2
    zy[y == -100] = float("nan")
    return y, zy


@pytest.mark.parametrize("R, C, N, programs", [(1, 1, 1, None), (3, 7, 40, None), (37, 300, 50, None),
                                               (16, 256, 1000, None), (2, 5, 0, None), (37, 300, 300, 4),
                                               (20, 700, 90, 2)])
def test_merge_partials_and_finish_match_float64(R, C, N, programs, monkeypatch):
    """The one-launch column merge (several row-block loops, a partial column tile), the class sums and counts
    from the target logits, and LADER's finish. ``programs``: as if C were large (lade_columns' class blocks grow
    past 32 classes when C would make more than _TARGET_PROGRAMS programs: 128 and 256 here)."""
    from fastlt.kernels import lade as lade_kernels

    if programs is not None:
        monkeypatch.setattr(lade_kernels, "_TARGET_PROGRAMS", programs)
        assert lade_kernels._block_c(C) == {4: 128, 2: 256}[programs]
    p = _partials(R, C, R + C)
    got = lade_kernels.merge_partials(p.to(DEVICE)).cpu().double()
    p64 = p.double()
    c_max = p64[0].amax(0)
    want = torch.stack([c_max, (p64[1] * torch.exp(p64[0] - c_max)).sum(0)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # row chunks: the second chunk's partials merged into the first's running statistics, in place
    running = lade_kernels.merge_partials(p[:, : R // 2 + 1].to(DEVICE))
    again = lade_kernels.merge_partials(p[:, R // 2 + 1:].to(DEVICE), into=running)
    assert again is running
    torch.testing.assert_close(running.cpu().double(), want, rtol=1e-5, atol=1e-5)

    gen = torch.Generator().manual_seed(C)
    pi = torch.rand(C, generator=gen) + 0.1
    pi = pi / pi.sum()
    y, zy = _targets(N, C, N + C)
    valid = y != -100
    n_valid = valid.sum().double()
    counts = torch.bincount(y[valid], minlength=C).double()
    sums = torch.zeros(C, dtype=torch.float64).index_add_(0, y[valid], zy[valid].double())
    lam, alpha = 0.3, 0.7
    terms = lade_kernels.finish(p.to(DEVICE), y.to(DEVICE), zy.to(DEVICE), pi.to(DEVICE), -100, lam, alpha)
    col_a, col_b, col_lse = terms.column_term.columns  # (3, C): the rows a, b, lse
    lader = terms.lader() / alpha
    lse = want[0] + torch.log(want[1])
    second = lse - torch.log(pi.double() + 1e-9) + torch.log(torch.tensor(1.0 / C + 1e-9, dtype=torch.float64)) \
        - torch.log(n_valid)
    est = sums / (counts + 1e-8) - second - lam * second * second
    torch.testing.assert_close(col_lse.cpu().double(), lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col_a.cpu().double(), -alpha * pi.double() / (counts + 1e-8), rtol=1e-5, atol=1e-6)
    if N:
        torch.testing.assert_close(col_b.cpu().double(), alpha * pi.double() * (1 + 2 * lam * second), rtol=1e-5,
                                   atol=1e-6)
    assert terms.parts.shape == (-(-C // lade_kernels._block_c(C)),)  # one LADER partial per block of classes
    want_lader = -(pi.double() * est).sum() if n_valid > 0 else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(lader.cpu().double(), want_lader, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(lader).item()
    # merged (2, C) statistics finish the same as the (2, R, C) partials
    again = lade_kernels.finish(lade_kernels.merge_partials(p.to(DEVICE)), y.to(DEVICE), zy.to(DEVICE),
                                pi.to(DEVICE), -100, lam, alpha)
    torch.testing.assert_close(again.lader() / alpha, lader)
    torch.testing.assert_close(again.col_lse, col_lse)
    # every row ignored: LADER is 0
    none = torch.full_like(y, -100)
    assert lade_kernels.finish(p.to(DEVICE), none.to(DEVICE), zy.to(DEVICE), pi.to(DEVICE), -100, lam).lader() == 0


def test_finish_skips_out_of_range_targets_and_other_ignore_index():
    """A target outside [0, C) and a custom ignore_index: neither is counted in any class."""
    from fastlt.kernels import lade as lade_kernels

    C = 6
    p = _partials(2, C, 5).to(DEVICE)
    pi = torch.full((C,), 1 / C, device=DEVICE)
    y = torch.tensor([0, 7, 3, 3, -1, 2])
    zy = torch.tensor([1.0, float("nan"), 2.0, 4.0, float("nan"), -1.0])
    col_a = lade_kernels.finish(p, y.to(DEVICE), zy.to(DEVICE), pi, -1, 0.1).col_a
    counts = torch.tensor([1.0, 0, 1, 2, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(col_a.cpu().double(), -(1 / C) / (counts + 1e-8), rtol=1e-6, atol=0)
    lader = lade_kernels.finish(p, y.to(DEVICE), zy.to(DEVICE), pi, -1, 0.1).lader()
    assert torch.isfinite(lader).item()


def test_merge_partials_and_finish_reject_bad_shapes():
    from fastlt.kernels import lade as lade_kernels

    with pytest.raises(ValueError, match=r"\(2, R, C\) or \(2, C\) fp32"):
        lade_kernels.merge_partials(torch.zeros(3, 2, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(2, R, C\) or \(2, C\) fp32"):
        lade_kernels.merge_partials(torch.zeros(2, 2, 5, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match=r"into must be contiguous \(4, C\)"):  # class probabilities' four planes
        lade_kernels.merge_partials(torch.zeros(4, 2, 5, device=DEVICE), into=torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="class-probability targets need"):
        lade_kernels.finish(torch.zeros(2, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE),
                            torch.zeros(3, device=DEVICE), torch.full((5,), 0.2, device=DEVICE), -100, 0.1)
    with pytest.raises(ValueError, match=r"into must be contiguous \(2, C\)"):
        lade_kernels.merge_partials(torch.zeros(2, 2, 5, device=DEVICE), into=torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="target_logits"):
        lade_kernels.finish(torch.zeros(2, 5, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE),
                            torch.zeros(4, device=DEVICE), torch.full((5,), 0.2, device=DEVICE), -100, 0.1)


def test_chunk_partials_rejects_column_stats_of_the_wrong_shape():
    z = torch.zeros(5, 8, device=DEVICE)
    y = torch.zeros(5, dtype=torch.long, device=DEVICE)
    part = torch.empty((launch.PARTIAL_PLANES, 5, 1), device=DEVICE)
    args = AdjustedCEArgs()
    wrong = launch.ColumnStats(torch.empty((2, 1, 7), device=DEVICE), torch.empty(5, device=DEVICE))
    with pytest.raises(ValueError, match="column_stats must hold"):
        launch.chunk_partials(z, y, args, part, 0, col_base=0, num_classes=8, column_stats=wrong)
    with pytest.raises(ValueError, match="partials must be"):  # too few planes: refused, never written past
        launch.chunk_partials(z, y, args, torch.empty((4, 5, 1), device=DEVICE), 0, col_base=0, num_classes=8)
    short = launch.new_column_stats(4, 8, DEVICE)
    with pytest.raises(ValueError, match="column_stats must hold"):
        launch.chunk_partials(z, y, args, part, 0, col_base=0, num_classes=8, column_stats=short)


def test_log_prior_cache_follows_in_place_changes_and_new_tensors():
    """``log pi`` is computed once per prior tensor: a prior changed in place (a new ``_version``) or a new tensor
    gets its own, so the loss always follows the prior it is given."""
    z, y, pi, _ = _case(12, 9, torch.float32, 4)
    zk, yk, pik = z.to(DEVICE), y.to(DEVICE), pi.to(DEVICE)
    first = LF.lade_loss(zk, yk, pik, backend="triton")
    torch.testing.assert_close(first.cpu(), R.lade_loss(z, y, pi), rtol=1e-5, atol=1e-5)
    flipped = pi.flip(0)
    pik.copy_(flipped.to(DEVICE))  # in place: same tensor, new version
    torch.testing.assert_close(LF.lade_loss(zk, yk, pik, backend="triton").cpu(), R.lade_loss(z, y, flipped),
                               rtol=1e-5, atol=1e-5)
    other = (pi * torch.linspace(0.5, 2.0, pi.numel())).div_((pi * torch.linspace(0.5, 2.0, pi.numel())).sum())
    torch.testing.assert_close(LF.lade_loss(zk, yk, other.to(DEVICE), backend="triton").cpu(),
                               R.lade_loss(z, y, other), rtol=1e-5, atol=1e-5)


def test_lade_with_a_prior_made_under_inference_mode():
    """A module built under ``torch.inference_mode`` holds inference tensors, which have no version counter: the
    loss still runs, inside inference mode and out of it (evaluation code often builds criteria there)."""
    z, y, pi, _ = _case(6, 11, torch.float32, 9)
    with torch.inference_mode():
        pik = pi.to(DEVICE)
        inside = LF.lade_loss(z.to(DEVICE), y.to(DEVICE), pik, backend="triton")
    outside = LF.lade_loss(z.to(DEVICE), y.to(DEVICE), pik, backend="triton")
    want = R.lade_loss(z, y, pi)
    torch.testing.assert_close(inside.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outside.cpu(), want, rtol=1e-5, atol=1e-5)


def test_lade_column_masked_with_the_float_minimum_has_a_finite_gradient():
    """A class masked with finfo(float32).min in every row: its column statistics start from -inf (they used to be
    clamped at -1e30, above every entry, which gave that column an LSE of -inf and a -inf gradient). LADER's loss
    overflows float32 there (lambda * second^2), as the float32 reference's does; the gradient is finite and
    matches the float64 reference's."""
    z, y, pi, _ = _case(12, 9, torch.float32, 5, ignore=(2,), absent_class=4)
    z[:, 4] = torch.finfo(torch.float32).min
    zk = z.to(DEVICE).clone().requires_grad_()
    LF.lade_loss(zk, y.to(DEVICE), pi.to(DEVICE), 0.1, 0.1, backend="triton").backward()
    z64 = z.double().requires_grad_()
    R.lade_loss(z64, y, pi.double(), 0.1, 0.1).backward()
    assert torch.isfinite(z64.grad).all()
    torch.testing.assert_close(zk.grad.cpu().double(), z64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_lade_ignored_rows_masked_whole_are_left_out(label_smoothing):
    """Ignored rows masked whole, with -inf and with ``finfo.min``: they add nothing to LADER's class sums nor to
    PriorCE, so the loss is finite and their gradient 0, equal to the float64 reference (which used to sum
    ``-inf * 0`` = NaN into a class's target sum, and whose softmax backward gave NaN on such a row); and a valid
    row with classes masked with -inf, which the reference's class sums also took as NaN."""
    z, y, pi, _ = _case(12, 9, torch.float32, 6, ignore=(2, 7))
    z[2] = float("-inf")
    z[7] = torch.finfo(torch.float32).min
    if label_smoothing == 0.0:  # and a valid row with classes masked with -inf (smoothing would make its loss inf)
        z[4, [c for c in range(9) if c != y[4]][:3]] = float("-inf")
    _compare(z, y, pi, label_smoothing=label_smoothing)
    zk = z.to(DEVICE).clone().requires_grad_()
    LF.lade_loss(zk, y.to(DEVICE), pi.to(DEVICE), label_smoothing=label_smoothing, backend="triton").backward()
    assert torch.isfinite(zk.grad).all() and not zk.grad[[2, 7]].any()


@pytest.mark.parametrize("chunks", [None, 8])
def test_lade_class_masked_with_minus_inf_in_every_row(chunks):
    """A class masked with -inf in every row (never a target): LADER takes its column LSE as 0, as the reference
    does, so the loss is finite on both backends, and that column's gradient is 0 (the kernels gave a NaN loss: LSE
    -inf made est inf - inf; the reference's gradient there was exp(-inf + inf), NaN). The logits loss and the
    head (a bias of -inf, row and class chunks) against the float64 reference."""
    import fastlt

    z, y, pi, _ = _case(12, 9, torch.float32, 7, ignore=(3,), absent_class=4)
    z[:, 4] = float("-inf")
    if chunks is None:
        _compare(z, y, pi)
        zk = z.to(DEVICE).clone().requires_grad_()
        LF.lade_loss(zk, y.to(DEVICE), pi.to(DEVICE), backend="triton").backward()
        assert torch.isfinite(zk.grad).all() and not zk.grad[:, 4].any()
        z64 = z.double().requires_grad_()
        R.lade_loss(z64, y, pi.double()).backward()
        assert torch.isfinite(z64.grad).all() and not z64.grad[:, 4].any()
        return
    counts = torch.randint(1, 300, (9,), generator=torch.Generator().manual_seed(3))
    out = {}
    for backend in ("torch", "triton"):
        head = fastlt.LinearLossHead(5, 9, counts, loss="lade", backend=backend, chunk_classes=chunks).to(DEVICE)
        with torch.no_grad():
            head.weight.copy_(torch.randn(9, 5, generator=torch.Generator().manual_seed(1)))
            head.bias.copy_(torch.randn(9, generator=torch.Generator().manual_seed(2)))
            head.bias[4] = float("-inf")
        f = torch.randn(12, 5, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_()
        loss = head(f, y.to(DEVICE))
        loss.backward()
        out[backend] = (loss.detach().cpu(), f.grad.cpu(), head.weight.grad.cpu())
    for got, want in zip(out["triton"], out["torch"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_prior_ce_takes_the_official_epsilon(backend):
    """PriorCE is the official PriorCELoss's ``CE(z + log(pi + 1e-9))`` (it was ``log pi``, as SPEC 2.6 misread the
    official code): a class of prior 1e-8 moves its offset by log(1.1) = 0.095, on the module, the function and the
    LADE head (whose adjusted logits are PriorCE's)."""
    import fastlt

    counts = torch.tensor([10**8, 3 * 10**7, 1, 1], dtype=torch.float64)
    pi = counts / counts.sum()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 2, 0])
    official = torch.nn.functional.cross_entropy(z + torch.log(pi + 1e-9), y) + 0.1 * R.lader(z, y, pi, 0.1)
    dt = torch.float64 if backend == "torch" else torch.float32
    zd, yd = z.to(DEVICE, dt), y.to(DEVICE)
    got = fastlt.LADELoss(counts, backend=backend).to(DEVICE)(zd, yd)
    torch.testing.assert_close(got.double().cpu(), official, rtol=1e-5, atol=1e-5)
    got = LF.lade_loss(zd, yd, pi.to(DEVICE, torch.float32), backend=backend)
    torch.testing.assert_close(got.double().cpu(), official, rtol=1e-5, atol=1e-5)
    head = fastlt.LinearLossHead(3, 4, counts, loss="lade")
    f = torch.randn(2, 3, generator=g)
    torch.testing.assert_close(head.logits(f, adjusted=True), head.logits(f) + torch.log(pi + 1e-9).float())


def test_lade_soft_targets_with_a_class_masked_where_no_row_puts_mass():
    """Class-probability targets with a class masked with -inf that no row's target puts mass on: LADE's column
    partial ``sum_i q_ic z_ic`` took 0 * -inf = NaN into the loss (with alpha = 0 too); the reference leaves such
    entries out. With label smoothing the PriorCE term is +inf on both backends (smoothing puts mass on the masked
    class, as F.cross_entropy's)."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(5, 7, generator=g)
    z[:, 2] = float("-inf")
    q = torch.softmax(torch.randn(5, 7, generator=g), 1)
    q[:, 2] = 0
    q = q / q.sum(1, keepdim=True)
    pi = torch.full((7,), 1 / 7)
    for alpha in (0.1, 0.0):
        want = R.lade_loss(z.double(), q.double(), pi.double(), alpha, label_smoothing=0.3)
        got = LF.lade_loss(z.to(DEVICE), q.to(DEVICE), pi.to(DEVICE), alpha, label_smoothing=0.3, backend="triton")
        assert want == float("inf") and got.item() == float("inf")
