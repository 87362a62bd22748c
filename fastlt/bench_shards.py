"""``fastlt bench --shards W [W ...]``: class parallelism's cost per rank, measured on one GPU.

For each world size W, rank 0's local phase at its shard's size (the largest shard of the balanced split) runs
with the collectives replaced by copies of the rank's own contribution (:class:`LocalPhase`): what the GPU does
per rank, with the network's part given as the modelled bytes each rank sends per step. Logits losses (N, C): the
sharded loss on (N, C_W) logits, ``x floor`` against its shard's bandwidth floor ``2 N C_W bytes / BW``. Heads
(N, D -> C, the global batch of N rows): the class-sharded head on the gathered rows, ``x floor`` against its
matmul floor ``6 N D C_W`` FLOPs. Beside them, per W, the alternatives: all-gathering the logits (the W = 1 loss
after a gather of N C bytes) and a replicated head under DDP (the unsharded fused head on the rank's N / W rows,
then an all-reduce of the C D fp32 gradient); and the peers at W = 1 (eager, ``torch.compile``, Liger-Kernel
when installed).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from ._bench_harness import (
    DTYPES,
    Device,
    GradSink,
    floor_ms,
    fmt_host,
    long_tail_counts,
    measure_bandwidth,
    measure_case,
    save_table,
)
from .distributed.class_shard import ClassShard, balanced_bounds
from .distributed.simulate import RankGroup

SHARD_LOGITS = [(4096, 131072), (1024, 1_000_000)]
SHARD_HEADS = [(512, 2048, 8142), (8192, 512, 1_000_000)]
WORLDS = (1, 2, 4, 8, 16, 32, 64)


class LocalPhase(RankGroup):
    """Rank 0 of ``size`` ranks, alone: an all-reduce returns this rank's contribution, an all-gather ``size``
    copies of it (the local work of a collective-bound step, with the network left out)."""

    def __init__(self, size: int):
        self.rank, self.size, self.placeholder_given = 0, size, False

    def simulated_rank_and_size(self) -> tuple[int, int]:
        return 0, self.size

    def simulated_all_reduce(self, t, op: str):
        t = t.detach()
        return t.expand(self.size, *t.shape).clone() if op == "gather" else t.clone()


@dataclass
class ShardResult:
    shape: str
    dtype: str
    W: int
    method: str
    classes: int
    ms: float | None
    x_floor: float | None = None
    extra_gb: float | None = None
    comm_mb: float | None = None
    host_ms: float | None = None
    note: str = ""


def shard_size(C: int, W: int) -> int:
    """The classes of the largest shard of the balanced split (rank 0's)."""
    a, b = balanced_bounds(C, W)[0]
    return b - a


def logits_comm_bytes(N: int) -> int:
    """Bytes a rank sends per step for a sharded logits loss: MAX of N and SUM of 3N fp32."""
    return 16 * N


def head_comm_bytes(N: int, D: int, W: int, dtype: torch.dtype) -> float:
    """A sharded head with gathered inputs, per rank: its N / W features and labels all-gathered, the features'
    fp32 gradient reduce-scattered, and the loss's partials (ring collectives: (W - 1) / W of the gathered size)."""
    share = (W - 1) / W
    return share * N * (D * torch.finfo(dtype).bits / 8 + 8 + 4 * D) + logits_comm_bytes(N)


def build_logits_cases(N: int, C: int, W: int, dtype: torch.dtype, *, loss: str = "la", device="cuda"):
    """Yield (method, make_step) of the sharded logits loss at rank 0's shard of W; for GCL also, at the same width,
    the shard at rank 1's start in ``torch.chunk``'s layout when that start is off a multiple of 8 (1M classes over
    16, 32, 64 ranks), whose tiles draw GCL's noise shifted from its Philox groups (two calls per 8 columns)."""
    from . import functional as LF
    from .priors import gcl_cloud, log_prior

    counts = long_tail_counts(C)
    lp, cloud = log_prior(counts).to(device), gcl_cloud(counts).to(device)
    size = shard_size(C, W)
    y = torch.randint(0, C, (N,), device=device)
    starts = [(0, "")]
    chunk_start = -(-C // W)
    if loss == "gcl" and W > 1 and chunk_start % 8 and chunk_start + size <= C:
        starts.append((chunk_start, f", start {chunk_start}: {chunk_start % 8} past a multiple of 8"))

    def make(shard):
        z = torch.randn(N, size, device=device, dtype=dtype).requires_grad_()
        if loss == "gcl":
            def fn(t):
                return LF.gcl_cross_entropy(t, y, cloud, m=0.5, s=30.0, noise_mul=1.0, seed=1, shard=shard)
        else:
            def fn(t):
                return LF.logit_adjusted_cross_entropy(t, y, lp, shard=shard)

        def step():
            fn(GradSink.apply(z)).backward()
        return step

    for start, tag in starts:
        yield f"fastlt shard ({loss}{tag})", functools.partial(make, ClassShard(start, start + size, C, LocalPhase(W)))


def build_head_cases(N: int, D: int, C: int, W: int, dtype: torch.dtype, *, device="cuda"):
    """Yield (method, make_step): the class-sharded LA head on all N (gathered) rows at rank 0's shard of W, and
    the unsharded fused head on the rank's N / W rows (the replicated head under DDP)."""
    from .heads import linear_cross_entropy
    from .priors import log_prior

    lp = log_prior(long_tail_counts(C)).to(device)
    size = shard_size(C, W)
    shard = ClassShard(0, size, C, LocalPhase(W))

    def head(rows, classes, **kw):
        def make():
            x = torch.randn(rows, D, device=device, dtype=dtype).requires_grad_()
            w = (torch.randn(classes, D, device=device, dtype=dtype) * D ** -0.5).requires_grad_()
            y = torch.randint(0, C, (rows,), device=device)  # global class ids either way

            def step():
                linear_cross_entropy(GradSink.apply(x), GradSink.apply(w), y, log_prior=lp, **kw).backward()
            return step
        return make

    yield "fastlt sharded LA head", head(N, size, shard=shard, gather_inputs=False)
    if W > 1:
        yield "replicated head under DDP (N / W rows)", head(max(1, N // W), C, dp_group=False)


def run_shards(worlds=WORLDS, logits_shapes=SHARD_LOGITS, head_shapes=SHARD_HEADS, dtypes=("bf16",), *,
               peers=None, log=print, after_shape=None):
    """The table's rows; ``peers``: :func:`fastlt.bench.build_cases` for the W = 1 peers (None: none);
    ``after_shape(dev, results so far)`` after each shape's rows (a caller saving as it goes: a run cut short by
    its time bound keeps what it measured)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the benchmarks need a CUDA GPU; none is visible here")
    import triton

    from .bench_heads import head_floor_ms, measure_matmul_rate

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    bw = measure_bandwidth()
    rates = {d: measure_matmul_rate(DTYPES[d]) for d in dtypes}
    dev = Device(props.name, bw, dict(torch=torch.__version__, triton=triton.__version__,
                                      matmul_tflops={d: round(r / 1e12, 1) for d, r in rates.items()}))
    log(f"# {dev.name}: {bw / 1e9:.0f} GB/s copy; matmul " + ", ".join(f"{d} {r / 1e12:.0f} TFLOP/s"
                                                                       for d, r in rates.items()))
    results = []

    def add(r: ShardResult, m, floor):
        r.ms, r.host_ms, r.note = m.ms, m.host_ms, m.note
        if m.ms is not None:
            r.x_floor, r.extra_gb = (m.ms / floor if floor else None), m.extra_gb
        results.append(r)
        log(shard_row(r))

    for dname in dtypes:
        dtype = DTYPES[dname]
        nbytes = torch.finfo(dtype).bits / 8
        for N, C in logits_shapes:
            shape = f"{N} x {C}"
            for W in worlds:
                size = shard_size(C, W)
                for loss in ("la", "gcl"):
                    for method, make in build_logits_cases(N, C, W, dtype, loss=loss):
                        add(ShardResult(shape, dname, W, method, size, None, comm_mb=logits_comm_bytes(N) / 1e6),
                            measure_case(make), floor_ms(N, size, dtype, bw))
                if W > 1:
                    results.append(ShardResult(shape, dname, W, "all-gather of the logits", C, None,
                                               comm_mb=(W - 1) / W * N * C * nbytes / 1e6,
                                               note="then the W = 1 loss on (N, C)"))
                    log(shard_row(results[-1]))
            if peers is not None:
                for method, make in peers(N, C, dtype, loss="la", with_compile=True, with_official=False):
                    if method.startswith(("eager", "torch.compile", "Liger")):
                        add(ShardResult(shape, dname, 1, method, C, None), measure_case(make),
                            floor_ms(N, C, dtype, bw))
            if after_shape is not None:
                after_shape(dev, results)
        for N, D, C in head_shapes:
            shape = f"{N} x {D} -> {C}"
            for W in worlds:
                size = shard_size(C, W)
                for method, make in build_head_cases(N, D, C, W, dtype):
                    ddp = method.startswith("replicated")
                    rows, classes = (max(1, N // W), C) if ddp else (N, size)
                    comm = 4 * C * D if ddp else head_comm_bytes(N, D, W, dtype)
                    add(ShardResult(shape, dname, W, method, classes, None, comm_mb=comm / 1e6), measure_case(make),
                        head_floor_ms(rows, D, classes, rates[dname]))
            if after_shape is not None:
                after_shape(dev, results)
    return dev, results


SHARD_HEADER = ("| shape | dtype | W | method | classes | median ms | x floor | extra GB | comm MB / rank | host ms "
                "| note |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def shard_row(r: ShardResult) -> str:
    return (f"| {r.shape} | {r.dtype} | {r.W} | {r.method} | {r.classes} | {_f(r.ms, '.3f')} | {_f(r.x_floor, '.2f')} "
            f"| {_f(r.extra_gb, '.2f')} | {_f(r.comm_mb, '.3f')} | {fmt_host(r.host_ms)} | {r.note} |")


def save_shards(dev: Device, results: list[ShardResult], out_dir: str) -> str:
    return save_table(dev, results, out_dir, "shards", (
        f"# fastlt class parallel, per rank, on {dev.name}\n\nRank 0's local phase at its shard (the collectives "
        f"replaced by local copies; comm = modelled bytes each rank sends per step). Logits: floor = 2*N*C_W bytes "
        f"at {dev.bandwidth / 1e9:.0f} GB/s; heads: 6*N*D*C_W FLOPs at the matmul rate. {json.dumps(dev.meta)}"
        f"\n\n{SHARD_HEADER}\n" + "\n".join(shard_row(r) for r in results) + "\n"))
