"""``fastlt bench``: the logits losses' benchmark table, shared with ``benchmarks/`` (pytest-benchmark); the harness
it runs on is :mod:`fastlt._bench_harness`, the heads' table :mod:`fastlt.bench_heads`.

Every case is forward + backward of one loss on (N, C) logits; a number means the same thing
wherever it is printed: median milliseconds (CUDA events, ``triton.testing.do_bench``), GB/s of the
byte model, ``x floor`` against the bandwidth floor ``2 * N * C * bytes / BW`` (read the logits once,
write the gradient once; BW measured in the same run by a device-to-device copy; ``3 * N * C * bytes`` for
``la_soft``, logit adjustment with mixup class-probability targets, which reads the targets too), the peak
extra memory over the inputs, the host (CPU) time of one step (where it is near the median, the step is
host-bound: Python and launch work, not kernels), and the same step replayed from a CUDA graph (``graph ms``: the
kernels' time without the host's, and its multiple of the floor). Peers run in the same process: eager PyTorch (the
reference path), ``torch.compile`` of it, Liger-Kernel's CE (if installed; plain CE, so it does less work), and the
official implementations' style (GCL's CPU noise, LADE's dense C x N masks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from ._bench_harness import (  # noqa: F401 - GradSink, floor_ms, host_ms, measure_case: the harness, by this name too
    DTYPES,
    Device,
    GradSink,
    floor_ms,
    fmt_graph,
    fmt_host,
    gcl_gpu_noise,
    graph_ms,
    host_ms,
    long_tail_counts,
    measure_bandwidth,
    measure_case,
    save_table,
)

SHAPES = [(4096, 8142), (4096, 131072), (1024, 1_000_000), (128, 1_000_000), (512, 8142)]


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
    graph_ms: float | None = None  # the same step replayed from a CUDA graph: kernel time without host time


# --- the losses and their peers -------------------------------------------------------------------------

def build_cases(N: int, C: int, dtype: torch.dtype, *, loss: str, with_compile: bool, with_official: bool,
                device="cuda"):
    """Yield (method, make_step) for one loss at one shape. ``make_step()`` allocates and returns a step."""
    import fastlt
    from fastlt import reference as R
    from fastlt.priors import gcl_cloud, log_prior, prior

    dev = device
    counts = long_tail_counts(C)
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
        kw = dict(log_prior=lp) if loss == "la" else dict(cloud=cloud, noise_mul=1.0, margin=0.5, scale=30.0, seed=1)
        yield "fastlt", autograd_step(lambda z: fastlt.functional.adjusted_cross_entropy(z, y, backend="triton",
                                                                                        **kw))
        yield "fastlt grad-in-fwd", autograd_step(lambda z: fastlt.functional.adjusted_cross_entropy(
            z, y, backend="triton", grad_in_forward=True, **kw))
        if loss == "la":
            yield "eager PyTorch", autograd_step(lambda z: R.adjusted_cross_entropy(z, y, log_prior=lp))
            if with_compile:
                # static shapes: one code object compiled for every shape went dynamic from the second shape on
                compiled = torch.compile(lambda z: torch.nn.functional.cross_entropy(z + lp.to(z.dtype), y),
                                         dynamic=False)
                yield "torch.compile", autograd_step(compiled)
            liger = _liger_ce()
            if liger is not None:
                yield "Liger CE (plain CE)", autograd_step(lambda z: liger(z, y))
        else:
            yield "eager, GPU noise", autograd_step(lambda z: gcl_gpu_noise(z, y, cloud))
            if with_compile:
                compiled = torch.compile(lambda z: gcl_gpu_noise(z, y, cloud), dynamic=False)
                yield "torch.compile, GPU noise", autograd_step(compiled)
            if with_official:
                yield "official (CPU noise)", autograd_step(lambda z: _gcl_official(z, y, cloud))
    elif loss == "la_soft":  # mixup: dense targets, beside the pair form (y_a, y_b, lam) that needs no dense read
        y_b = torch.randint(0, C, (N,), device=dev)
        lam = 0.7
        q = (lam * torch.nn.functional.one_hot(y, C) + (1 - lam) * torch.nn.functional.one_hot(y_b, C)).to(dtype)
        F = fastlt.functional
        yield "fastlt", autograd_step(lambda z: F.adjusted_cross_entropy(z, q, log_prior=lp, backend="triton"))
        yield "fastlt grad-in-fwd", autograd_step(lambda z: F.adjusted_cross_entropy(
            z, q, log_prior=lp, backend="triton", grad_in_forward=True))
        yield "fastlt pair form (2 hard calls)", autograd_step(
            lambda z: lam * F.adjusted_cross_entropy(z, y, log_prior=lp, backend="triton")
            + (1 - lam) * F.adjusted_cross_entropy(z, y_b, log_prior=lp, backend="triton"))
        yield "eager PyTorch", autograd_step(lambda z: R.adjusted_cross_entropy(z, q, log_prior=lp))
        if with_compile:
            compiled = torch.compile(lambda z: torch.nn.functional.cross_entropy(z + lp.to(z.dtype), q),
                                     dynamic=False)
            yield "torch.compile", autograd_step(compiled)
    elif loss == "lade":
        yield "fastlt", autograd_step(lambda z: fastlt.functional.lade_loss(z, y, pi, backend="triton"))
        yield "eager PyTorch", autograd_step(lambda z: R.lade_loss(z, y, pi))
        if with_official:
            yield "official (C x N masks)", autograd_step(lambda z: _lade_official(z, y, pi))


def _gcl_official(cos, y, cloud, m=0.5, s=30.0, noise_mul=1.0):
    """The official GCL forward: Normal(0, 1/3) sampled on the CPU and copied to the GPU every step."""
    noise = torch.distributions.normal.Normal(0, 1 / 3).sample(cos.shape).clamp(-1, 1).to(cos.device)
    c = cos - (noise_mul * noise.abs() * cloud).to(cos.dtype)
    onehot = torch.zeros_like(cos, dtype=torch.uint8).scatter_(1, y.view(-1, 1), 1).bool()
    return torch.nn.functional.cross_entropy(s * torch.where(onehot, c - m, c), y)


def _lade_official(z, y, pi, alpha=0.1, lam=0.1):
    """The official LADE code: PriorCE plus LADER from dense C x N masks."""
    C, N = z.shape[1], z.shape[0]
    ce = torch.nn.functional.cross_entropy(z + torch.log(pi + 1e-9).to(z.dtype), y)
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
        with_official=True, log=print, after_shape=None, bandwidth: float | None = None) -> tuple[Device, list[Result]]:
    """Every case of ``losses`` x ``shapes`` x ``dtypes``; ``after_shape(dev, results so far)`` after each shape's
    cases (a caller saving as it goes); ``bandwidth``: the copy bandwidth (bytes/s) the floors use, measured here
    when None (a caller running several times passes the first run's, so one table has one floor)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the benchmarks need a CUDA GPU; none is visible here")
    torch.manual_seed(0)
    bw = measure_bandwidth() if bandwidth is None else bandwidth
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
                passes = 3 if loss == "la_soft" else 2  # the targets' read
                floor = floor_ms(N, C, dtype, bw, passes)
                small = N * C <= 4096 * 8142
                cases = build_cases(N, C, dtype, loss=loss, with_compile=with_compile and N * C <= 4096 * 131072,
                                    with_official=with_official and (small or loss == "lade"))
                for method, make in cases:
                    slow = method.startswith("official") and loss == "gcl"
                    m = measure_case(make, reps=3 if slow else None)
                    r = Result(loss, method, N, C, dname, m.ms, host_ms=m.host_ms, note=m.note)
                    if m.ms is not None:
                        r.gbps = passes * N * C * dtype.itemsize / (m.ms * 1e-3) / 1e9
                        r.x_floor, r.extra_gb = m.ms / floor, m.extra_gb
                        r.graph_ms, r.note = graph_ms(make, slow, r.note, method)
                    results.append(r)
                    log(_row(r))
            if after_shape is not None:
                after_shape(dev, results)
    return dev, results


def _row(r: Result) -> str:
    if r.ms is None:
        return f"| {r.loss} | {r.N} x {r.C} | {r.dtype} | {r.method} | — | — | — | — | — | — | {r.note} |"
    graph = fmt_graph(r.graph_ms, r.ms / r.x_floor)
    return (f"| {r.loss} | {r.N} x {r.C} | {r.dtype} | {r.method} | {r.ms:.3f} | {graph} | {r.gbps:.0f} | "
            f"{r.x_floor:.2f} | {r.extra_gb:.2f} | {fmt_host(r.host_ms)} | {r.note} |")


HEADER = ("| loss | N x C | dtype | method | median ms | graph ms (x floor) | GB/s | x floor | extra GB | host ms "
          "| note |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(dev: Device, results: list[Result]) -> str:
    lines = [f"# fastlt benchmark on {dev.name}", "",
             f"Forward + backward, median of CUDA-event timings. Floor = 2*N*C*bytes (la_soft: 3*N*C*bytes, the "
             f"targets read too) / {dev.bandwidth / 1e12:.2f} TB/s "
             f"(device-to-device copy measured in this run). Host ms: CPU time per step without a sync (near the "
             f"median: host-bound). Graph ms: the step replayed from a CUDA graph (no host work). "
             f"{json.dumps(dev.meta)}", "", HEADER]
    lines += [_row(r) for r in results]
    return "\n".join(lines) + "\n"


def save(dev: Device, results: list[Result], out_dir: str, *, plot: bool = True) -> tuple[str, bool]:
    """The table (results.json, results.md) under ``out_dir``/<device>, and with ``plot`` its x-floor chart:
    ``(folder, whether the chart was written)``."""
    folder = save_table(dev, results, out_dir, "results", markdown(dev, results))
    return folder, plot and _plot(results, os.path.join(folder, "x_floor.png"))


def _plot(results: list[Result], path: str) -> bool:
    """The x-floor bar chart at ``path``; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
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
    return True


def _shapes(p: argparse.ArgumentParser, items: list[str] | None, parts: tuple[int, ...], what: str):
    """``--shapes`` items (``NxC``, ``NxDxC``) as int tuples of one of ``parts`` lengths, each >= 1; a bad item is a
    usage error (before the CUDA check, so a typo shows on any machine)."""
    if items is None:
        return None
    out = []
    for item in items:
        try:
            shape = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) not in parts or min(shape) < 1:
            p.error(f"--shapes takes {what} items of positive ints, got {item!r}")
        out.append(shape)
    return out


DESCRIPTION = ("Time fastlt's losses (forward + backward) beside eager PyTorch, torch.compile, Liger-Kernel and the "
               "official code's style, on a CUDA GPU (it needs one): median ms, GB/s, multiples of the bandwidth "
               "floor, peak extra memory, host ms and CUDA-graph replay. Writes results.json and results.md "
               "(heads.*, shards.* with --heads, --shards) under --out/<device>/.")


def _check_writable(p: argparse.ArgumentParser, out: str) -> None:
    """A usage error now when ``out`` cannot be made or written (it was found when the first table was saved, after
    minutes of GPU time): a file made and removed in its nearest existing folder (``os.access`` says yes to root
    everywhere); no folder is created here."""
    import tempfile

    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        if not os.path.isdir(path):
            raise NotADirectoryError(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        p.error(f"--out {out!r}: {path!r} is not a writable folder ({type(exc).__name__})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastlt bench", description=DESCRIPTION)
    p.add_argument("--loss", nargs="+", default=None, choices=["la", "gcl", "lade", "la_soft"],
                   help="the logits table's losses (default: la gcl lade); la_soft: logit adjustment with mixup "
                        "class-probability targets (floor 3 N C bytes)")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                   help="default: fp32 bf16 (--heads, --shards: bf16)")
    p.add_argument("--shapes", nargs="+", default=None, help="NxC items, e.g. 4096x8142")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (compiles are slow)")
    p.add_argument("--no-official", action="store_true", help="skip the official-style peers")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder (relative to the current one) of the tables, in <device>/ (default %(default)s)")
    p.add_argument("--heads", action="store_true",
                   help="benchmark the fused linear / cosine heads instead (features in; see fastlt.bench_heads)")
    p.add_argument("--shards", nargs="+", type=int, default=None, metavar="W",
                   help="class parallel: each rank's cost for these world sizes (see fastlt.bench_shards); "
                        "--shapes then takes NxC (logits) and NxDxC (heads) items")
    p.add_argument("--no-peers", action="store_true", help="--shards: skip the W = 1 peers")
    a = p.parse_args(argv)
    if a.shards is not None and any(w < 1 for w in a.shards):
        p.error("--shards takes world sizes >= 1")
    if a.shards is not None and a.heads:
        p.error("--shards and --heads are two tables: --shards takes NxDxC shapes for its heads")
    if a.no_peers and a.shards is None:
        p.error("--no-peers applies to --shards only")
    table = "--shards" if a.shards is not None else "--heads" if a.heads else None
    for flag, given in (("--loss", a.loss is not None), ("--no-compile", a.no_compile),
                        ("--no-official", a.no_official)):
        if table and given:  # (was ignored: those tables run their own peers and losses)
            p.error(f"{flag} applies to the logits table, not to {table}")
    _check_writable(p, a.out)
    if a.shards is not None:
        a.shapes = _shapes(p, a.shapes, (2, 3), "NxC (logits) or NxDxC (heads)")
    else:
        a.shapes = _shapes(p, a.shapes, (3,) if a.heads else (2,), "NxDxC" if a.heads else "NxC")
    if not torch.cuda.is_available():
        print("fastlt bench: no CUDA GPU visible; the benchmarks time GPU kernels and never fake a number",
              file=sys.stderr)
        return 2
    if a.shards is not None:
        return _main_shards(a)
    if a.heads:
        return _main_heads(a)
    shapes = SHAPES if a.shapes is None else a.shapes
    losses = ["la", "gcl", "lade"] if a.loss is None else a.loss
    dtypes = ["fp32", "bf16"] if a.dtype is None else a.dtype
    print(HEADER)
    done: list[Result] = []  # saved after each shape, so an interrupted run keeps what it measured

    def keep(dev, part):
        save(dev, done + part, a.out, plot=False)

    bandwidth = None  # measured by the first loss's run, then shared: the table's header states one floor
    for loss in losses:
        dev, part = run((loss,), shapes, dtypes, with_compile=not a.no_compile, with_official=not a.no_official,
                        after_shape=keep, bandwidth=bandwidth)
        done += part
        bandwidth = dev.bandwidth
    folder, wrote_plot = save(dev, done, a.out)
    print(f"\nwrote {folder}/results.json, results.md" + (", x_floor.png" if wrote_plot else
                                                         " (no x_floor.png: matplotlib is not installed)"))
    return 0


def _main_heads(a) -> int:
    from .bench_heads import HEAD_HEADER, HEAD_SHAPES, run_heads, save_heads

    shapes = HEAD_SHAPES if a.shapes is None else a.shapes
    dtypes = ["bf16"] if a.dtype is None else a.dtype
    print(HEAD_HEADER)
    results = []

    def save_rows(d, rows):  # the finished shapes' rows and this shape's so far
        save_heads(d, results + rows, a.out)

    for shape in shapes:  # saved after each row (the 1M shape's rows take ~40 s each with the slowest peer)
        dev, part = run_heads([shape], dtypes, after_row=save_rows)
        results += part
        folder = save_heads(dev, results, a.out)
    print(f"\nwrote {folder}/heads.json, heads.md")
    return 0


def _main_shards(a) -> int:
    from .bench_shards import SHARD_HEADER, SHARD_HEADS, SHARD_LOGITS, run_shards, save_shards

    shapes = a.shapes
    logits = SHARD_LOGITS if shapes is None else [s for s in shapes if len(s) == 2]
    heads = SHARD_HEADS if shapes is None else [s for s in shapes if len(s) == 3]
    dtypes = ["bf16"] if a.dtype is None else a.dtype
    print(SHARD_HEADER)
    dev, results = run_shards(a.shards, logits, heads, dtypes, peers=None if a.no_peers else build_cases,
                              after_shape=lambda dev, part: save_shards(dev, part, a.out))  # (saved as it goes)
    folder = save_shards(dev, results, a.out)
    print(f"\nwrote {folder}/shards.json, shards.md")
    return 0
