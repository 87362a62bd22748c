"""Activation checkpointing (``torch.utils.checkpoint``) around a loss that draws GCL's noise seed from torch's
generator: the gradient is that of one noise draw on both backends, as the reference path's (its noise is a saved
tensor, recomputed with the rest), whether or not the recompute restores the generator."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from torch.utils.checkpoint import checkpoint

import fastlt

COUNTS = [50, 20, 9, 4, 2, 1, 1]


@pytest.mark.parametrize("warm", [True, False], ids=["second_call", "first_call"])
@pytest.mark.parametrize("preserve", [True, False], ids=["preserve_rng", "fresh_rng"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gcl_under_checkpoint_takes_the_gradient_of_one_draw(reentrant, preserve, warm):
    """Non-reentrant with ``preserve_rng_state=False``: the recomputed forward draws another seed, and the kernels'
    backward combined its row statistics (saved tensors, recomputed) with the first draw's seed (on ctx): rows of
    the gradient summed to 60-160 instead of 0. The seed is now kept among the saved tensors under such hooks."""
    gen = torch.Generator().manual_seed(0)
    z0 = (0.3 * torch.randn(4, len(COUNTS), generator=gen)).to(DEVICE)
    y = torch.tensor([0, 3, 6, 2], device=DEVICE)
    grads = {}
    for backend in ("torch", "triton"):
        crit = fastlt.GCLLoss(COUNTS, m=0.1, s=30.0, backend=backend)
        if warm:  # a first call: the kernels' later calls reuse their arguments and draw only the seed
            crit(z0, y)
        z = z0.clone().requires_grad_()
        torch.manual_seed(1)
        loss = checkpoint(lambda t: crit(t * 1.0, y), z, use_reentrant=reentrant,  # noqa: B023
                          preserve_rng_state=preserve)
        loss.backward()
        grads[backend] = z.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grads["triton"].sum(1), torch.zeros(4, device=DEVICE), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["la", "gcl", "lade"])
def test_create_graph_under_a_non_reentrant_checkpoint_returns_the_gradient(name):
    """The differentiate-twice guard read the saved tensors a second time after the backward had: a non-reentrant
    checkpoint lets each be unpacked once (CheckpointError). The first-order gradient comes back as documented."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, len(COUNTS), generator=gen).to(DEVICE).requires_grad_()
    y = torch.tensor([0, 3, 6, 2], device=DEVICE)
    crit = {"la": fastlt.LogitAdjustedLoss, "gcl": fastlt.GCLLoss, "lade": fastlt.LADELoss}[name](
        COUNTS, backend="triton")
    kw = dict(seed=4) if name == "gcl" else {}
    loss = checkpoint(lambda t: crit(t * 1.0, y, **kw), z, use_reentrant=False)
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    (want,) = torch.autograd.grad(crit(z * 1.0, y, **kw), z)
    torch.testing.assert_close(grad.detach(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
def test_class_parallel_gcl_under_a_fresh_rng_checkpoint_takes_one_draw():
    """``shard=`` on the kernels: the finish op kept its drawn seed on ctx (a non-tensor input) while the recompute
    replaced its saved row statistics (another draw): gradient rows summed to 156-809. Under saved-tensor hooks the
    seed is now one of its tensor inputs, recomputed with them."""
    from fastlt import functional as LF
    from fastlt.distributed import ClassShard, SimulatedWorld
    from fastlt.priors import gcl_cloud

    counts = [50, 20, 9, 4, 2, 1, 1, 1]
    cloud = gcl_cloud(counts).to(DEVICE)
    z0 = (0.3 * torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).to(DEVICE)
    y = torch.tensor([0, 3, 6, 2], device=DEVICE)
    grads = {}
    for backend in ("torch", "triton"):
        def rank_fn(group, backend=backend):
            shard = ClassShard.balanced(8, group)
            z = z0[:, shard.start:shard.stop].clone().requires_grad_()
            torch.manual_seed(1)
            loss = checkpoint(lambda t: LF.gcl_cross_entropy(t * 1.0, y, cloud, m=0.1, s=30.0, backend=backend,
                                                             shard=shard), z, use_reentrant=False,
                              preserve_rng_state=False)
            loss.backward()
            return z.grad
        grads[backend] = SimulatedWorld(1).run(rank_fn)[0]
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=2e-5, atol=2e-5)
