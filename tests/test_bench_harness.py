"""The benchmark harness's steps run (on the CPU through the interpreter), so a GPU lease is never spent on a
broken harness; the numbers themselves are only ever taken on a GPU (benchmarks/, ``fastlt bench``)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import DEVICE

from fastlt import bench, bench_heads


@pytest.mark.parametrize("loss", ["la", "gcl", "lade"])
def test_loss_cases_run(loss):
    cases = dict(bench.build_cases(6, 10, torch.float32, loss=loss, with_compile=False, with_official=True,
                                   device=DEVICE))
    assert "fastlt" in cases
    for method, make in cases.items():
        if method.startswith("Liger"):
            continue  # optional peer; needs its own kernels on a GPU
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

    assert bench.measure_case(make) == (None, None, None, "RuntimeError: peer not available")


def test_host_time_counts_the_calls_between_syncs():
    syncs, calls = [], []
    ms = bench.host_ms(lambda: (calls.append(1), time.sleep(0.002)), reps=5, sync=lambda: syncs.append(len(calls)))
    assert calls == [1] * 5 and syncs == [0, 5]  # a sync before the first call and after the last
    assert 2.0 <= ms < 50.0


def test_result_rows_show_the_host_time():
    r = bench.Result("la", "fastlt", 4, 8, "fp32", 1.5, gbps=0.1, x_floor=2.0, extra_gb=0.0, host_ms=0.25)
    row = bench._row(r)
    assert row.count("|") == bench.HEADER.splitlines()[0].count("|")
    assert "| 0.250 |" in row
    head = bench_heads.HeadResult("fastlt LA head", 4, 2, 8, "bf16", 1.5, tflops=1.0, x_floor=3.0, extra_gb=0.0)
    assert "| — |" in bench_heads.head_row(head)
    assert bench_heads.head_row(head).count("|") == bench_heads.HEAD_HEADER.splitlines()[0].count("|")


def test_shard_cases_run():
    """``fastlt bench --shards``: the sharded logits losses and heads at rank 0's shard run with the collectives
    replaced by local copies; the shard sizes and the modelled bytes."""
    from fastlt import bench_shards as S

    for W in (1, 3):
        for loss in ("la", "gcl"):
            cases = list(S.build_logits_cases(6, 20, W, torch.float32, loss=loss, device=DEVICE))
            # GCL over 3 ranks: also torch.chunk's rank 1, at 7, off a multiple of 8 (its noise shifted)
            assert [m for m, _ in cases] == (["fastlt shard (gcl)", "fastlt shard (gcl, start 7: 7 past a multiple "
                                              "of 8)"] if (loss, W) == ("gcl", 3) else [f"fastlt shard ({loss})"])
            for _, make in cases:
                step = make()
                step()
                step()
        methods = []
        for method, make in S.build_head_cases(6, 4, 20, W, torch.float32, device=DEVICE):
            step = make()
            step()
            step()
            methods.append(method)
            leaves = [c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.Tensor)
                      and c.cell_contents.requires_grad]
            assert leaves and all(t.grad is None for t in leaves)  # through GradSink: no .grad accumulated
        assert len(methods) == (1 if W == 1 else 2)
    assert S.shard_size(8142, 8) == 1024 and S.shard_size(1_000_000, 64) == 15632
    assert S.logits_comm_bytes(512) == 8192
    assert S.head_comm_bytes(8, 4, 1, torch.bfloat16) == S.logits_comm_bytes(8)


def test_shard_table_is_written(tmp_path):
    """The --shards table's rows and files (a measured row, a modelled-only row)."""
    import json

    from fastlt import bench_shards as S
    from fastlt._bench_harness import Device

    rows = [S.ShardResult("4096 x 131072", "bf16", 8, "fastlt shard (la)", 16384, 0.05, 1.2, 0.01, 0.066, 0.02),
            S.ShardResult("4096 x 131072", "bf16", 8, "all-gather of the logits", 131072, None, comm_mb=939.5,
                          note="then the W = 1 loss on (N, C)")]
    assert S.shard_row(rows[0]).startswith("| 4096 x 131072 | bf16 | 8 | fastlt shard (la) | 16384 | 0.050 | 1.20 |")
    assert "| — | — | — | 939.500 |" in S.shard_row(rows[1])
    folder = S.save_shards(Device("Test GPU", 3e12, {}), rows, str(tmp_path))
    data = json.loads((tmp_path / "Test-GPU" / "shards.json").read_text())
    assert folder.endswith("Test-GPU") and [r["W"] for r in data["results"]] == [8, 8]
    assert S.SHARD_HEADER.splitlines()[0] in (tmp_path / "Test-GPU" / "shards.md").read_text()


def test_graph_column():
    """Every case's graph-replay column: skipped steps and failed captures give no number and say why; the cell shows
    ms and the multiple of the floor."""
    from fastlt._bench_harness import fmt_graph, graph_ms

    assert graph_ms(lambda: (lambda: None), skip=True, note="slow") == (None, "slow")
    if DEVICE == "cpu":  # no CUDA graph without a GPU: the capture fails, and the note says so
        ms, note = graph_ms(lambda: (lambda: None), note="x")
        assert ms is None and note.startswith("x; graph: ")
    assert fmt_graph(None, 1.0) == "—" and fmt_graph(0.5, 0.25) == "0.500 (2.00)"
    cells = bench.HEADER.splitlines()[0].count("|")
    assert bench._row(bench.Result("la", "m", 2, 3, "fp32", None)).count("|") == cells
    measured = bench.Result("la", "m", 2, 3, "fp32", 0.1, 5.0, 2.0, 0.0, 0.01, "", 0.05)
    assert bench._row(measured).count("|") == cells and "| 0.050 (1.00) |" in bench._row(measured)
    heads_cells = bench_heads.HEAD_HEADER.splitlines()[0].count("|")
    r = bench_heads.HeadResult("m", 2, 3, 4, "bf16", 0.2, 10.0, 2.0, 0.0, 0.01, "", 0.1)
    assert bench_heads.head_row(r).count("|") == heads_cells and "| 0.100 (1.00) |" in bench_heads.head_row(r)
    assert bench_heads.head_row(bench_heads.HeadResult("m", 2, 3, 4, "bf16", None)).count("|") == heads_cells


def test_best_in_turns_calls_each_function_in_turns():
    """Each function runs ``warmup`` times, then ``repeat`` rounds of ``reps`` calls taking turns; the result is the
    best round's seconds per call, one per function, in order."""
    from fastlt._bench_harness import best_in_turns

    calls = []
    slow = best_in_turns(lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.002)), reps=2,
                         repeat=3, warmup=1)
    assert calls == ["a", "b"] + (["a"] * 2 + ["b"] * 2) * 3
    assert len(slow) == 2 and 0 <= slow[0] < slow[1] and slow[1] >= 0.002


@pytest.mark.parametrize("args", [["--shapes", "4096by8142"], ["--shapes", "0x100"], ["--heads", "--shapes", "8x100"],
                                  ["--shards", "2", "--shapes", "8x1x2x3"], ["--no-peers"],
                                  ["--heads", "--shards", "2"], ["--heads", "--loss", "lade"],
                                  ["--heads", "--no-compile"], ["--shards", "2", "--no-official"],
                                  ["--shards", "2", "--loss", "gcl"], ["--out", "{file}/results"]])
def test_bad_bench_arguments_are_usage_errors_on_any_machine(args, capsys, tmp_path):
    """A malformed --shapes was parsed after the CUDA check (a raw traceback, on the GPU only: a lent machine's
    minutes); flags that do nothing together were ignored (--loss, --no-compile, --no-official with --heads or
    --shards); an --out that cannot be written was found when the first table was saved."""
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        bench.main([arg.format(file=tmp_path / "file") for arg in args])
    assert exc.value.code == 2 and "fastlt bench: error:" in capsys.readouterr().err


def test_a_failure_note_is_one_table_cell():
    """A compiler's error spans lines (and may hold '|'): written as it was, it broke the table's rows apart."""
    def make():
        raise RuntimeError("at 8:4:\ndef _row_grad(a | b):\n    ^\ncannot convert None")

    note = bench.measure_case(make).note
    assert note == "RuntimeError: at 8:4: def _row_grad(a / b): ^ cannot convert None"
    row = bench._row(bench.Result("la", "m", 2, 3, "fp32", None, note=note))
    assert "\n" not in row and row.count("|") == bench.HEADER.splitlines()[0].count("|")


def test_a_graphed_step_keeps_its_inputs_alive(monkeypatch):
    """The replay of a captured step must hold the step (and so the inputs whose addresses the graph reads and
    writes): it returned ``graph.replay`` alone, the inputs went back to the allocator, and the timer's L2-flush
    buffer could take their memory. CUDA's capture faked on the CPU."""
    import contextlib
    import gc
    import types
    import weakref

    from fastlt._bench_harness import graphed

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None))
    refs = []

    def make():
        z = torch.zeros(4)
        refs.append(weakref.ref(z))
        return lambda: z.add_(1)

    replay = graphed(make)()
    gc.collect()
    assert refs[0]() is not None
    replay()


def test_the_kernel_warm_up_runs_every_fastlt_case(monkeypatch):
    """benchmarks/warm_kernels.py (the device script compiles the benchmarks' kernels in parallel with it before
    the timed runs): its tasks are the default tables' shapes, and a task runs each fastlt case's step (here on the
    CPU, through the interpreter) without failing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "warm_kernels.py"
    spec = importlib.util.spec_from_file_location("warm_kernels", path)
    warm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(warm)
    monkeypatch.syspath_prepend(str(path.parent))  # (ab_switches, as the script finds it beside itself)
    todo = warm.tasks()
    assert {t[1] for t in todo if t[0] not in ("heads", "ab")} == set(bench.SHAPES)
    assert {t[1] for t in todo if t[0] == "heads"} == set(bench_heads.HEAD_SHAPES)
    import ab_switches

    assert len([t for t in todo if t[0] == "ab"]) == sum(len(shapes) * len(losses) * 2
                                                         for _, _, shapes, losses, _ in ab_switches.cases())
    for task in [("la", (3, 40), "fp32"), ("gcl", (2, 24), "bf16"), ("lade", (3, 17), "fp32"),
                 ("heads", (3, 8, 20), "bf16"), ("ab", (3, 40), "bf16", ("HALF_WIDTH_ROWS", 2, "gcl", False)),
                 ("ab", (3, 40), "fp32", ("COLUMN_STATS_ROWS", 64, "lade", False))]:
        _, seconds, failures = warm.warm_task(task, device=DEVICE)
        assert failures == [] and seconds > 0


def test_host_syncing_peers_are_not_captured_and_device_folders_are_plain(tmp_path):
    """Liger's and Cut Cross-Entropy's steps read values back on the host: their captures failed, and a failed
    capture leaves torch's capture stream and pool in use for the rest of the run, so they are not captured (the
    step is never built). A device name's folder keeps only the characters the device tool returns."""
    from fastlt._bench_harness import Device, graph_ms, save_table

    def never():
        raise AssertionError("a host-syncing peer's step was built for a capture")

    for method in ("Liger CE (plain CE)", "Liger FLCE (CE)", "CCE (CE)", "CCE exact (CE, filter_eps=None)"):
        ms, note = graph_ms(never, note="peer", method=method)
        assert ms is None and note == "peer; graph: not captured (the peer syncs with the host)"
    folder = save_table(Device("NVIDIA H200 NVL (141GB)", 4.8e12, {}), [], str(tmp_path), "results", "x")
    assert folder.endswith("NVIDIA-H200-NVL--141GB-") and (tmp_path / "NVIDIA-H200-NVL--141GB-" / "results.md").exists()


def test_peak_memory_is_a_second_calls(monkeypatch):
    """The peak extra memory of a case is measured on a call after the first, which compiles and fills caches
    (it was the first call's: a peer's compile-time allocations counted as its memory). CUDA's memory statistics
    faked on the CPU: the first call peaks 10 GB above the base, later ones 1 GB. A slow peer timed by ``reps`` is
    measured on its first call (one more call of it can take seconds of a lease)."""
    import triton.testing

    from fastlt import _bench_harness as H

    state = {"calls": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 5e9)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=5e9))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(triton.testing, "do_bench", lambda step, **kw: 1.0)
    monkeypatch.setattr(H, "host_ms", lambda step: 0.5)

    def step():
        state["calls"] += 1
        state["peak"] = max(state["peak"], 5e9 + (10e9 if state["calls"] == 1 else 1e9))

    assert H.time_step(step) == (1.0, 1.0, 0.5)
    state.update(calls=0)  # a slow peer (timed by reps): its first call, eager code, is measured (no extra call)
    ms, extra, host = H.time_step(step, reps=3)
    assert extra == 10.0 and host is None and state["calls"] == 4
