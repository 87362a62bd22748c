"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-json=out.json`` on a CUDA machine.

Same cases and peers as ``fastlt bench`` (``fastlt.bench``); each timed call synchronises the GPU
before returning. Without a GPU every case skips with that reason: no number is ever faked.
"""

from __future__ import annotations

import pytest
import torch

from fastlt import bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to time GPU kernels")

CASES = [(loss, N, C, d) for loss in ("la", "gcl", "lade") for (N, C) in bench.SHAPES[:2] for d in bench.DTYPES]


@pytest.mark.parametrize("loss,N,C,dtype", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-{c[3]}" for c in CASES])
def test_fastlt_vs_peers(benchmark, loss, N, C, dtype):
    cases = dict(bench.build_cases(N, C, bench.DTYPES[dtype], loss=loss, with_compile=False, with_official=False))
    step = cases["fastlt"]()

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(loss=loss, N=N, C=C, dtype=dtype)
    benchmark.pedantic(synced, rounds=20, iterations=5, warmup_rounds=3)
