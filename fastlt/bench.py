"""The benchmark harness shared by ``fastlt bench`` and ``benchmarks/`` (pytest-benchmark).

Every case is forward + backward of one loss on (N, C) logits; a number means the same thing
wherever it is printed: median milliseconds (CUDA events, ``triton.testing.do_bench``), GB/s of the
byte model, ``x floor`` against the bandwidth floor ``2 * N * C * bytes / BW`` (read the logits once,
write the gradient once; BW measured in the same run by a device-to-device copy), the peak
extra memory over the inputs, and the host (CPU) time of one step: where it is near the median, the step is
host-bound (Python and launch work), not kernel-bound. Peers run in the same process: eager PyTorch (the
reference path), ``torch.compile`` of it, Liger-Kernel's CE (if installed; plain CE, so it does less work), and the
official implementations' style (GCL's CPU noise, LADE's dense C x N masks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

SHAPES = [(4096, 8142), (4096, 131072), (1024, 1_000_000), (128, 1_000_000), (512, 8142)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Result:
    loss: str
    method: str
    N: int
    C: int
    dtype: str
    ms: float | None
    gbps: float | None = None
    x_floor: float | None = None
    extra_gb: float | None = None
    host_ms: float | None = None
    note: str = ""


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


def floor_ms(N: int, C: int, dtype: torch.dtype, bandwidth: float) -> float:
    return 2 * N * C * torch.finfo(dtype).bits / 8 / bandwidth * 1e3


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
    """(median ms, peak extra GB, host ms) of ``step``; ``reps`` for very slow peers (host timing, no host ms)."""
    import triton.testing

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
        return Measured(None, None, None, f"{type(exc).__name__}: {exc}"[:120])
    finally:
        step = None
        torch.cuda.empty_cache()


# --- the losses and their peers -------------------------------------------------------------------------

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


def _counts(C: int) -> torch.Tensor:
    """A long-tailed count profile (imbalance 1000, exponential), as iNaturalist-like data has."""
    j = torch.arange(C, dtype=torch.float64)
    return torch.floor(1000.0 * 1000.0 ** (-j / max(C - 1, 1))).clamp(min=1)


def build_cases(N: int, C: int, dtype: torch.dtype, *, loss: str, with_compile: bool, with_official: bool,
                device="cuda"):
    """Yield (method, make_step) for one loss at one shape. ``make_step()`` allocates and returns a step."""
    import fastlt
    from fastlt import reference as R
    from fastlt.priors import gcl_cloud, log_prior, prior

    dev = device
    counts = _counts(C)
    lp, cloud, pi = log_prior(counts).to(dev), gcl_cloud(counts).to(dev), prior(counts).to(dev)
    y = torch.randint(0, C, (N,), device=dev)

    def logits():
        return torch.randn(N, C, device=dev, dtype=dtype).requires_grad_()

    def autograd_step(fn):
        def make():
            z = logits()

            def step():
                fn(GradSink.apply(z)).backward()
            return step
        return make

    if loss in ("la", "gcl"):
        kw = dict(prior=lp) if loss == "la" else dict(cloud=cloud, noise_mul=1.0, margin=0.5, scale=30.0, seed=1)
        yield "fastlt", autograd_step(lambda z: fastlt.functional.adjusted_cross_entropy(z, y, backend="triton",
                                                                                        **kw))
        yield "fastlt grad-in-fwd", autograd_step(lambda z: fastlt.functional.adjusted_cross_entropy(
            z, y, backend="triton", grad_in_forward=True, **kw))
        if loss == "la":
            yield "fastlt (CUDA graph)", _graphed(autograd_step(lambda z: fastlt.functional.adjusted_cross_entropy(
                z, y, backend="triton", **kw)))
            yield "eager PyTorch", autograd_step(lambda z: R.adjusted_cross_entropy(z, y, prior=lp))
            if with_compile:
                compiled = torch.compile(lambda z: torch.nn.functional.cross_entropy(z + lp.to(z.dtype), y))
                yield "torch.compile", autograd_step(compiled)
            liger = _liger_ce()
            if liger is not None:
                yield "Liger CE (plain CE)", autograd_step(lambda z: liger(z, y))
        else:
            yield "eager, GPU noise", autograd_step(lambda z: _gcl_gpu_noise(z, y, cloud))
            if with_compile:
                compiled = torch.compile(lambda z: _gcl_gpu_noise(z, y, cloud))
                yield "torch.compile, GPU noise", autograd_step(compiled)
            if with_official:
                yield "official (CPU noise)", autograd_step(lambda z: _gcl_official(z, y, cloud))
    elif loss == "lade":
        yield "fastlt", autograd_step(lambda z: fastlt.functional.lade_loss(z, y, pi, backend="triton"))
        yield "eager PyTorch", autograd_step(lambda z: R.lade_loss(z, y, pi))
        if with_official:
            yield "official (C x N masks)", autograd_step(lambda z: _lade_official(z, y, pi))


def _graphed(make):
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
        return graph.replay
    return build


def _gcl_gpu_noise(cos, y, cloud, m=0.5, s=30.0, noise_mul=1.0):
    """GCL as the official loss computes it, with its noise drawn on the GPU (torch.randn)."""
    noise = (torch.randn_like(cos, dtype=torch.float32) / 3).clamp(-1, 1).abs()
    c = cos - (noise_mul * noise * cloud).to(cos.dtype)
    onehot = torch.nn.functional.one_hot(y, cos.shape[1]).bool()
    return torch.nn.functional.cross_entropy(s * torch.where(onehot, c - m, c), y)


def _gcl_official(cos, y, cloud, m=0.5, s=30.0, noise_mul=1.0):
    """The official GCL forward: Normal(0, 1/3) sampled on the CPU and copied to the GPU every step."""
    noise = torch.distributions.normal.Normal(0, 1 / 3).sample(cos.shape).clamp(-1, 1).to(cos.device)
    c = cos - (noise_mul * noise.abs() * cloud).to(cos.dtype)
    onehot = torch.zeros_like(cos, dtype=torch.uint8).scatter_(1, y.view(-1, 1), 1).bool()
    return torch.nn.functional.cross_entropy(s * torch.where(onehot, c - m, c), y)


def _lade_official(z, y, pi, alpha=0.1, lam=0.1):
    """The official LADE code: PriorCE plus LADER from dense C x N masks."""
    C, N = z.shape[1], z.shape[0]
    ce = torch.nn.functional.cross_entropy(z + torch.log(pi).to(z.dtype), y)
    mask = y == torch.arange(C, device=z.device).view(-1, 1)
    x_p = z.T * mask
    x_q = (z - torch.log(pi + 1e-9) + math.log(1.0 / C + 1e-9)).T
    n_c = mask.sum(-1).float()
    first = x_p.sum(-1) / (n_c + 1e-8)
    second = torch.logsumexp(x_q, -1) - math.log(N)
    est = first - second - lam * second**2
    return ce + alpha * -(est * pi).sum()


def _liger_ce():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # noqa: BLE001 - optional peer, any import failure means "not installed"
        return None
    return LigerCrossEntropyLoss()


# --- the run ----------------------------------------------------------------------------------------------

def run(losses=("la", "gcl", "lade"), shapes=SHAPES, dtypes=("fp32", "bf16"), *, with_compile=True,
        with_official=True, log=print) -> tuple[Device, list[Result]]:
    if not torch.cuda.is_available():
        raise RuntimeError("the benchmarks need a CUDA GPU; none is visible here")
    torch.manual_seed(0)
    bw = measure_bandwidth()
    props = torch.cuda.get_device_properties(0)
    import triton

    dev = Device(props.name, bw, dict(torch=torch.__version__, triton=triton.__version__,
                                       sms=props.multi_processor_count))
    log(f"# {dev.name}: copy bandwidth {bw / 1e12:.2f} TB/s, torch {torch.__version__}, triton {triton.__version__}")
    results = []
    for loss in losses:
        for N, C in shapes:
            for dname in dtypes:
                dtype = DTYPES[dname]
                floor = floor_ms(N, C, dtype, bw)
                small = N * C <= 4096 * 8142
                cases = build_cases(N, C, dtype, loss=loss, with_compile=with_compile and N * C <= 4096 * 131072,
                                    with_official=with_official and (small or loss == "lade"))
                for method, make in cases:
                    slow = method.startswith("official") and loss == "gcl"
                    m = measure_case(make, reps=3 if slow else None)
                    r = Result(loss, method, N, C, dname, m.ms, host_ms=m.host_ms, note=m.note)
                    if m.ms is not None:
                        r.gbps = 2 * N * C * dtype.itemsize / (m.ms * 1e-3) / 1e9
                        r.x_floor, r.extra_gb = m.ms / floor, m.extra_gb
                    results.append(r)
                    log(_row(r))
    return dev, results


def fmt_host(host: float | None) -> str:
    return "—" if host is None else f"{host:.3f}"


def _row(r: Result) -> str:
    if r.ms is None:
        return f"| {r.loss} | {r.N} x {r.C} | {r.dtype} | {r.method} | — | — | — | — | — | {r.note} |"
    return (f"| {r.loss} | {r.N} x {r.C} | {r.dtype} | {r.method} | {r.ms:.3f} | {r.gbps:.0f} | "
            f"{r.x_floor:.2f} | {r.extra_gb:.2f} | {fmt_host(r.host_ms)} | {r.note} |")


HEADER = ("| loss | N x C | dtype | method | median ms | GB/s | x floor | extra GB | host ms | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def markdown(dev: Device, results: list[Result]) -> str:
    lines = [f"# fastlt benchmark on {dev.name}", "",
             f"Forward + backward, median of CUDA-event timings. Floor = 2*N*C*bytes / {dev.bandwidth / 1e12:.2f} TB/s "
             f"(device-to-device copy measured in this run). Host ms: CPU time per step without a sync (near the "
             f"median: host-bound). {json.dumps(dev.meta)}", "", HEADER]
    lines += [_row(r) for r in results]
    return "\n".join(lines) + "\n"


def save(dev: Device, results: list[Result], out_dir: str) -> str:
    folder = os.path.join(out_dir, dev.name.replace(" ", "-"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"device": asdict(dev), "results": [asdict(r) for r in results]}, f, indent=1)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(markdown(dev, results))
    _plot(results, os.path.join(folder, "x_floor.png"))
    return folder


def _plot(results: list[Result], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if r.ms is not None]
    keys = sorted({(r.loss, r.N, r.C, r.dtype) for r in ok}, key=lambda k: (k[0], k[1] * k[2], k[3]))
    methods = sorted({r.method for r in ok})
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.9), 5))
    width = 0.8 / max(len(methods), 1)
    for mi, m in enumerate(methods):
        xs, hs = [], []
        for ki, k in enumerate(keys):
            for r in ok:
                if (r.loss, r.N, r.C, r.dtype) == k and r.method == m:
                    xs.append(ki + mi * width)
                    hs.append(r.x_floor)
        ax.bar(xs, hs, width, label=m)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 for i in range(len(keys))])
    ax.set_xticklabels([f"{k[0]}\n{k[1]}x{k[2]}\n{k[3]}" for k in keys], fontsize=7)
    ax.set_ylabel("x bandwidth floor (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastlt bench", description=__doc__.splitlines()[0])
    p.add_argument("--loss", nargs="+", default=["la", "gcl", "lade"], choices=["la", "gcl", "lade"])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--shapes", nargs="+", default=None, help="NxC items, e.g. 4096x8142")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (compiles are slow)")
    p.add_argument("--no-official", action="store_true", help="skip the official-style peers")
    p.add_argument("--out", default="benchmarks/results", help="folder for results/<device>/")
    p.add_argument("--heads", action="store_true",
                   help="benchmark the fused linear / cosine heads instead (features in; see fastlt.bench_heads)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fastlt bench: no CUDA GPU visible; the benchmarks time GPU kernels and never fake a number")
        return 2
    if a.heads:
        return _main_heads(a)
    shapes = SHAPES if a.shapes is None else [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    print(HEADER)
    results: list[Result] = []
    for loss in a.loss:  # saved after each loss, so an interrupted run keeps what it measured
        dev, part = run((loss,), shapes, a.dtype, with_compile=not a.no_compile, with_official=not a.no_official)
        results += part
        folder = save(dev, results, a.out)
    print(f"\nwrote {folder}/results.json, results.md, x_floor.png")
    return 0


def _main_heads(a) -> int:
    from .bench_heads import HEAD_HEADER, HEAD_SHAPES, run_heads, save_heads

    shapes = HEAD_SHAPES if a.shapes is None else [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    if any(len(s) != 3 for s in shapes):
        raise SystemExit("fastlt bench --heads: --shapes takes NxDxC items, e.g. 4096x1024x131072")
    dtypes = a.dtype if a.dtype != ["fp32", "bf16"] else ["bf16"]
    print(HEAD_HEADER)
    results = []
    for shape in shapes:  # saved after each shape
        dev, part = run_heads([shape], dtypes)
        results += part
        folder = save_heads(dev, results, a.out)
    print(f"\nwrote {folder}/heads.json, heads.md")
    return 0
