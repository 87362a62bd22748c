"""CUDA-graph capture of a training step with the fused losses (needs a CUDA device: graphs do not exist
in the interpreter; the kernels themselves are tested everywhere in test_kernels_*.py)."""

from __future__ import annotations

import pytest
import torch

from fastlt import functional as LF
from fastlt.priors import gcl_cloud, log_prior, prior

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.mark.parametrize("loss", ["la", "gcl", "lade", "la_grad_in_forward"])
def test_capture_and_replay_matches_eager(loss):
    gen = torch.Generator().manual_seed(0)
    N, C = 64, 300
    counts = torch.randint(1, 200, (C,), generator=gen)
    lp, cloud, pi = log_prior(counts).cuda(), gcl_cloud(counts).cuda(), prior(counts).cuda()
    y = torch.randint(0, C, (N,), generator=gen).cuda()
    x = torch.randn(N, 32, generator=gen).cuda()
    layer = torch.nn.Linear(32, C).cuda()

    def step():
        layer.zero_grad(set_to_none=False)
        z = layer(x)
        if loss == "la":
            out = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
        elif loss == "la_grad_in_forward":
            out = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton", grad_in_forward=True)
        elif loss == "gcl":
            out = LF.gcl_cross_entropy(torch.tanh(z), y, cloud, 0.5, 30.0, 1.0, seed=11, backend="triton")
        else:
            out = LF.lade_loss(z, y, pi, backend="triton")
        out.backward()
        return out

    eager = step().detach().clone()
    eager_grad = layer.weight.grad.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compiles the kernels) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    layer.weight.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
    torch.testing.assert_close(layer.weight.grad, eager_grad)
