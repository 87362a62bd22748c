"""The fused heads under torch.compile: custom ops (fastlt.heads.glue) with registered autograd, no graph break,
the same loss and gradients as the eager fused path (every path: one chunk, row chunks, class chunks, 'none',
the cosine normalisation, LADE, frozen features)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import fastlt
from fastlt._operator import AdjustedCEArgs, ChunkPlan, LadeArgs, Needs, flatten
from fastlt.heads import cosine_cross_entropy, linear_cross_entropy
from fastlt.heads import glue as H
from fastlt.lade_head import lade_linear_loss
from fastlt.priors import gcl_cloud, log_prior, prior

N, D, C = 10, 12, 40


def _data(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 60, (C,), generator=gen)
    x = torch.randn(N, D, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(C, D, generator=gen) / D**0.5).to(DEVICE, dtype)
    b = (0.1 * torch.randn(C, generator=gen)).to(DEVICE, dtype)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    y[3] = -100  # an ignored row
    return counts, x, w, b, y


def _leaves(*ts, grad=(True,) * 3):
    return [t.detach().clone().requires_grad_(g) if t is not None else None for t, g in zip(ts, grad, strict=True)]


def _run(fn, leaves, upstream):
    """``fn(*leaves)``, backpropagated with ``upstream`` (a scalar, or per-row weights for 'none');
    returns the loss and the leaves' gradients."""
    loss = fn(*leaves)
    (loss * upstream).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _check_compiled(fn, tensors, upstream, grad=(True,) * 3):
    """Compiled (fullgraph, no graph break) against eager: the same loss and gradients, bit for bit or nearly
    (the same kernels run on the same inputs)."""
    torch._dynamo.reset()
    eager_loss, eager_grads = _run(fn, _leaves(*tensors, grad=grad), upstream)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got_loss, got_grads = _run(compiled, _leaves(*tensors, grad=grad), upstream)
    torch.testing.assert_close(got_loss, eager_loss)
    for got, want, g in zip(got_grads, eager_grads, grad, strict=True):
        if g:
            assert got is not None and got.abs().sum() > 0
            torch.testing.assert_close(got, want)
        else:
            assert got is None
    torch._dynamo.reset()


@pytest.mark.parametrize("chunks", [{}, {"chunk_rows": 4}, {"chunk_classes": 16}], ids=["one", "rows", "classes"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_head_compiled_matches_eager(chunks, reduction):
    counts, x, w, b, y = _data(1)
    lp = log_prior(counts).to(DEVICE)
    upstream = torch.tensor(2.5, device=DEVICE) if reduction == "mean" else torch.rand(N, device=DEVICE) + 0.5

    def fn(x, w, b):
        return linear_cross_entropy(x, w, y, b, log_prior=lp, tau=1.0, reduction=reduction, label_smoothing=0.1,
                                    backend="triton", **chunks)

    _check_compiled(fn, (x, w, b), upstream)


@pytest.mark.parametrize("chunks", [{}, {"chunk_classes": 16}], ids=["one", "classes"])
def test_cosine_gcl_head_compiled_matches_eager_with_frozen_features(chunks):
    """GCL's stage 2 re-trains the classifier only: no gradient for the features (need_x False in the op)."""
    counts, x, w, _, y = _data(2)
    cloud = gcl_cloud(counts).to(DEVICE)

    def fn(x, w, _):
        return cosine_cross_entropy(x, w, y, cloud=cloud, noise_mul=0.5, seed=11, margin=0.1, scale=20.0, gamma=1.0,
                                    backend="triton", **chunks)

    _check_compiled(fn, (x, w, None), torch.tensor(1.0, device=DEVICE), grad=(False, True, False))
    _check_compiled(fn, (x, w, None), torch.tensor(0.5, device=DEVICE), grad=(True, True, False))


@pytest.mark.parametrize("chunks", [{}, {"chunk_rows": 4}, {"chunk_classes": 16}], ids=["one", "rows", "classes"])
def test_lade_head_compiled_matches_eager(chunks):
    counts, x, w, b, y = _data(3)
    pi = prior(counts).to(DEVICE)

    def fn(x, w, b):
        return lade_linear_loss(x, w, y, pi, b, alpha=0.1, remine_lambda=0.1, backend="triton", **chunks)

    _check_compiled(fn, (x, w, b), torch.tensor(-1.5, device=DEVICE))


def test_head_modules_compile_inside_a_model_without_graph_breaks():
    """``torch.compile(model)`` with a head inside: one graph, training step and no-grad inference alike; the
    loss and the parameters' gradients match the eager model."""
    counts, x, _, _, y = _data(4)

    class Model(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.body = torch.nn.Linear(D, D)
            self.head = head

        def forward(self, x, y, **kw):
            return self.head(torch.relu(self.body(x)), y, **kw)

    heads = [fastlt.LinearLossHead(D, C, counts, loss="la", backend="triton"),
             fastlt.LinearLossHead(D, C, counts, loss="lade", backend="triton"),
             fastlt.CosineGCLHead(D, C, counts, backend="triton")]
    for head in heads:
        torch.manual_seed(0)
        model = Model(head).to(DEVICE)
        # GCL draws its seed from torch's generator eagerly and on the device under compile: compare a fixed seed
        kw = {"seed": 5} if isinstance(head, fastlt.CosineGCLHead) else {}
        torch._dynamo.reset()
        explain = torch._dynamo.explain(model)(x, y, **kw)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        eager = model(x, y, **kw)
        eager.backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        got = compiled(x, y, **kw)
        got.backward()
        torch.testing.assert_close(got, eager)
        for p, g in zip(model.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, g)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, y, **kw), eager.detach())
    torch._dynamo.reset()


def test_compiled_cosine_head_draws_fresh_noise_per_call():
    """seed=None under compile: the seed is an op of the graph, so every call of the compiled head gets new noise
    (a host int would be baked into the graph)."""
    counts, x, w, _, y = _data(5)
    head = fastlt.CosineGCLHead(D, C, counts, noise_mul=1.0, backend="triton").to(DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(lambda f: head(f, y), fullgraph=True, backend="aot_eager")
    losses = [fn(x) for _ in range(3)]
    assert len({float(v.detach()) for v in losses}) == 3
    losses[0].backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    torch._dynamo.reset()


@pytest.mark.parametrize("need", [(True, True, True), (False, True, False), (False, False, False)],
                         ids=["all", "weight", "none"])
@pytest.mark.parametrize("chunks", [(3, 0), (10, 16)], ids=["rows", "classes"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_head_ops_pass_opcheck(reduction, chunks, need):
    """torch.library.opcheck: schema, autograd registration, the fake (meta) outputs against the real ones and
    AOT dispatch with dynamic shapes, for the linear head's op in every mode (which gradients, row or class chunks,
    per-row losses), the LADE head's and the normalisation's."""
    counts, x, w, b, y = _data(6)
    lp = log_prior(counts).to(DEVICE)
    x, w, b = (t.detach().requires_grad_(g) for t, g in zip((x, w, b), need, strict=True))
    args = AdjustedCEArgs.from_kwargs(x.device, log_prior=lp, tau=1.0, cloud=gcl_cloud(counts).to(DEVICE),
                                      noise_mul=0.5, seed=3, margin=0.2, scale=2.0, gamma=0.0, weight=None,
                                      ignore_index=-100, reduction=reduction, label_smoothing=0.1)
    plan = ChunkPlan(rows=chunks[0], classes=chunks[1] or None)
    torch.library.opcheck(H.linear_head_forward_op, (x, w, b, y, *flatten(args, plan, Needs(*need))))
    if reduction == "mean":
        pi = prior(counts).to(DEVICE)
        lade_args = AdjustedCEArgs(log_prior=torch.log(pi), label_smoothing=0.0, ignore_index=-100)
        torch.library.opcheck(H.lade_head_forward_op,
                              (x, w, b, y, *flatten(lade_args, LadeArgs(pi, 0.1, 0.1), plan, Needs(*need))))
    if need == (True, True, True) and chunks[1] == 0:
        torch.library.opcheck(H.normalize_rows_op, (x, 1e-12))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_heads_take_every_batch_size_in_one_graph(reduction):
    """The chunk plan was chosen from the traced batch size, which guarded on it: a dynamic graph compiled again for
    every N until the recompile limit, and torch.export refused a dynamic N. The op now chooses it from its real
    tensors (ChunkPlan rows 0): one graph for every N, with eager's values and gradients. (An eager call between
    compiled ones compiled again too: the backend's answers guarded on their globals.)"""
    import torch._dynamo.testing

    counts = [50, 20, 10, 5, 2, 1, 1, 1]
    torch._dynamo.reset()
    for loss in (["la", "lade"] if reduction == "mean" else ["la"]):
        head = fastlt.LinearLossHead(6, 8, counts, loss=loss, reduction=reduction, backend="triton").to(DEVICE)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        step = torch.compile(lambda x, y, head=head: head(x, y).sum(), backend=counter, dynamic=True, fullgraph=True)
        frames = []
        for N in (2, 3, 5, 9):
            gen = torch.Generator().manual_seed(N)
            x = torch.randn(N, 6, generator=gen).to(DEVICE).requires_grad_()
            y = torch.randint(0, 8, (N,), generator=gen).to(DEVICE)
            loss_c = step(x, y)
            loss_c.backward()
            x2 = x.detach().clone().requires_grad_()
            loss_e = head(x2, y).sum()
            loss_e.backward()
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
            frames.append(counter.frame_count)
        assert frames == frames[:1] * 4, (loss, frames)  # nothing compiled again (eager calls between included)
        torch._dynamo.reset()
