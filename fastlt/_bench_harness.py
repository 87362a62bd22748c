"""The benchmark harness that ``fastlt bench`` (:mod:`fastlt.bench`, the logits losses) and ``fastlt bench --heads``
(:mod:`fastlt.bench_heads`, the fused heads) share, so that a number means the same thing wherever it is printed:
the device and its measured bandwidth, the floors, the timing of one step (median ms by CUDA events, peak extra
memory, host ms), the non-leaf input every timed step goes through, CUDA-graph replay, and the peers' helpers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ["DTYPES", "Device", "Measured", "measure_bandwidth", "floor_ms", "host_ms", "best_in_turns", "time_step",
           "measure_case", "GradSink", "long_tail_counts", "graphed", "gcl_gpu_noise", "fmt_host"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Measured(NamedTuple):
    """One case's numbers (None when it failed, ``note`` saying why)."""

    ms: float | None
    extra_gb: float | None
    host_ms: float | None
    note: str = ""


@dataclass
class Device:
    name: str
    bandwidth: float  # bytes / s, device-to-device copy (read + write)
    meta: dict = field(default_factory=dict)


def measure_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read and written."""
    import triton.testing

    n = 1 << 29
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * n * 4 / (ms * 1e-3)


def floor_ms(N: int, C: int, dtype: torch.dtype, bandwidth: float, passes: int = 2) -> float:
    """The bandwidth floor of a logits loss: ``passes`` (N, C) matrices of ``dtype`` moved once each (2: read the
    logits, write the gradient; 3 with class-probability targets read too), at ``bandwidth`` bytes/s, in ms."""
    return passes * N * C * torch.finfo(dtype).bits / 8 / bandwidth * 1e3


def best_in_turns(*fns: Callable[[], None], reps: int = 1, repeat: int = 7, warmup: int = 1) -> list[float]:
    """Best seconds per call of each of ``fns`` over ``repeat`` rounds of ``reps`` calls (after ``warmup`` calls of
    each), the functions taking turns within each round, so that a load on a shared machine slows each of them
    alike (CPU timings: no device sync)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / reps)
    return best


def host_ms(step: Callable[[], None], *, reps: int = 10, sync: Callable[[], None] | None = None) -> float:
    """Host (CPU) milliseconds per call of ``step``: ``reps`` calls after a device sync, the clock stopped before
    the next sync, so it counts Python and launch work, not kernel time (unless the step waits for the device
    itself). A step whose host time is near its device time is host-bound."""
    sync = sync or torch.cuda.synchronize
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    elapsed = time.perf_counter() - t0
    sync()
    return elapsed / reps * 1e3


def time_step(step: Callable[[], None], *, reps: int | None = None) -> tuple[float, float, float | None]:
    """(median ms, peak extra GB, host ms) of ``step``; ``reps`` for very slow peers (host timing, no host ms). The
    peak is a second call's: the first compiles (Triton's, inductor's autotuning buffers) and fills caches (a slow
    peer's, eager code, is its first: one call of it can take seconds of a lease)."""
    import triton.testing

    if reps is None:
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 1e9
    if reps is not None:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[len(times) // 2], extra, None
    ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    return ms, extra, host_ms(step)


def one_line(text: str, limit: int = 120) -> str:
    """``text`` fit for a markdown table cell: one line (a compiler's error spans several), no ``|``, at most
    ``limit`` characters."""
    return " ".join(text.replace("|", "/").split())[:limit]


def measure_case(make: Callable[[], Callable[[], None]], *, reps: int | None = None) -> Measured:
    """The :class:`Measured` numbers of the step ``make()`` builds; all None with the reason in ``note`` when it
    runs out of memory or fails (a failing peer is reported, not fatal). Frees the step's memory afterwards."""
    step = None
    try:
        step = make()
        return Measured(*time_step(step, reps=reps))
    except torch.cuda.OutOfMemoryError:
        return Measured(None, None, None, "out of memory")
    except Exception as exc:  # noqa: BLE001 - any failure of a peer becomes its note
        return Measured(None, None, None, one_line(f"{type(exc).__name__}: {exc}"))
    finally:
        step = None
        torch.cuda.empty_cache()


# --- what every case is built from ------------------------------------------------------------------------------

class GradSink(torch.autograd.Function):
    """Identity whose backward drops the incoming gradient. Every timed input goes through it, so the loss
    sees a non-leaf tensor (as a layer's output is) and its gradient is handed on as a layer below would
    receive it; a leaf input would make autograd copy an in-place gradient into ``.grad``, an extra full
    pass that no training step pays."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None


def long_tail_counts(C: int) -> torch.Tensor:
    """A long-tailed count profile (imbalance 1000, exponential), as iNaturalist-like data has."""
    j = torch.arange(C, dtype=torch.float64)
    return torch.floor(1000.0 * 1000.0 ** (-j / max(C - 1, 1))).clamp(min=1)


def graphed(make):
    """The step of ``make`` captured once in a CUDA graph and replayed: the same kernels without the host's
    launch overhead (what a training loop under CUDA graphs pays; small shapes are host-bound otherwise)."""
    def build():
        step = make()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, allocate) off the capture
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()

        def replay():  # holds the step, and with it the inputs whose addresses the graph reads and writes (freed,
            graph.replay()  # the timer's L2-flush buffer could take their memory: replays on freed inputs)
        replay.step = step
        return replay
    return build


# peers whose steps read a value back on the host (Liger's CE and fused linear CE call .item() and assert on values
# in their forward; Cut Cross-Entropy likewise): a capture of them fails, and a failed capture leaves torch's capture
# stream and its memory pool in use for the rest of the process, so they are not captured at all
HOST_SYNCING_PEERS = ("Liger", "CCE")


def graph_ms(make, skip: bool = False, note: str = "", method: str = "") -> tuple[float | None, str]:
    """``(median ms of the step replayed from a CUDA graph, note)``: the kernels' time without the host's (the eager
    median includes the launches' host work, which small shapes feel). ``skip`` (a step that cannot be captured,
    such as one that copies from the host), a ``method`` of :data:`HOST_SYNCING_PEERS` or a failed capture gives
    None, the reason added to ``note``."""
    if method.startswith(HOST_SYNCING_PEERS):
        return None, "; ".join(n for n in (note, "graph: not captured (the peer syncs with the host)") if n)
    if skip:
        return None, note
    m = measure_case(graphed(make))
    if m.ms is None:
        return None, "; ".join(n for n in (note, f"graph: {m.note}") if n)
    return m.ms, note


def fmt_graph(ms: float | None, floor: float) -> str:
    return "—" if ms is None else f"{ms:.3f} ({ms / floor:.2f})"


def gcl_gpu_noise(cos, y, cloud, m=0.5, s=30.0, noise_mul=1.0):
    """GCL as the official loss computes it, with its noise drawn on the GPU (torch.randn)."""
    noise = (torch.randn_like(cos, dtype=torch.float32) / 3).clamp(-1, 1).abs()
    c = cos - (noise_mul * noise * cloud).to(cos.dtype)
    onehot = torch.nn.functional.one_hot(y, cos.shape[1]).bool()
    return torch.nn.functional.cross_entropy(s * torch.where(onehot, c - m, c), y)


def save_table(dev: Device, results: list, out_dir: str, stem: str, markdown: str) -> str:
    """Write ``<out_dir>/<device>/<stem>.json`` (the device and the result dataclasses) and ``<stem>.md``
    (``markdown``); returns the folder."""
    import json
    import os
    import re
    from dataclasses import asdict

    folder = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9._-]", "-", dev.name))  # (names the device tool returns)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
        json.dump({"device": asdict(dev), "results": [asdict(r) for r in results]}, f, indent=1)
    with open(os.path.join(folder, f"{stem}.md"), "w") as f:
        f.write(markdown)
    return folder


def fmt_host(host: float | None) -> str:
    return "—" if host is None else f"{host:.3f}"
