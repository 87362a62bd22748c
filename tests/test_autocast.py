"""The losses under ``torch.autocast``: float32 out, as ``nn.CrossEntropyLoss`` there (autocast runs
``cross_entropy`` in float32), on both backends, with the half-precision logits read as they are; the gradient in
the logits' dtype. A loss in the logits' half dtype was rounded to 3 digits (bf16), and a ``GradScaler``'s 2^16 was
inf on its way into an fp16 loss's backward: every step at that scale was skipped."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import fastlt
from fastlt import functional as LF

COUNTS = [60, 25, 10, 4, 2, 1, 1]
C = len(COUNTS)


def _criteria(backend):
    return {"la": fastlt.LogitAdjustedLoss(COUNTS, backend=backend),
            "ldam": fastlt.LDAMLoss(COUNTS, backend=backend),
            "gcl": fastlt.GCLLoss(COUNTS, gamma=1.0, backend=backend),
            "lade": fastlt.LADELoss(COUNTS, backend=backend),
            "none": fastlt.LogitAdjustedLoss(COUNTS, reduction="none", label_smoothing=0.1, backend=backend)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(_criteria("torch")))
def test_a_loss_under_autocast_is_float32(name, backend, dtype):
    gen = torch.Generator().manual_seed(4)
    z32 = torch.randn(5, C, generator=gen).tanh().to(DEVICE)
    y = torch.randint(0, C, (5,), generator=gen).to(DEVICE)
    crit = _criteria(backend)[name].to(DEVICE)
    kw = dict(seed=9) if name == "gcl" else {}
    z = z32.to(dtype).requires_grad_()
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        loss = crit(z, y, **kw)
    assert loss.dtype == torch.float32
    want = crit(z.detach().float(), y, **kw)  # the same half-precision values, in float32
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=2e-6)
    # a GradScaler's first scale, 2^16 (over the logit scale s: a gradient s times larger overflows fp16 as
    # F.cross_entropy(s * z)'s does, and the scaler backs off): an fp16 loss made it inf on the way in
    (2.0**16 / getattr(crit, "s", 1.0) * loss.sum()).backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
    outside = crit(z.detach(), y, **kw)  # without autocast: the logits' dtype, as before
    assert outside.dtype == dtype


@pytest.mark.parametrize("kind", ["la", "la_none", "lade", "cosine"])
def test_a_compiled_head_under_autocast_is_float32_and_takes_a_grad_scale(kind):
    """Compiled, the heads' ops returned the loss in the autocast dtype and the float32 cast came after it (rounded:
    2.65625 for 2.658976 in bf16, inf for a 'sum' above 65504 in fp16), and the backward cast a GradScaler's 2^16
    to fp16 (inf gradients). The ops now return float32 and scale fp16 gradients in float32."""
    gen = torch.Generator().manual_seed(5)
    f32 = torch.randn(6, 4, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (6,), generator=gen).to(DEVICE)
    torch.manual_seed(0)
    if kind == "cosine":
        head = fastlt.CosineGCLHead(4, C, COUNTS, s=1.0, backend="triton")
    else:
        head = fastlt.LinearLossHead(4, C, COUNTS, loss=kind.split("_")[0], backend="triton",
                                     reduction="none" if kind.endswith("none") else "mean")
    head = head.to(DEVICE)
    call = (lambda f: head(f, y, seed=3)) if kind == "cosine" else (lambda f: head(f, y))
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (call, compiled):
        head.zero_grad()
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.float16):
            loss = fn(f32)
        assert loss.dtype == torch.float32
        (2.0**16 / head.s * loss.mean()).backward()  # (a gradient s times larger overflows fp16 as nn.Linear's)
        if kind != "cosine":  # (the normalisation's backward, 1 / |w_j| larger, may overflow fp16 there: alike)
            assert torch.isfinite(head.weight.grad).all()
        results.append((loss.detach(), head.weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("loss,how,backend", [  # (LADE under shard= runs on the reference path only)
    (loss, how, backend) for loss in ("la", "lade") for how in ("dp_group", "shard") for backend in ("torch", "triton")
    if not (loss == "lade" and how == "shard" and backend == "triton")])
def test_the_distributed_paths_under_autocast_give_one_process_loss_in_float32(loss, how, backend):
    """Two simulated ranks, split by rows (``dp_group``) or by classes (``shard``): the loss of one process under the
    same autocast, in float32. LADE with ``dp_group`` came back in the autocast dtype (an fp16 'sum' above 65504:
    inf), and the sharded reference formed its adjusted logits in it (8e-2 off one process's loss at s = 30)."""
    from fastlt.distributed import ClassShard, SimulatedWorld
    from fastlt.priors import log_prior, prior

    gen = torch.Generator().manual_seed(6)
    z = torch.randn(6, 8, generator=gen)
    z[:, 0] = 3e4  # every row's loss ~3e4: their sum is past fp16's range
    z = z.to(torch.float16).to(DEVICE)
    y = torch.randint(1, 8, (6,), generator=gen).to(DEVICE)
    counts = [50, 30, 20, 10, 5, 3, 2, 1]
    pi, lp = prior(counts).to(DEVICE), log_prior(counts).to(DEVICE)

    def fn(a, t, **kw):
        if loss == "lade":
            return LF.lade_loss(a, t, pi, reduction="sum", backend=backend, **kw)
        return LF.logit_adjusted_cross_entropy(a, t, lp, reduction="sum", backend=backend, **kw)

    def rank_fn(group):
        if how == "dp_group":
            return fn(z[3 * group.rank:3 * group.rank + 3], y[3 * group.rank:3 * group.rank + 3], dp_group=group)
        shard = ClassShard.balanced(8, group)
        return fn(z[:, shard.start:shard.stop], y, shard=shard)

    with torch.autocast(torch.device(DEVICE).type, dtype=torch.float16):
        one = fn(z, y)
        ranks = SimulatedWorld(2).run(rank_fn)
    assert one.dtype == torch.float32 and one > 65504
    for got in ranks:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
