"""A/B of the column loops' software pipelining on a GPU: forward + backward of LA and GCL (and LADE) with the
loops pipelined (``num_stages`` 3, the default: ``tl.range(..., num_stages=3)``, async copies) and not (1: the loop
form before issue 17). ``python benchmarks/ab_stages.py`` prints median ms per shape, both ways, and the ratio.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("ab_stages: no CUDA GPU visible; nothing measured")
        return 0
    import triton.testing

    import fastlt
    from fastlt._bench_harness import GradSink, long_tail_counts
    from fastlt.kernels import tiles

    shapes = [(4096, 8142, torch.float32), (4096, 131072, torch.bfloat16), (1024, 1_000_000, torch.bfloat16)]
    print(f"# {torch.cuda.get_device_name(0)}: median ms, forward + backward")
    print("| loss | N x C | dtype | stages 1 | stages 3 | 3 / 1 |\n|---|---|---|---|---|---|")
    for N, C, dtype in shapes:
        counts = long_tail_counts(C)
        y = torch.randint(0, C, (N,), device="cuda")
        z = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
        losses = {"la": fastlt.LogitAdjustedLoss(counts, backend="triton").cuda(),
                  "gcl": fastlt.GCLLoss(counts, backend="triton").cuda(),
                  "lade": fastlt.LADELoss(counts, backend="triton").cuda()}
        for name, crit in losses.items():
            times = {}
            for stages in (1, 3):
                tiles.DEFAULT_STAGES = stages
                tiles._pick_tiles.cache_clear()

                def step(crit=crit, name=name, z=z, y=y):
                    loss = crit(GradSink.apply(z), y, seed=1) if name == "gcl" else crit(GradSink.apply(z), y)
                    loss.backward()
                times[stages] = triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
            print(f"| {name} | {N} x {C} | {str(dtype)[6:]} | {times[1]:.3f} | {times[3]:.3f} | "
                  f"{times[3] / times[1]:.2f} |", flush=True)
    tiles.DEFAULT_STAGES = 3
    tiles._pick_tiles.cache_clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
