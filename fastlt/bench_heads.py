"""The fused-head benchmark of ``fastlt bench --heads``: features (N, D) and weights (C, D) in, loss out.

Every case is forward + backward (dF, dW) of one head, bf16 by default. Reported: median ms (CUDA
events), TFLOP/s of the matmul model, ``x floor`` against the matmul floor ``6 * N * D * C`` FLOPs at the
bf16 (or fp32/tf32) matmul rate measured in the same run by one large ``torch.mm``, and the peak extra
memory over the inputs. Peers in the same process: eager PyTorch (matmul, then the loss on the dense
logits; GCL's noise from ``torch.randn`` as the official loss draws it, but on the GPU), Liger-Kernel's
fused linear CE and Cut Cross-Entropy (optional; both plain CE, so they do less work than the long-tail
heads; CCE both with its default gradient filter and exact, ``filter_eps=None``). Every case is also timed replayed
from a CUDA graph (``graph ms``: the kernels without the host's launch work).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ._bench_harness import (
    DTYPES,
    Device,
    GradSink,
    fmt_graph,
    fmt_host,
    gcl_gpu_noise,
    graph_ms,
    long_tail_counts,
    measure_case,
    save_table,
)

HEAD_SHAPES = [(4096, 2048, 8142), (4096, 1024, 131072), (1024, 1024, 1_000_000)]
HEAD_METHODS = ("fastlt LA head", "fastlt CE head", "fastlt cosine GCL head", "fastlt LADE head",
                "eager LA (linear + loss)", "eager cosine GCL", "eager LADE", "Liger FLCE (CE)", "CCE (CE)",
                "CCE exact (CE, filter_eps=None)")


@dataclass
class HeadResult:
    method: str
    N: int
    D: int
    C: int
    dtype: str
    ms: float | None
    tflops: float | None = None
    x_floor: float | None = None
    extra_gb: float | None = None
    host_ms: float | None = None
    note: str = ""
    graph_ms: float | None = None  # replayed from a CUDA graph: kernel time without host time


def measure_matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s of an 8192^3 ``torch.mm`` in ``dtype`` (fp32 runs as tf32 when the caller allows it)."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: torch.mm(a, b), warmup=25, rep=100, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3)


def head_floor_ms(N: int, D: int, C: int, rate: float) -> float:
    """The three matmuls of a linear head (logits, dF, dW): ``6 N D C`` FLOPs at ``rate`` FLOP/s."""
    return 6 * N * D * C / rate * 1e3


def build_head_cases(N: int, D: int, C: int, dtype: torch.dtype, methods=HEAD_METHODS, *, device="cuda"):
    """Yield (method, make_step); ``make_step()`` allocates the inputs and returns a fwd+bwd step."""
    import torch.nn.functional as F

    from . import heads
    from . import reference as R
    from .priors import gcl_cloud, log_prior, prior

    dev = device
    counts = long_tail_counts(C)
    lp, cloud, pi = log_prior(counts).to(dev), gcl_cloud(counts).to(dev), prior(counts).to(dev)
    y = torch.randint(0, C, (N,), device=dev)

    def make(fn):
        def build():
            x = (torch.randn(N, D, device=dev, dtype=dtype) / D ** 0.5).requires_grad_()
            w = (torch.randn(C, D, device=dev, dtype=dtype) / D ** 0.5).requires_grad_()

            def step():
                fn(GradSink.apply(x), GradSink.apply(w)).backward()
            return step
        return build

    gcl = dict(cloud=cloud, noise_mul=1.0, margin=0.5, scale=30.0, seed=1)
    table = {
        "fastlt LA head": lambda: make(lambda x, w: heads.linear_cross_entropy(x, w, y, log_prior=lp,
                                                                               backend="triton")),
        "fastlt CE head": lambda: make(lambda x, w: heads.linear_cross_entropy(x, w, y, backend="triton")),
        "fastlt cosine GCL head": lambda: make(lambda x, w: heads.cosine_cross_entropy(x, w, y, backend="triton",
                                                                                        **gcl)),
        "fastlt LADE head": lambda: make(lambda x, w: heads.lade_linear_loss(x, w, y, pi, backend="triton")),
        "eager LA (linear + loss)": lambda: make(lambda x, w: F.cross_entropy(F.linear(x, w) + lp.to(dtype), y)),
        "eager cosine GCL": lambda: make(lambda x, w: gcl_gpu_noise(
            F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1)), y, cloud)),
        "eager LADE": lambda: make(lambda x, w: R.lade_loss(F.linear(x, w), y, pi)),
        "Liger FLCE (CE)": _liger_case(make, y),
        "CCE (CE)": _cce_case(make, y),
        # its default filter skips the gradient blocks whose softmax is below ~2^-12 (most of them at 10^6 random
        # classes): less work than an exact head; filter_eps=None computes every block
        "CCE exact (CE, filter_eps=None)": _cce_case(make, y, filter_eps=None),
    }
    for method in methods:
        factory = table[method]
        if factory is None:
            continue  # optional peer not installed
        yield method, factory()


def _liger_case(make, y):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - optional peer: any import failure means "not installed"
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda: make(lambda x, w: loss(w, x, y))


def _cce_case(make, y, **options):
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception:  # noqa: BLE001 - optional peer
        return None
    return lambda: make(lambda x, w: cce(x, w, y, **options))


def run_heads(shapes=HEAD_SHAPES, dtypes=("bf16",), methods=HEAD_METHODS, *, log=print, after_row=None):
    if not torch.cuda.is_available():
        raise RuntimeError("the benchmarks need a CUDA GPU; none is visible here")
    import triton

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    rates = {d: measure_matmul_rate(DTYPES[d]) for d in dtypes}
    dev = Device(props.name, 0.0, dict(torch=torch.__version__, triton=triton.__version__,
                                        matmul_tflops={d: round(r / 1e12, 1) for d, r in rates.items()},
                                        allow_tf32=torch.backends.cuda.matmul.allow_tf32))
    log(f"# {dev.name}: matmul " + ", ".join(f"{d} {r / 1e12:.0f} TFLOP/s" for d, r in rates.items()))
    results = []
    for N, D, C in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            floor = head_floor_ms(N, D, C, rates[dname])
            for method, make in build_head_cases(N, D, C, dtype, methods):
                m = measure_case(make)
                r = HeadResult(method, N, D, C, dname, m.ms, host_ms=m.host_ms, note=m.note)
                if m.ms is not None:
                    r.tflops, r.x_floor, r.extra_gb = 6 * N * D * C / (m.ms * 1e-3) / 1e12, m.ms / floor, m.extra_gb
                    r.graph_ms, r.note = graph_ms(make, note=r.note, method=method)
                results.append(r)
                log(head_row(r))
                if after_row is not None:  # (a caller saving as it goes: a bound that stops the run keeps the rows)
                    after_row(dev, results)
    return dev, results


HEAD_HEADER = ("| N x D -> C | dtype | method | median ms | graph ms (x floor) | TFLOP/s | x matmul floor | extra GB "
               "| host ms | note |\n|---|---|---|---|---|---|---|---|---|---|")


def head_row(r: HeadResult) -> str:
    shape = f"{r.N} x {r.D} -> {r.C}"
    if r.ms is None:
        return f"| {shape} | {r.dtype} | {r.method} | — | — | — | — | — | — | {r.note} |"
    return (f"| {shape} | {r.dtype} | {r.method} | {r.ms:.3f} | {fmt_graph(r.graph_ms, r.ms / r.x_floor)} | "
            f"{r.tflops:.0f} | {r.x_floor:.2f} | {r.extra_gb:.2f} | {fmt_host(r.host_ms)} | {r.note} |")


def save_heads(dev: Device, results: list[HeadResult], out_dir: str) -> str:
    return save_table(dev, results, out_dir, "heads", (
        f"# fastlt fused heads on {dev.name}\n\nForward + backward (dF, dW), median of CUDA-event timings; floor = "
        f"6*N*D*C FLOPs at the matmul rate measured in this run. {json.dumps(dev.meta)}\n\n{HEAD_HEADER}\n"
        + "\n".join(head_row(r) for r in results) + "\n"))
