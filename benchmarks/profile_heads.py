"""Where a fused head's step goes, kernel by kernel: ``python benchmarks/profile_heads.py [NxDxC] [method ...]``.

For each head (default: the LA head and the cosine GCL head at 4096 x 1024 -> 131072 bf16, where the cosine
GCL head took 14.4 ms against the LA head's 6.87 on an H100), runs 3 forward+backward steps under
``torch.profiler`` and prints the CUDA time per kernel (matmuls, the row kernel, the normalisation, the
dW accumulation, copies) with its share of the step, so a gap to the matmul floor can be attributed.
"""

from __future__ import annotations

import sys

import torch

from fastlt.bench_heads import build_head_cases


def profile(N: int, D: int, C: int, methods, dtype=torch.bfloat16, steps: int = 3) -> None:
    for method, make in build_head_cases(N, D, C, dtype, methods):
        step = make()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events) / steps
        print(f"\n## {method}: {N} x {D} -> {C} {str(dtype)[6:]}, {total / 1e3:.3f} ms of kernels per step")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
            t = e.self_device_time_total / steps
            print(f"{t / 1e3:8.3f} ms {100 * t / total:5.1f}%  x{e.count // steps:<3d} {e.key[:90]}")
        del step
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    a = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        print("profile_heads: no CUDA GPU visible")
        return 2
    shape = (4096, 1024, 131072)
    if a and "x" in a[0]:
        shape = tuple(int(v) for v in a.pop(0).split("x"))
    methods = tuple(a) or ("fastlt LA head", "fastlt cosine GCL head", "fastlt LADE head")
    profile(*shape, methods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
