"""Launches per training step. A loss on a small batch is host-bound: every kernel launch costs the CPU the same
microseconds whatever its size, so each loss's forward + backward must run no more kernels than its math needs,
and no stray torch op (a ``log``, a ``sum``, a ``* alpha``) between them. Counted, not timed: the Triton launches
through the launchers' kernel objects, every other op through a dispatch mode."""

import collections

import pytest
import torch
from conftest import DEVICE, IdentityView
from torch.utils._python_dispatch import TorchDispatchMode

import fastlt
import fastlt._validation as V
from fastlt.kernels import lade as lade_kernels
from fastlt.kernels import launch, row_normalize, tiles

# ops that allocate or make views: no kernel runs
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "reshape", "as_strided",
         "alias", "detach", "select", "slice", "unbind", "unsqueeze", "squeeze", "expand", "t", "lift_fresh"}


def _empty_only(args) -> bool:
    """Whether every tensor among ``args`` has no element: such an op launches no kernel (the heads' zero-size
    graph handle of their features, ``fastlt.heads.glue._graph_handle``)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in _FREE and not _empty_only(args):
            self.counts["torch." + name] += 1
        return func(*args, **(kwargs or {}))

    def uncounted(self, fn):
        """``fn`` with the ops it runs left out of the counts."""
        def run(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return run


class _CountedKernel:
    """A kernel object whose launches are counted; ops inside a launch (the CPU interpreter's) are not."""

    def __init__(self, counter, name, kernel):
        self.counter, self.name, self.kernel = counter, name, kernel

    def __getitem__(self, grid):
        self.counter.counts[self.name] += 1
        return self.counter.uncounted(self.kernel[grid])


@pytest.fixture
def counter(monkeypatch):
    c = _Counter()
    for module in (launch, lade_kernels, row_normalize):
        for name in ("row_loss_forward", "row_loss_combine", "row_loss_grad", "scale_rows", "reduce_rows",
                     "lade_columns", "_normalize_fwd", "_normalize_bwd"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _CountedKernel(c, name, getattr(module, name)))
    # the target range check reads CPU targets only (never a GPU sync)
    monkeypatch.setattr(V, "check_target", c.uncounted(V.check_target))
    return c


C, N, D = 40, 6, 16
_COUNTS = torch.arange(1, C + 1) * 3

_CASES = {
    # loss: (module factory, forward kwargs, expected launches of one forward + backward)
    # the row kernel's last program reduces the batch (no reduce_rows launch)
    "la": (lambda: fastlt.LogitAdjustedLoss(_COUNTS, backend="triton"), {},
           {"row_loss_forward": 1, "row_loss_grad": 1}),
    "la-sum-weight-smoothing": (
        lambda: fastlt.LogitAdjustedLoss(_COUNTS, backend="triton", reduction="sum", label_smoothing=0.1,
                                         weight=torch.rand(C, generator=torch.Generator().manual_seed(0)) + 0.5),
        # sum_j w_j: once per AdjustedCEArgs, which the module's steps after the first reuse (ArgsCache)
        {}, {"row_loss_forward": 1, "row_loss_grad": 1}),
    "la-weight": (lambda: fastlt.LogitAdjustedLoss(_COUNTS, backend="triton", weight=torch.ones(C)), {},
                  {"row_loss_forward": 1, "row_loss_grad": 1}),
    "la-grad-in-forward": (lambda: fastlt.LogitAdjustedLoss(_COUNTS, backend="triton", grad_in_forward=True), {},
                           # the row programs sum 'mean''s denominator themselves; backward rescales by grad_output
                           {"row_loss_forward": 1, "scale_rows": 1}),
    "la-grad-in-forward-long-batch": (
        # as if the batch were too long for every program to sum the targets: the first program sums and publishes
        lambda: fastlt.LogitAdjustedLoss(_COUNTS, backend="triton", grad_in_forward=True), {"own_denom": False},
        {"row_loss_forward": 1, "scale_rows": 1}),
    "la-grad-in-forward-very-long-batch": (
        # and too long for the last program's sums: a denominator launch first, the batch's reduction after
        lambda: fastlt.LogitAdjustedLoss(_COUNTS, backend="triton", grad_in_forward=True),
        {"own_denom": False, "fused_rows": 0}, {"reduce_rows": 2, "row_loss_forward": 1, "scale_rows": 1}),
    "la-long-batch": (  # as if the batch were too long for the last program's sums: reduce_rows after the rows
        lambda: fastlt.LogitAdjustedLoss(_COUNTS, backend="triton"), {"fused_rows": 0},
        {"row_loss_forward": 1, "reduce_rows": 1, "row_loss_grad": 1}),
    "ldam": (lambda: fastlt.LDAMLoss(_COUNTS, backend="triton"), {},
             {"row_loss_forward": 1, "row_loss_grad": 1}),
    "gcl": (lambda: fastlt.GCLLoss(_COUNTS, backend="triton"), {"seed": 5},
            {"row_loss_forward": 1, "row_loss_grad": 1}),
    "lade": (lambda: fastlt.LADELoss(_COUNTS, backend="triton"), {},
             {"row_loss_forward": 1, "lade_columns": 1, "row_loss_grad": 1}),
    # the heads (features (N, D) in): their matmuls, the row kernel writing d loss / dz over the logits, and in the
    # backward the rescale of dx, dW (and db) by grad_output, in one launch
    "la-head": (lambda: fastlt.LinearLossHead(D, C, _COUNTS, backend="triton"), {},
                {"torch.addmm": 1, "row_loss_forward": 1, "torch.mm": 2, "torch.sum": 1, "scale_rows": 1}),
    "la-head-row-chunks": (
        lambda: fastlt.LinearLossHead(D, C, _COUNTS, backend="triton", bias=False, chunk_rows=4), {},
        {"torch.mm": 2 + 2 + 1, "torch.addmm_": 1, "reduce_rows": 2, "row_loss_forward": 2, "torch.cat": 1,
         "scale_rows": 1}),
    # one chunk: LADE's two forward launches, then the gradient over the logits still in the buffer (no second matmul)
    "lade-head": (lambda: fastlt.LinearLossHead(D, C, _COUNTS, loss="lade", backend="triton"), {},
                  {"torch.addmm": 1, "row_loss_forward": 1, "lade_columns": 1, "row_loss_grad": 1,
                   "torch.mm": 2, "torch.sum": 1, "scale_rows": 1}),
    # 3 class chunks: pass 2 starts from the last chunk's logits, so 3 + 2 logits matmuls, not 3 + 3; then dx (one mm,
    # two fp32 accumulations) and dW_k (3 mm). The combine's last program reduces the batch (LADE: the finish's)
    "la-head-class-chunks": (
        lambda: fastlt.LinearLossHead(D, C, _COUNTS, backend="triton", bias=False, chunk_classes=16), {},
        {"torch.mm": 3 + 2 + 1 + 3, "torch.addmm_": 2, "row_loss_forward": 3, "row_loss_combine": 1,
         "row_loss_grad": 3, "scale_rows": 1}),
    "lade-head-class-chunks": (
        lambda: fastlt.LinearLossHead(D, C, _COUNTS, loss="lade", backend="triton", bias=False, chunk_classes=16),
        {}, {"torch.mm": 3 + 2 + 1 + 3, "torch.addmm_": 2, "row_loss_forward": 3, "row_loss_combine": 1,
             "lade_columns": 1, "row_loss_grad": 3, "scale_rows": 1}),
    "cosine-gcl-head": (lambda: fastlt.CosineGCLHead(D, C, _COUNTS, backend="triton"), {"seed": 5},
                        {"_normalize_fwd": 2, "row_loss_forward": 1, "torch.mm": 3, "scale_rows": 1,
                         "_normalize_bwd": 2}),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_one_step_launches_only_what_the_math_needs(case, counter, monkeypatch):
    make, kwargs, expected = _CASES[case]
    kwargs = dict(kwargs)
    if not kwargs.pop("own_denom", True):
        monkeypatch.setattr(tiles, "OWN_DENOM_READS", 0)
    if kwargs.pop("fused_rows", None) == 0:
        monkeypatch.setattr(tiles, "FUSED_REDUCE_STEPS", 0)
    criterion = make().to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(N, D if "head" in case else C, generator=gen).to(DEVICE).requires_grad_()
    target = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    criterion(IdentityView.apply(inputs.detach().clone()), target, **kwargs)  # compile; fill the once-per-prior caches
    one = torch.ones((), device=DEVICE)
    counter.counts.clear()
    with counter:
        loss = criterion(IdentityView.apply(inputs), target, **kwargs)
        torch.autograd.backward(loss, one)
    assert dict(counter.counts) == expected
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all()


# --- iNaturalist's 8142 classes on an H100's 132 SMs: the launch plan, kernels stubbed -----------------------------

class _Recorded:
    """A kernel object that records each launch's grid and constexprs and runs nothing (the plan, not the math:
    4096 x 8142 is too big for the interpreter)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch_(**kwargs):
            self.log.append((self.name, tuple(grid), kwargs))
        return launch_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad-in-forward"])
@pytest.mark.parametrize("rows", [512, 4096])
def test_inaturalist_rows_are_one_launch_unsplit(rows, grad_in_forward, dtype, monkeypatch):
    """C = 8142 fits one program (tiles.WHOLE_ROW_BYTES): no column split at any batch (512 x 8142 was 4 splits, 3
    forward launches), and with the gradient in the forward the row is one tile (read once, written once) and a
    step is the forward's one launch (its 'mean' denominator summed by every program at 512 rows, published by the
    first at 4096) plus the backward's rescale by grad_output; recompute: the forward and the gradient."""
    log = []
    for module in (launch, lade_kernels, row_normalize):
        for name in ("row_loss_forward", "row_loss_combine", "row_loss_grad", "scale_rows", "reduce_rows"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _Recorded(name, log))
    monkeypatch.setattr(tiles, "sm_count", lambda device: 132)
    C = 8142
    counts = torch.arange(1, C + 1)
    criterion = fastlt.LogitAdjustedLoss(counts, backend="triton", grad_in_forward=grad_in_forward).to(DEVICE)
    z = torch.zeros(rows, C, dtype=dtype, device=DEVICE)
    target = torch.randint(0, C, (rows,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    loss = criterion(IdentityView.apply(z.requires_grad_()), target)
    torch.autograd.backward(loss, torch.ones((), device=DEVICE))
    names = [name for name, _, _ in log]
    assert names == (["row_loss_forward", "scale_rows"] if grad_in_forward else ["row_loss_forward", "row_loss_grad"])
    _, grid, kw = log[0]
    # one program per row (per two bf16 rows in the recompute mode: tiles.HALF_WIDTH_ROWS), no column split
    assert grid == (rows // kw["BLOCK_M"], 1)
    assert kw["BLOCK_M"] == (2 if dtype == torch.bfloat16 and not grad_in_forward else 1)
    assert kw["REDUCE"] == 2 and not kw["SPLIT"]  # the batch's mean in the same launch
    if grad_in_forward:
        assert kw["SINGLE_TILE"] and kw["BLOCK_N"] >= C and kw["GRAD_IN_FWD"]
        assert kw["DENOM"] == (1 if rows == 512 else 2)  # own / published (kernels/reduce.py)
