"""The kernels are torch.library custom ops: torch.compile traces them without graph breaks."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import fastlt
from fastlt import functional as LF
from fastlt.priors import gcl_cloud, log_prior, prior


def _inputs():
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 100, (11,), generator=gen)
    z = torch.randn(6, 11, generator=gen).to(DEVICE)
    y = torch.randint(0, 11, (6,), generator=gen).to(DEVICE)
    return counts, z, y


def test_compile_fullgraph_matches_eager_la_and_gcl():
    counts, z, y = _inputs()
    lp, cloud = log_prior(counts).to(DEVICE), gcl_cloud(counts).to(DEVICE)

    def step(logits):
        la = LF.logit_adjusted_cross_entropy(logits, y, lp, 1.0, backend="triton")
        gcl = LF.gcl_cross_entropy(logits, y, cloud, 0.5, 30.0, 1.0, seed=7, backend="triton")
        return la + 0.1 * gcl

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    eager = step(z1)
    eager.backward()
    got = compiled(z2)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(z2.grad, z1.grad)


def test_compile_fullgraph_lade():
    counts, z, y = _inputs()
    pi = prior(counts).to(DEVICE)
    fn = torch.compile(lambda t: LF.lade_loss(t, y, pi, backend="triton"), fullgraph=True, backend="aot_eager")
    z1 = z.clone().requires_grad_()
    loss = fn(z1)
    loss.backward()
    z2 = z.clone().requires_grad_()
    LF.lade_loss(z2, y, pi, backend="triton").backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_compile_draws_a_fresh_seed_per_call_without_a_graph_break():
    """GCL with seed=None under torch.compile(fullgraph=True): the seed is drawn inside the graph (a host int would
    break the graph, or be baked into it and repeat the same noise every step)."""
    counts, z, y = _inputs()
    cloud = gcl_cloud(counts).to(DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: LF.gcl_cross_entropy(t, y, cloud, 0.5, 30.0, 1.0, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    t = z.tanh().requires_grad_()
    losses = [fn(t) for _ in range(3)]
    assert len({float(v.detach()) for v in losses}) == 3  # fresh noise every call
    losses[0].backward()  # the backward regenerates the forward's noise from the same seed tensor
    assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    torch._dynamo.reset()


def test_loss_ops_pass_opcheck():
    """torch.library.opcheck (schema, autograd registration, fake against real outputs, AOT dispatch with dynamic
    shapes) for the adjusted cross-entropy's op in every reduction, with every flag, and LADE's ops."""
    from fastlt._glue import adjusted_ce_forward_op, lade_forward_op
    from fastlt._operator import AdjustedCEArgs, LadeArgs, flatten
    from fastlt.priors import prior

    counts, z, y = _inputs()
    z = z.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        args = AdjustedCEArgs.from_kwargs(z.device, log_prior=log_prior(counts).to(DEVICE), tau=1.0,
                                          cloud=gcl_cloud(counts).to(DEVICE), noise_mul=0.5, seed=3, margin=0.2,
                                          scale=2.0, gamma=1.0, weight=None, ignore_index=-100, reduction=reduction,
                                          label_smoothing=0.1)
        torch.library.opcheck(adjusted_ce_forward_op, (z, y, *flatten(args)))
    pi = prior(counts).to(DEVICE)
    lade_args = AdjustedCEArgs(log_prior=torch.log(pi))
    torch.library.opcheck(lade_forward_op, (z, y, *flatten(lade_args, LadeArgs(pi, 0.1, 0.1))))
    # a data-parallel rank's LADE pass (fastlt.distributed): PriorCE's sum and LADER's column statistics
    from fastlt._glue import lade_statistics_op

    weight = torch.rand(11, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    rank_args = AdjustedCEArgs(log_prior=torch.log(pi), weight=weight, label_smoothing=0.1, reduction="sum")
    torch.library.opcheck(lade_statistics_op, (z, y, *flatten(rank_args)))


def test_compile_fullgraph_takes_a_scheduled_hyperparameter():
    """A module's float hyperparameter changed between calls (a tau schedule) is traced as a symbol once it
    changes; the argument checks compare it instead of calling ``math.isfinite`` on it, which would break the graph
    (a hard error under ``fullgraph=True``). Each value gives the eager loss and gradient."""
    import fastlt

    counts, z, y = _inputs()
    crit = fastlt.LogitAdjustedLoss(counts, backend="triton").to(DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: crit(t, y), fullgraph=True, backend="aot_eager")
    for tau in (1.0, 0.5, 0.25):
        crit.tau = tau
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        got = fn(z1)
        got.backward()
        eager = crit(z2, y)
        eager.backward()
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(z1.grad, z2.grad)


def test_compile_fullgraph_with_grad_in_forward_and_two_batch_sizes():
    """A compiled step of a loss module with grad_in_forward=True runs the recompute op: the second batch size (a
    dynamic shape) compiled without error (the overlap check sorted symbolic strides: Dynamo refused), and the
    results are eager's."""
    import fastlt

    counts, _, _ = _inputs()
    crit = fastlt.LogitAdjustedLoss(counts, backend="triton", grad_in_forward=True).to(DEVICE)
    plain = fastlt.LogitAdjustedLoss(counts, backend="triton").to(DEVICE)
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 11).to(DEVICE)
    compiled = torch.compile(lambda x, y: crit(lin(x), y), fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    for n in (6, 4, 3):
        x, y = torch.randn(n, 5, generator=gen).to(DEVICE), torch.randint(0, 11, (n,), generator=gen).to(DEVICE)
        lin.zero_grad()
        got = compiled(x, y)
        got.backward()
        grad = lin.weight.grad.clone()
        lin.zero_grad()
        want = plain(lin(x), y)
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, lin.weight.grad)


def test_compile_fullgraph_first_call_inside_a_checkpoint_and_gcl_spread(monkeypatch):
    """A compiled step whose first call (a fresh module, nothing asked yet) runs the loss inside
    ``torch.utils.checkpoint``: Dynamo refuses any attribute or global set inside a checkpointed region, and the
    modules' argument cache, the backend's answers and the glue's import were set at their first call there. GCL's
    noise_mul other than 0 and 1 (the official recipe's 0.5) compiled after an eager call: it guarded on the cloud's
    version ('data-dependent expression'). Each against eager."""
    from torch.utils.checkpoint import checkpoint

    import fastlt
    from fastlt import _backend
    from fastlt import functional as F_

    for name in ("_AVAILABLE", "_INTERPRETING"):
        monkeypatch.setattr(_backend, name, None)
    monkeypatch.setattr(F_, "_GLUE", None)
    counts, _, _ = _inputs()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=gen).to(DEVICE)
    y = torch.randint(0, 11, (6,), generator=gen).to(DEVICE)
    makers = {
        "la": lambda: fastlt.LogitAdjustedLoss(counts, backend="triton"),
        "gcl": lambda: fastlt.GCLLoss(counts, s=8.0, noise_mul=0.5, backend="triton"),
        "lade": lambda: fastlt.LADELoss(counts, backend="triton"),
    }
    for name, make in makers.items():
        torch.manual_seed(0)
        lin = torch.nn.Linear(5, 11).to(DEVICE)
        crit = make().to(DEVICE)
        kw = {"seed": 3} if name == "gcl" else {}

        def loss_of(a, b, lin=lin, crit=crit, kw=kw):
            z = lin(a)
            return crit(torch.tanh(z) if "seed" in kw else z, b, **kw)

        compiled = torch.compile(lambda a, b, f=loss_of: checkpoint(f, a, b, use_reentrant=False), fullgraph=True,
                                 backend="aot_eager")
        got = compiled(x, y)
        got.backward()
        grad = lin.weight.grad.clone()
        lin.zero_grad()
        want = loss_of(x, y)
        want.backward()
        torch.testing.assert_close(got, want, msg=name)
        torch.testing.assert_close(grad, lin.weight.grad, msg=name)
        if name == "gcl":  # compiled again after eager calls, at another batch size
            torch.testing.assert_close(torch.compile(loss_of, fullgraph=True, backend="aot_eager")(x[:4], y[:4]),
                                       loss_of(x[:4], y[:4]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_int_seed_that_changes_every_call_compiles_once_more(backend):
    """``seed=step`` on the kernels was a constant of the custom op: every new value compiled the step again, and
    with ``fullgraph=True`` step 8 hit the recompile limit. A given int is now a tensor of the graph (Dynamo makes it
    a symbol at its first change: one recompile); each step equals eager."""
    import torch._dynamo.testing

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(4, 8, generator=gen).tanh().to(DEVICE)
    y = torch.randint(0, 8, (4,), generator=gen).to(DEVICE)
    crit = fastlt.GCLLoss([50, 30, 20, 10, 5, 3, 2, 1], backend=backend)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(crit, backend=counter, fullgraph=True)
    for step in range(10):
        torch.testing.assert_close(compiled(z, y, seed=step), crit(z, y, seed=step), rtol=1e-5, atol=1e-5)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("name", ["m", "gamma", "s"])
def test_a_float_schedule_on_the_reference_path_compiles_once_more(name, head):
    """On the reference path a scheduled float is an input of the graph after its first change (README). GCL's m
    (a range check and torch.full on it) and gamma (Tensor.pow of it) were made constants: each new value compiled
    the step again, and with fullgraph=True the 9th hit the recompile limit. Each step equals eager."""
    import torch._dynamo.testing

    gen = torch.Generator().manual_seed(4)
    counts = [50, 30, 20, 10, 5, 3, 1]
    if head:  # the cosine head: its m (gamma and s alike)
        crit = fastlt.CosineGCLHead(5, 7, counts, noise_mul=0.0, gamma=0.5, backend="torch")
        x = torch.randn(6, 5, generator=gen)
    else:
        crit = fastlt.GCLLoss(counts, gamma=0.5, backend="torch")
        x = torch.randn(6, 7, generator=gen).tanh()
    y = torch.randint(0, 7, (6,), generator=gen)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(crit, backend=counter, fullgraph=True)
    for step in range(1, 11):
        setattr(crit, name, {"m": 0.05, "gamma": 0.25, "s": 3.0}[name] * step)
        kw = {} if head else dict(seed=1)
        torch.testing.assert_close(compiled(x, y, **kw), crit(x, y, **kw), rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2


def test_a_compiled_kernels_step_before_any_eager_one_compiles_once():
    """The first kernels call of a process compiled (before any eager one) guarded on the glue module's global being
    unset; the first eager call set it, and the compiled step compiled again. A fresh process, so that nothing has
    imported the glue yet."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        import torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        import torch._dynamo.testing
        import fastlt
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        crit = fastlt.LogitAdjustedLoss([50, 30, 20, 10, 5, 3, 1], backend="triton")
        x, y = torch.randn(6, 7, device=dev), torch.randint(0, 7, (6,), device=dev)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        f = torch.compile(crit, fullgraph=True, backend=counter)
        f(x, y)
        crit(x, y)
        f(x, y)
        print("frames", counter.frame_count)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frames 1" in out.stdout, out.stdout + out.stderr[-2000:]


def test_the_backend_answers_are_marked_as_torch_marks_a_constant_result():
    """``fastlt._backend`` marks ``kernels_available`` and ``interpreting`` as constant results without importing
    ``torch._dynamo`` (~1.1 s of ``import fastlt``): the mark must be what ``torch.compiler.assume_constant_result``
    makes (if torch changes how it marks, this fails), and ``import fastlt`` alone leaves ``torch._dynamo``
    unimported (a fresh process)."""
    import subprocess
    import sys

    from fastlt import _backend

    def probe():
        return 0

    marked = dict(torch.compiler.assume_constant_result(probe).__dict__)
    assert marked and all(_backend.kernels_available.__dict__.get(k) == v for k, v in marked.items())
    assert all(_backend.interpreting.__dict__.get(k) == v for k, v in marked.items())
    code = "import sys, fastlt; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
