"""The benchmark harness's steps run (on the CPU through the interpreter), so a GPU lease is never spent on a
broken harness; the numbers themselves are only ever taken on a GPU (benchmarks/, ``fastlt bench``)."""

from __future__ import annotations

import pytest
import torch

from fastlt import bench, bench_heads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("loss", ["la", "gcl", "lade"])
def test_loss_cases_run(loss):
    cases = dict(bench.build_cases(6, 10, torch.float32, loss=loss, with_compile=False, with_official=True,
                                   device=DEVICE))
    assert "fastlt" in cases
    assert ("fastlt (CUDA graph)" in cases) == (loss == "la")
    for method, make in cases.items():
        if method.startswith("Liger"):
            continue  # optional peer; needs its own kernels on a GPU
        if "CUDA graph" in method and DEVICE == "cpu":
            continue  # graph capture exists only on a GPU (tests/test_kernels_cuda_graph.py there)
        step = make()
        step()
        step()  # twice: grad-in-forward overwrites its input, the step must survive that


def test_head_cases_run():
    methods = [m for m in bench_heads.HEAD_METHODS if not m.startswith(("Liger", "CCE"))]
    cases = dict(bench_heads.build_head_cases(6, 4, 10, torch.float32, methods, device=DEVICE))
    assert list(cases) == methods
    for make in cases.values():
        make()()


def test_grad_sink_drops_the_gradient_and_keeps_the_graph_non_leaf():
    x = torch.randn(3, 4, requires_grad=True)
    y = bench.GradSink.apply(x)
    assert not y.is_leaf
    (y * 2).sum().backward()
    assert x.grad is None


def test_floors():
    assert bench.floor_ms(1000, 1000, torch.float32, 8e9) == pytest.approx(1.0)  # 8 MB / 8 GB/s
    assert bench_heads.head_floor_ms(10, 10, 10, 6e6) == pytest.approx(1.0)  # 6000 FLOPs / 6 MFLOP/s


def test_a_failing_case_is_reported_not_raised():
    def make():
        raise RuntimeError("peer not available")

    assert bench.measure_case(make) == (None, None, "RuntimeError: peer not available")
