"""A class-parallel head's training step on a real multi-GPU node (torchrun, NCCL); skips below 2 GPUs.

    torchrun --standalone --nproc_per_node 8 benchmarks/class_parallel_step.py --classes 1000000 --dim 512 \
        --batch 1024 --head gcl

Each rank holds ``batch`` rows of backbone features (bf16, a stand-in for the backbone's output) and the weight rows
of its balanced class shard (``fastlt.CosineGCLHead`` or an LA ``fastlt.LinearLossHead`` with ``shard=``,
``gather_inputs=True``). Reported on rank 0: the step's median ms (forward + backward, CUDA events), the
communication share (the step's collectives at the same sizes, timed alone: all-gather of features and labels,
MAX and SUM of the loss's partials, reduce-scatter of dF), the peak memory per rank, and the modelled bytes per
collective; beside it, the replicated head under DDP (the unsharded fused head on the rank's rows plus an
all-reduce of its fp32 (C, D) gradient) when it fits. Writes JSON and markdown under
``benchmarks/results/<device>/class_parallel_step_W<W>.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def _median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024, help="rows per rank")
    p.add_argument("--head", choices=["gcl", "la"], default="gcl")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or torch.cuda.device_count() < 2:
        print(f"class_parallel_step: skipped: needs >= 2 GPUs under torchrun (WORLD_SIZE={world}, "
              f"{torch.cuda.device_count()} GPUs visible)")
        return 0
    import fastlt
    from fastlt.distributed import ClassShard

    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    group = dist.group.WORLD
    C, D, n, dt = a.classes, a.dim, a.batch, torch.bfloat16
    counts = torch.randint(1, 1000, (C,), generator=torch.Generator().manual_seed(0))
    shard = ClassShard.balanced(C, group)
    if a.head == "gcl":
        head = fastlt.CosineGCLHead(D, C, counts, shard=shard, device="cuda", dtype=dt)
    else:
        head = fastlt.LinearLossHead(D, C, counts, loss="la", shard=shard, device="cuda", dtype=dt)
    x = torch.randn(n, D, device="cuda", dtype=dt, requires_grad=True)
    y = torch.randint(0, C, (n,), device="cuda")

    def step():
        loss = head(x, y, seed=1) if a.head == "gcl" else head(x, y)
        loss.backward()
        x.grad, head.weight.grad = None, None

    torch.cuda.reset_peak_memory_stats()
    step_ms = _median_ms(step)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    feats, labels = torch.empty(world * n, D, device="cuda", dtype=dt), torch.empty(world * n, device="cuda",
                                                                                    dtype=torch.long)
    dfull, dlocal = torch.empty(world * n, D, device="cuda"), torch.empty(n, D, device="cuda")
    rowmax, sums = torch.empty(world * n, device="cuda"), torch.empty(3, world * n, device="cuda")

    def comms():
        dist.all_gather_into_tensor(feats, x.detach())
        dist.all_gather_into_tensor(labels, y)
        dist.all_reduce(rowmax, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums)
        dist.reduce_scatter_tensor(dlocal, dfull)

    comm_ms = _median_ms(comms)
    share = (world - 1) / world
    bytes_per = {"all-gather features": share * world * n * D * 2, "all-gather labels": share * world * n * 8,
                 "MAX row maxima": 4 * world * n, "SUM partials": 12 * world * n,
                 "reduce-scatter dF (fp32)": share * world * n * D * 4}
    ddp = {}
    try:
        full = fastlt.LinearLossHead(D, C, counts, loss="la", device="cuda", dtype=dt, dp_group=False)
        grad = torch.empty(C, D, device="cuda")

        def ddp_step():
            full(x, y).backward()
            dist.all_reduce(grad)
            x.grad, full.weight.grad, full.bias.grad = None, None, None

        ddp = dict(step_ms=_median_ms(ddp_step), allreduce_bytes=4 * C * D)
    except torch.cuda.OutOfMemoryError:
        ddp = dict(note="out of memory")
    if rank == 0:
        name = torch.cuda.get_device_name(0).replace(" ", "-")
        row = dict(world=world, classes=C, dim=D, rows_per_rank=n, head=a.head, shard_classes=shard.size,
                   step_ms=step_ms, comm_ms=comm_ms, comm_share=comm_ms / step_ms, peak_gb=peak_gb,
                   collective_bytes=bytes_per, replicated_ddp=ddp, torch=torch.__version__)
        folder = os.path.join(a.out, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"class_parallel_step_W{world}.json"), "w") as f:
            json.dump(row, f, indent=1)
        md = (f"| W | C | D | rows/rank | head | step ms | comm ms (share) | peak GB | replicated head + DDP ms |\n"
              f"|---|---|---|---|---|---|---|---|---|\n| {world} | {C} | {D} | {n} | {a.head} | {step_ms:.3f} | "
              f"{comm_ms:.3f} ({comm_ms / step_ms:.0%}) | {peak_gb:.2f} | "
              f"{ddp.get('step_ms', float('nan')):.3f} |\n")
        with open(os.path.join(folder, f"class_parallel_step_W{world}.md"), "w") as f:
            f.write(md)
        print(md)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
