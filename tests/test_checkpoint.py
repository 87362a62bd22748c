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
