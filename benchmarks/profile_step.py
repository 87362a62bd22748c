"""Where a fastlt step's time goes: kernel-only times vs the whole autograd step, and host time.

``python benchmarks/profile_step.py [N C dtype]`` on a CUDA machine. Prints do_bench medians of the
forward kernel alone, the backward kernel alone, the full forward+backward step, the host (CPU)
time of one step without synchronisation, the profiler's top host ops, and a cProfile of the Python
side of 200 steps on a tiny batch (64 rows: the GPU is idle, so every microsecond there is host work).
First, the batch reduction in the row kernel's last program against its own launch after it
(:func:`reduce_in_kernel_vs_launch`), at N x C and 512 x C.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch
import triton.testing

from fastlt import functional as LF
from fastlt._bench_harness import floor_ms, graphed, host_ms, long_tail_counts, measure_bandwidth
from fastlt._operator import AdjustedCEArgs
from fastlt.kernels import counters, launch
from fastlt.priors import log_prior


def _graph_replay_ms(fn) -> float:
    """Median ms of a CUDA-graph replay of ``fn`` (device time, no host launch work; the benchmark's capture)."""
    return triton.testing.do_bench(graphed(lambda: fn)(), return_mode="median")


def reduce_in_kernel_vs_launch(N, C, dt, lp) -> None:
    """``launch.loss`` with the batch reduced by the row kernel's last program (the default) against a separate
    ``reduce_rows`` launch (what runs without a counter): device ms in a CUDA graph, eager median ms, host us."""
    y = torch.randint(0, C, (N,), device="cuda")
    z = torch.randn(N, C, device="cuda", dtype=dt)
    gbuf = torch.empty_like(z)
    args = AdjustedCEArgs(log_prior=lp)
    counter = counters.reduce_counter
    for mode, grad_out in (("recompute", None), ("grad-in-forward", gbuf)):
        for where in ("in kernel", "own launch"):
            counters.reduce_counter = counter if where == "in kernel" else (lambda device: None)
            try:
                def fn(grad_out=grad_out):
                    return launch.loss(z, y, args, grad_out=grad_out)
                print(f"{N}x{C} {mode:16s} reduction {where:10s}: graph {_graph_replay_ms(fn) * 1e3:7.1f} us | "
                      f"eager {triton.testing.do_bench(fn, return_mode='median') * 1e3:7.1f} us | "
                      f"host {host_ms(fn, reps=200) * 1e3:6.1f} us")
            finally:
                counters.reduce_counter = counter


def main(N=4096, C=8142, dtype="fp32"):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    bw = measure_bandwidth()
    lp = log_prior(long_tail_counts(C)).cuda()
    y = torch.randint(0, C, (N,), device="cuda")
    z = torch.randn(N, C, device="cuda", dtype=dt, requires_grad=True)
    for rows in dict.fromkeys((N, 512)):
        reduce_in_kernel_vs_launch(rows, C, dt, lp)
    args = AdjustedCEArgs(log_prior=lp)
    cfg = launch.pick_tiles(N, C, z.device)
    loss, lse, factor, _ = launch.forward(z.detach(), y, args)
    go = torch.ones((), device="cuda")
    fwd = triton.testing.do_bench(lambda: launch.forward(z.detach(), y, args), return_mode="median")
    bwd = triton.testing.do_bench(lambda: launch.grad(z.detach(), y, args, lse, factor, go), return_mode="median")
    gbuf = torch.empty_like(z)
    fused = triton.testing.do_bench(lambda: launch.forward(z.detach(), y, args, grad_out=gbuf), return_mode="median")

    def step():
        z.grad = None
        LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton").backward()

    full = triton.testing.do_bench(step, return_mode="median")
    host = host_ms(step, reps=50)
    fl = floor_ms(N, C, dt, bw)
    print(f"{N}x{C} {dtype} config={cfg} floor {fl:.3f} ms")
    print(f"forward kernel(s) {fwd:.3f} ms | backward kernel {bwd:.3f} ms | fused fwd+grad {fused:.3f} ms "
          f"({fused / fl:.2f}x) | full step {full:.3f} ms ({full / fl:.2f}x) | host time per step {host:.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))

    zs = torch.randn(64, C, device="cuda", dtype=dt, requires_grad=True)
    ys = y[:64]

    def small_step():
        zs.grad = None
        LF.logit_adjusted_cross_entropy(zs, ys, lp, backend="triton").backward()

    for _ in range(20):
        small_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        small_step()
    torch.cuda.synchronize()
    print(f"64x{C} {dtype}: {(time.perf_counter() - t0) / 200 * 1e6:.0f} us per step (host-bound)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        small_step()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    a = sys.argv[1:]
    if not torch.cuda.is_available():
        raise SystemExit("profile_step: no CUDA GPU visible (it profiles the GPU kernels' launches)")
    if a and (len(a) != 3 or int(a[0]) < 64 or a[2] not in ("fp32", "bf16")):
        raise SystemExit("usage: profile_step.py [N C fp32|bf16], N >= 64 (the small step takes 64 rows)")
    main(int(a[0]), int(a[1]), a[2]) if a else main()
