"""The batch reduction inside the row kernels and the one-launch rescale of stored gradients.

``REDUCE``: the program of a row launch that finishes last sums the batch (``launch.loss``); ``OWN_DENOM``: every row
program sums 'mean''s denominator itself, so a gradient-in-forward needs no launch before it. Both are checked
against float64 torch and against the separate ``reduce_rows`` launch they replace (which still runs when no
counter can be had: inside a CUDA-graph capture before any eager call, or for long batches). ``scale_rows``
multiplies up to three stored gradients by grad_output in one launch of a grid-stride loop.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import DEVICE

from fastlt import reference as R
from fastlt._operator import AdjustedCEArgs
from fastlt.kernels import counters, launch, tiles

CONFIGS = {
    "default": {},
    "split": dict(block_n=16, num_splits=3),  # row_loss_forward SPLIT, then row_loss_combine reduces
    "persistent": dict(block_n=16, num_splits=1, row_programs=3),  # fewer programs than row blocks
    "row-blocks": dict(block_m=4, block_n=16, num_splits=1),
}


def _case(N: int, C: int, seed: int, *, weighted: bool, reduction: str):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=gen) * 3
    y = torch.randint(0, C, (N,), generator=gen)
    y[1::4] = -100
    counts = torch.randint(1, 50, (C,), generator=gen)
    prior = torch.log(counts / counts.sum()).float()
    weight = torch.rand(C, generator=gen) + 0.5 if weighted else None
    args = AdjustedCEArgs(log_prior=prior.to(DEVICE), weight=None if weight is None else weight.to(DEVICE),
                           label_smoothing=0.1 if weighted else 0.0, reduction=reduction)
    want = R.adjusted_cross_entropy(z.double(), y, log_prior=prior.double(), tau=1.0,
                                    weight=None if weight is None else weight.double(),
                                    label_smoothing=args.label_smoothing, reduction=reduction)
    return z.to(DEVICE), y.to(DEVICE), args, want


def _run(z, y, args, *, grad_in_forward: bool, config: dict):
    N, C = z.shape
    cfg = launch.pick_tiles(N, C, z.device, grad_in_forward=grad_in_forward, **config) if config else None
    g = z.clone() if grad_in_forward else None
    loss, lse, factor = launch.loss(z, y, args, grad_out=g, config=cfg)
    return loss, lse, factor, g


def _counter_is_zero() -> bool:
    """The stream's counter slot is back to 0: the finish ticket, and the published denominator's start ticket,
    flag and value (kernels/reduce.py: publish_inverse)."""
    counter = counters.reduce_counter(torch.device(DEVICE))
    return not counter.as_strided((4,), (1,)).any().item()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad-in-forward"])
@pytest.mark.parametrize("reduction,weighted", [("mean", False), ("mean", True), ("sum", True)])
# the denominator of 'mean': every program's own, or (OWN_DENOM_READS 0) the first program's published to the others;
# the second run (no counter) takes it from a launch of its own
@pytest.mark.parametrize("own_denom", [True, False], ids=["own-denominator", "published-denominator"])
@pytest.mark.parametrize("N", [1, 37])
def test_in_kernel_reduction_matches_float64_and_the_separate_launch(config, grad_in_forward, reduction, weighted,
                                                                     own_denom, N, monkeypatch):
    if not own_denom:
        monkeypatch.setattr(tiles, "OWN_DENOM_READS", 0)
    z, y, args, want = _case(N, 50, N, weighted=weighted, reduction=reduction)
    loss, lse, factor, g = _run(z, y, args, grad_in_forward=grad_in_forward, config=CONFIGS[config])
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), want, rtol=2e-6, atol=2e-6)
    assert _counter_is_zero(), "the last program must put the counter back to 0"

    monkeypatch.setattr(counters, "reduce_counter", lambda device: None)  # as inside a capture with no counter yet
    loss2, lse2, factor2, g2 = _run(z, y, args, grad_in_forward=grad_in_forward, config=CONFIGS[config])
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)  # two summation orders, both fp32
    torch.testing.assert_close(factor2, factor, rtol=1e-6, atol=0)  # 'mean': scaled in the kernel or by the launch
    assert torch.equal(lse2, lse)
    if grad_in_forward:
        torch.testing.assert_close(g2, g, rtol=1e-6, atol=1e-9)


def test_all_rows_ignored_and_empty_batch():
    for N in (5, 0):
        z, y, _, _ = _case(N, 9, 3, weighted=False, reduction="mean")
        y = torch.full_like(y, -100)
        for reduction in ("mean", "sum"):
            for grad_in_forward in (False, True):
                loss, *_ = _run(z, y, AdjustedCEArgs(reduction=reduction), grad_in_forward=grad_in_forward,
                                config={})
                if reduction == "mean":
                    assert torch.isnan(loss).item()
                else:
                    assert loss.item() == 0.0
    assert _counter_is_zero()


def test_the_sum_does_not_depend_on_which_program_finishes_last():
    """The last program sums every row in index order: the loss is bitwise the same over grids and repeats."""
    z, y, args, _ = _case(45, 40, 7, weighted=True, reduction="mean")
    results = {name: _run(z, y, args, grad_in_forward=False, config=CONFIGS[name])[0]
               for name in ("persistent", "row-blocks")}
    results["repeat"] = _run(z, y, args, grad_in_forward=False, config=CONFIGS["persistent"])[0]
    results["one-per-row"] = _run(z, y, args, grad_in_forward=False, config=dict(block_n=16, num_splits=1,
                                                                                 block_m=1))[0]
    first = results["persistent"]
    for name, loss in results.items():
        assert torch.equal(loss, first), name


def test_counters_are_per_stream_and_the_bank_runs_dry():
    dev = torch.device(DEVICE)
    mine = counters.reduce_counter(dev)
    assert counters.reduce_counter(dev) is mine  # one per stream (thread on the CPU), kept
    assert mine.dtype == torch.int32 and mine.shape == (1,)
    other = []
    if DEVICE == "cuda":
        with torch.cuda.stream(torch.cuda.Stream()):
            other.append(counters.reduce_counter(dev))
    else:
        thread = threading.Thread(target=lambda: other.append(counters.reduce_counter(dev)))
        thread.start()
        thread.join()
    assert other[0] is not None and other[0].data_ptr() != mine.data_ptr()
    bank = counters.CounterBank(dev)
    slots = [bank.fresh() for _ in range(counters.COUNTER_SLOTS)]
    assert len({s.data_ptr() for s in slots}) == counters.COUNTER_SLOTS
    assert all(s.data_ptr() % 16 == 0 for s in slots)  # one kernel variant for every slot (Triton's alignment)
    assert bank.fresh() is None


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's counters (CPU): a GPU launch is not interrupted")
def test_a_slot_an_interrupted_launch_left_set_is_cleared():
    """In the interpreter a launch runs its programs one after another on the calling thread: an exception or Ctrl-C
    between them leaves the thread's slot set (its finish ticket counted 2), and every later fused reduction on the
    thread read it (losses of 6.6e34). The words are cleared before the slot is handed out again."""
    from fastlt import functional as LF

    gen = torch.Generator().manual_seed(3)
    z, y = torch.randn(256, 6, generator=gen), torch.randint(0, 6, (256,), generator=gen)
    lp = torch.randn(6, generator=gen)
    want = R.adjusted_cross_entropy(z.double(), y, log_prior=lp.double(), tau=1.0)
    LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
    slot = counters.reduce_counter(torch.device("cpu"))
    bank = counters.BANKS[torch.device("cpu")]
    at = slot.storage_offset()
    bank.slots[at:at + 2] = torch.tensor([2, 1], dtype=torch.int32)  # what an interrupted launch leaves
    for _ in range(2):
        torch.testing.assert_close(LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton").double(), want,
                                   rtol=1e-5, atol=1e-5)
    assert not bank.slots[at:at + 4].any()


# --- scale_rows: the stored gradients times grad_output --------------------------------------------------------

def _tensors():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(40, 300, generator=gen).to(DEVICE),  # 3 tiles of 4096: more tiles than the CPU grid
            torch.randn(33, generator=gen).to(DEVICE, torch.bfloat16),
            torch.randn(2, 3, 5, generator=gen).to(DEVICE, torch.float16)]


@pytest.mark.parametrize("go", [1.0, 2.5, -0.0])
def test_scale_all_scales_up_to_three_tensors_in_one_launch(go):
    grads = _tensors()
    want = [g.float() * go for g in grads]
    launch.scale_all([grads[0], None, grads[1], grads[2]], torch.tensor(go, device=DEVICE))
    for g, w in zip(grads, want, strict=True):  # one rounding to the dtype (the interpreter's may differ by an ulp)
        rtol = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[g.dtype]
        torch.testing.assert_close(g.float(), w, rtol=rtol, atol=0)


def test_scale_all_takes_views_and_refuses_what_it_cannot_scale():
    base = torch.randn(30, 20).to(DEVICE)
    view = base.t()  # non-contiguous 2-D
    col = base[:, 3]  # non-contiguous 1-D
    want_view, want_col = view * 3, col * 3  # col is a column of base, so base.t() * 3 covers it too
    launch.scale_all([view], torch.tensor(3.0, device=DEVICE))
    torch.testing.assert_close(view, want_view)
    torch.testing.assert_close(col, want_col)
    with pytest.raises(ValueError, match="scalar grad_output"):
        launch.scale_all([base], torch.ones(30, device=DEVICE))
    with pytest.raises(ValueError, match="at most 3"):
        launch.scale_all([base] * 4, torch.tensor(2.0, device=DEVICE))
    with pytest.raises(ValueError, match="non-contiguous 3-D"):
        launch.scale_all([torch.randn(4, 5, 6).to(DEVICE).transpose(0, 2)], torch.tensor(2.0, device=DEVICE))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_scale_by_per_row_grad_output(layout):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(50, 37, generator=gen).to(DEVICE)
    if layout == "transposed":
        g = torch.randn(37, 50, generator=gen).to(DEVICE).t()
    go = torch.randn(50, generator=gen).to(DEVICE)
    want = g * go[:, None]
    assert launch.scale_by(g, go) is g
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="grad_output must be a scalar or \\(50,\\)"):
        launch.scale_by(g, torch.ones(49, device=DEVICE))


# --- on a GPU: programs really do finish in any order -----------------------------------------------------------

@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs programs one after another: races need a GPU")
def test_last_program_sees_every_row_under_concurrency():
    """Hundreds of launches of varied sizes and grids: a row the last program read before its writer stored it
    would show as a loss off the float64 sum (the interpreter cannot show this: it runs programs in order)."""
    gen = torch.Generator().manual_seed(5)
    dev = torch.device(DEVICE)
    for step in range(300):
        N = int(torch.randint(1, 3000, (1,), generator=gen))
        C = [131, 1000, 8142][step % 3]
        z = torch.randn(N, C, generator=gen).to(dev)
        y = torch.randint(0, C, (N,), generator=gen).to(dev)
        args = AdjustedCEArgs(reduction="mean" if step % 2 else "sum")
        config = [None, dict(row_programs=7, num_splits=1), dict(block_n=256, num_splits=3)][step % 3 if C > 256
                                                                                          else 0]
        cfg = launch.pick_tiles(N, C, dev, **config) if config else None
        loss, _, _ = launch.loss(z, y, args, config=cfg)
        rows, _, _, _ = launch.forward(z, y, AdjustedCEArgs(reduction="none"))
        want = rows.double().sum() / (N if args.reduction == "mean" else 1)
        assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()), (step, N, C, config)
    assert _counter_is_zero()


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs programs one after another: races need a GPU")
def test_published_denominator_reaches_every_program_under_concurrency(monkeypatch):
    """A gradient in the forward whose 'mean' denominator the launch's first program publishes (OWN_DENOM_READS 0):
    a program that read the slot before its value was there would scale its rows by 0 or by the last launch's
    value; against the denominator's own launch (no counter) on the same inputs, over launches of varied sizes."""
    monkeypatch.setattr(tiles, "OWN_DENOM_READS", 0)
    gen = torch.Generator().manual_seed(7)
    dev = torch.device(DEVICE)
    counter = counters.reduce_counter
    for step in range(200):
        N = int(torch.randint(1, 3000, (1,), generator=gen))
        C = [131, 1000, 8142][step % 3]
        z = torch.randn(N, C, generator=gen).to(dev)
        y = torch.randint(0, C, (N,), generator=gen).to(dev)
        w = (torch.rand(C, generator=gen) + 0.5).to(dev) if step % 2 else None
        args = AdjustedCEArgs(reduction="mean", weight=w)
        g = torch.empty_like(z)
        loss, _, _ = launch.loss(z, y, args, grad_out=g)
        monkeypatch.setattr(counters, "reduce_counter", lambda device: None)
        g2 = torch.empty_like(z)
        loss2, _, _ = launch.loss(z, y, args, grad_out=g2)
        monkeypatch.setattr(counters, "reduce_counter", counter)
        assert abs(loss.item() - loss2.item()) <= 1e-5 * max(1.0, abs(loss2.item())), (step, N, C)
        where = (step, N, C)
        torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-9, msg=lambda m, where=where: f"{where}: {m}")
    assert _counter_is_zero()


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs programs one after another: races need a GPU")
def test_lade_finish_sees_every_row_and_part_under_concurrency(monkeypatch):
    """LADE's finish launch: its last program adds the PriorCE rows and every class block's LADER part; against the
    separate reduction launch on the same inputs, over launches of varied sizes."""
    from fastlt import functional as LF

    gen = torch.Generator().manual_seed(6)
    counter = counters.reduce_counter
    for step in range(60):
        N = int(torch.randint(1, 4000, (1,), generator=gen))
        C = [300, 2000, 8142][step % 3]  # 2, 8 and 32 class blocks of LADER parts
        z = torch.randn(N, C, generator=gen).to(DEVICE)
        y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
        pi = torch.softmax(torch.randn(C, generator=gen), 0).to(DEVICE)
        reduction = "mean" if step % 2 else "sum"
        fused = LF.lade_loss(z, y, pi, reduction=reduction, backend="triton")
        monkeypatch.setattr(counters, "reduce_counter", lambda device: None)
        separate = LF.lade_loss(z, y, pi, reduction=reduction, backend="triton")
        monkeypatch.setattr(counters, "reduce_counter", counter)
        assert abs(fused.item() - separate.item()) <= 1e-5 * max(1.0, abs(separate.item())), (step, N, C)


def test_the_fused_reduction_is_decided_at_each_launch(monkeypatch):
    """Whether a launch's last program reduces the batch is asked at each launch, not kept in its plan: a setting
    changed after the plan was made (tests patch tiles.FUSED_REDUCE_STEPS) takes effect, and the loss is the same
    either way."""
    N, C = 9, 13
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    args = AdjustedCEArgs.from_kwargs(z.device)
    launched = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(launch, "reduce_rows", Counted(launch.reduce_rows))
    fused = launch.loss(z, y, args)[0]
    assert not launched  # the row kernel's last program reduced the batch
    monkeypatch.setattr(tiles, "FUSED_REDUCE_STEPS", 0)
    apart = launch.loss(z, y, args)[0]  # the same args: their plan is kept
    assert len(launched) == 1
    torch.testing.assert_close(apart, fused, rtol=1e-6, atol=1e-6)
