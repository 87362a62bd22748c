"""pytest-benchmark suite of the fused heads: ``pytest benchmarks/test_bench_heads.py --benchmark-json=out.json``.

Same cases as ``fastlt bench --heads`` (``fastlt.bench_heads``); each timed call synchronises the GPU before
returning. Without a GPU every case skips with that reason: no number is ever faked.
"""

from __future__ import annotations

import pytest
import torch

from fastlt import bench_heads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to time GPU kernels")

METHODS = ("fastlt LA head", "fastlt cosine GCL head")
CASES = [(m, *shape) for m in METHODS for shape in bench_heads.HEAD_SHAPES[:2]]


@pytest.mark.parametrize("method,N,D,C", CASES, ids=[f"{c[0].split()[1]}-{c[1]}x{c[2]}x{c[3]}" for c in CASES])
def test_fastlt_head(benchmark, method, N, D, C):
    step = dict(bench_heads.build_head_cases(N, D, C, torch.bfloat16, (method,)))[method]()

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(method=method, N=N, D=D, C=C, dtype="bf16")
    benchmark.pedantic(synced, rounds=10, iterations=2, warmup_rounds=2)
