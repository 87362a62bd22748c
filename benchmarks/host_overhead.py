"""Host (CPU) time of one loss step with the kernel launches stubbed out: the Python and autograd work that a small
batch pays whatever the GPU does. Runs anywhere, no GPU: ``python benchmarks/host_overhead.py [N C]``.

Prints microseconds per step (best of 7 rounds of 1000, the cases taking turns) for each loss module's forward +
backward on CPU tensors, its ratio to ``F.cross_entropy`` forward + backward on a 2 x 8 CPU tensor timed in the same
run (PyTorch's own loss: the goal is 2x), and a bare autograd Function doing nothing (PyTorch's floor for any custom
Function on this machine). The
CPU-only target range check is skipped, as it is for CUDA tensors. Triton's own launcher (argument binding, ~20 us
per launch of the row kernel with triton 3.9) is not included: the stubs replace it. Then the fused heads' steps
(their matmuls on the CPU), alone and two in one step. Launch counts: ``tests/test_launch_counts.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel modules import without a GPU

import torch  # noqa: E402

import fastlt  # noqa: E402
import fastlt._validation as V  # noqa: E402
from fastlt._bench_harness import GradSink, best_in_turns  # noqa: E402
from fastlt.kernels import lade as lade_kernels  # noqa: E402
from fastlt.kernels import launch  # noqa: E402


class _NoLaunch:
    """A kernel object whose launches do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _Bare(torch.autograd.Function):
    """Two allocations, one stub launch each way: what any fused loss Function costs at least."""

    @staticmethod
    def forward(ctx, z, y):
        rows = torch.empty(z.shape[0])
        ctx.save_for_backward(z, y, rows)
        return torch.empty(())

    @staticmethod
    def backward(ctx, grad):
        z, _, _ = ctx.saved_tensors
        return torch.empty_like(z), None


def _best_us(*steps, reps: int = 1000, repeat: int = 7) -> list[float]:
    """Best microseconds per call of each of ``steps`` over ``repeat`` rounds of ``reps`` calls, in turns."""
    return [t * 1e6 for t in best_in_turns(*steps, reps=reps, repeat=repeat, warmup=100)]


def main(N: int = 64, C: int = 512, threads: int = 1) -> None:
    # One intra-op thread: a step on CUDA tensors runs none of torch's CPU parallel regions, but on CPU tensors even
    # a 2 x 8 F.cross_entropy backward enters one, and waking a second OpenMP thread cost 60-180 us a step on a
    # 2-core machine (29 us with one thread, 98-213 us with two): the baseline, not the host path, was timed.
    torch.set_num_threads(threads)
    for name in ("row_loss_forward", "row_loss_combine", "row_loss_grad", "scale_rows", "reduce_rows"):
        setattr(launch, name, _NoLaunch())
    lade_kernels.lade_columns = _NoLaunch()
    V.check_target = lambda *args, **kwargs: None
    torch.manual_seed(0)
    counts = torch.randint(1, 100, (C,))
    z = torch.randn(N, C, requires_grad=True)
    y = torch.randint(0, C, (N,))
    cases = {
        "LogitAdjustedLoss": fastlt.LogitAdjustedLoss(counts, backend="triton"),
        "GCLLoss": fastlt.GCLLoss(counts, backend="triton"),
        "LADELoss": fastlt.LADELoss(counts, backend="triton"),
        "bare autograd Function": _Bare.apply,
    }
    z_small, y_small = torch.randn(2, 8, requires_grad=True), torch.randint(0, 8, (2,))

    def cross_entropy():  # PyTorch's own loss on a 2 x 8 CPU tensor: its host path, next to no arithmetic
        torch.nn.functional.cross_entropy(GradSink.apply(z_small), y_small).backward()

    def step_of(criterion):
        def step():
            criterion(GradSink.apply(z), y).backward()  # a layer's output; its gradient dropped
        return step

    base, *measured = _best_us(cross_entropy, *(step_of(c) for c in cases.values()))
    times = dict(zip(cases, measured, strict=True))
    print(f"host time per forward + backward, {N} x {C}, kernels stubbed (torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread{'s' if torch.get_num_threads() > 1 else ''})")
    print(f"  {'F.cross_entropy (2 x 8)':24s} {base:7.1f} us")
    for name, us in times.items():
        print(f"  {name:24s} {us:7.1f} us   {us / base:.1f}x F.cross_entropy")
    _heads(N, C, counts, y)


def _heads(N: int, C: int, counts: torch.Tensor, y: torch.Tensor, D: int = 32) -> None:
    """The fused heads' steps likewise, (N, D) features -> C classes (their matmuls run on the CPU: tiny), and two
    heads in one step (each keeps its own arguments)."""
    from fastlt.kernels import row_normalize

    row_normalize._normalize_fwd = row_normalize._normalize_bwd = _NoLaunch()
    x = torch.randn(N, D, requires_grad=True)
    linear = fastlt.LinearLossHead(D, C, counts, loss="la", backend="triton")
    cosine = fastlt.CosineGCLHead(D, C, counts, backend="triton")
    lade = fastlt.LinearLossHead(D, C, counts, loss="lade", backend="triton")
    cases = {
        "LinearLossHead": lambda: linear(GradSink.apply(x), y).backward(),
        "CosineGCLHead": lambda: cosine(GradSink.apply(x), y).backward(),
        "LinearLossHead 'lade'": lambda: lade(GradSink.apply(x), y).backward(),
        "Linear + Cosine heads": lambda: (linear(GradSink.apply(x), y) + cosine(GradSink.apply(x), y)).backward(),
    }
    times = _best_us(*cases.values(), reps=300)
    print(f"fused heads, {N} x {D} -> {C}, kernels stubbed, matmuls on the CPU")
    for name, us in zip(cases, times, strict=True):
        print(f"  {name:24s} {us:7.1f} us")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("N", type=int, nargs="?", default=64, help="rows (default %(default)s)")
    parser.add_argument("C", type=int, nargs="?", default=512, help="classes (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's intra-op threads (default %(default)s: a CUDA step's host path uses none)")
    a = parser.parse_args()
    main(a.N, a.C, a.threads)
