"""Class-index targets that are strided views (``labels[:, 0]`` of an (N, 2) label tensor, ``y[::2]``): every Triton
entry point gives the loss and gradients of the same targets made contiguous, equal to the reference's. The kernels
read row i's target at offset i; a strided view used to be read as other rows' targets (a wrong loss, no error)."""

import pytest
import torch
from conftest import DEVICE, long_tail_counts

import fastlt
from fastlt import functional as LF
from fastlt import heads as H
from fastlt.priors import gcl_cloud, log_prior, prior

N, C, D = 7, 13, 6


def _strided_targets(gen, dtype=torch.int64):
    """(N,) targets as column 0 of an (N, 2) tensor (stride 2), one row ignored; and a contiguous copy."""
    labels = torch.randint(0, C, (N, 2), generator=gen)
    labels[:, 1] = (labels[:, 0] + 5) % C  # other classes: reading them instead changes the loss
    labels[3, 0] = -100
    y = labels.to(DEVICE, dtype)[:, 0]
    assert not y.is_contiguous()
    return y, y.contiguous()


def _losses(gen):
    counts = long_tail_counts(C, gen)
    lp, cloud, pi = log_prior(counts), gcl_cloud(counts), prior(counts)
    return {
        "functional la": lambda z, y: LF.logit_adjusted_cross_entropy(z, y, lp.to(DEVICE), 0.8, backend="triton"),
        "functional gcl": lambda z, y: LF.gcl_cross_entropy(z, y, cloud.to(DEVICE), 0.2, 8.0, 0.5, seed=11,
                                                            backend="triton"),
        "functional lade": lambda z, y: LF.lade_loss(z, y, pi.to(DEVICE), 0.2, backend="triton"),
        "LogitAdjustedLoss": fastlt.LogitAdjustedLoss(counts, backend="triton").to(DEVICE),
        "LDAMLoss": fastlt.LDAMLoss(counts, s=8.0, backend="triton").to(DEVICE),
        "GCLLoss seeded": lambda z, y, m=fastlt.GCLLoss(counts, s=8.0, backend="triton").to(DEVICE): m(z, y, seed=5),
        "LADELoss": fastlt.LADELoss(counts, backend="triton").to(DEVICE),
    }


def _assert_same_as_contiguous(run, inputs, y, y_dense):
    """``run(inputs', target)`` with the strided ``y`` and with ``y_dense``: the same loss and input gradient."""
    got = []
    for target in (y, y_dense):
        x = inputs.clone().requires_grad_()
        out = run(x, target)
        out.backward()
        got.append((out.detach(), x.grad))
    torch.testing.assert_close(got[0][0], got[1][0], rtol=0, atol=0)
    torch.testing.assert_close(got[0][1], got[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["functional la", "functional gcl", "functional lade", "LogitAdjustedLoss",
                                  "LDAMLoss", "GCLLoss seeded", "LADELoss"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_losses_read_strided_targets_as_their_rows(name, dtype):
    gen = torch.Generator().manual_seed(3)
    loss = _losses(gen)[name]
    y, y_dense = _strided_targets(gen, dtype)
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    _assert_same_as_contiguous(loss, z, y, y_dense)
    ref = fastlt.LogitAdjustedLoss(torch.ones(C), tau=0.0, backend="torch")  # plain CE: the rows' targets matter
    zc = z.cpu().double()
    assert not torch.allclose(ref(zc, y_dense.cpu()), ref(zc, y_dense.cpu().roll(1)))


@pytest.mark.parametrize("head", ["linear", "cosine", "lade"])
def test_heads_read_strided_targets_as_their_rows(head):
    gen = torch.Generator().manual_seed(4)
    counts = long_tail_counts(C, gen)
    y, y_dense = _strided_targets(gen)
    f = torch.randn(N, D, generator=gen).to(DEVICE)
    w = torch.randn(C, D, generator=gen).to(DEVICE)
    if head == "linear":
        def run(x, target):
            return H.linear_cross_entropy(x, w, target, log_prior=log_prior(counts).to(DEVICE), backend="triton",
                                          chunk_rows=4)
    elif head == "cosine":
        def run(x, target):
            return H.cosine_cross_entropy(x, w, target, cloud=gcl_cloud(counts).to(DEVICE), noise_mul=0.5, seed=2,
                                          scale=8.0, backend="triton", chunk_rows=4)
    else:
        def run(x, target):
            return H.lade_linear_loss(x, w, target, prior(counts).to(DEVICE), backend="triton", chunk_rows=4)
    _assert_same_as_contiguous(run, f, y, y_dense)
