"""CUDA-graph capture of a training step with the fused losses (needs a CUDA device: graphs do not exist
in the interpreter; the kernels themselves are tested everywhere in test_kernels_*.py)."""

from __future__ import annotations

import pytest
import torch

from fastlt import functional as LF
from fastlt.priors import gcl_cloud, log_prior, prior

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _capture(step, before_capture=None):
    """``(graph, output)``: ``step`` warmed up twice on a side stream (compiles the kernels outside the capture),
    then captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


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
    graph, captured = _capture(step)
    layer.weight.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
    torch.testing.assert_close(layer.weight.grad, eager_grad)


def test_seed_tensor_redrawn_inside_the_graph_gives_fresh_noise_per_replay():
    """An int seed is baked into a captured graph (every replay draws the same GCL noise); a seed tensor redrawn
    inside the capture (graph-safe CUDA RNG) is read by the kernels on every replay, so the noise is fresh, and
    equals what that seed gives eagerly."""
    gen = torch.Generator().manual_seed(1)
    N, C = 32, 200
    cloud = gcl_cloud(torch.randint(1, 200, (C,), generator=gen)).cuda()
    y = torch.randint(0, C, (N,), generator=gen).cuda()
    x = torch.randn(N, 16, generator=gen).cuda()
    layer = torch.nn.Linear(16, C).cuda()
    seed_t = torch.zeros(1, dtype=torch.int64, device="cuda")

    def step():
        seed_t.random_(0, 2**62)
        out = LF.gcl_cross_entropy(torch.tanh(layer(x)), y, cloud, 0.5, 30.0, 1.0, seed=seed_t, backend="triton")
        out.backward()
        return out

    graph, captured = _capture(step)
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append((int(seed_t.item()), float(captured)))
    assert len({s for s, _ in seen}) == 3 and len({v for _, v in seen}) == 3
    with torch.no_grad():
        eager = LF.gcl_cross_entropy(torch.tanh(layer(x)), y, cloud, 0.5, 30.0, 1.0, seed=seen[-1][0],
                                     backend="triton")
    torch.testing.assert_close(float(eager), seen[-1][1])


@pytest.mark.parametrize("bank", ["counter-bank", "no-bank-yet"])
def test_replays_reduce_each_new_batch_in_the_row_kernel(bank, monkeypatch):
    """The row kernel's last program reduces the batch (a counter slot of the graph's own); replays with new inputs
    in place, with eager steps in between on the same stream, each match eager. With no counter bank yet on the
    device when the capture starts, the capture takes the separate reduction launch instead."""
    from fastlt.kernels import counters

    gen = torch.Generator().manual_seed(2)
    N, C = 300, 1000
    lp = log_prior(torch.randint(1, 200, (C,), generator=gen)).cuda()
    y = torch.randint(0, C, (N,), generator=gen).cuda()
    z = torch.randn(N, C, generator=gen).cuda()

    def step():
        return LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")

    before_capture = None
    if bank == "no-bank-yet":
        # warm up the kernels of the separate reduction (nothing may compile inside the capture), then capture with
        # the real reduce_counter and no bank
        real = counters.reduce_counter
        monkeypatch.setattr(counters, "reduce_counter", lambda device: None)

        def before_capture():
            monkeypatch.setattr(counters, "reduce_counter", real)
            monkeypatch.setattr(counters, "BANKS", {})
    graph, captured = _capture(step, before_capture)
    for k in range(4):
        z.copy_(torch.randn(N, C, generator=gen).cuda() * (k + 1))
        graph.replay()
        eager = step()  # on the default stream, its own counter
        torch.testing.assert_close(captured, eager)
        want = torch.nn.functional.cross_entropy(z + lp, y)
        torch.testing.assert_close(captured, want)
