"""The demo under data parallelism (CPU, gloo)::

    torchrun --standalone --nproc_per_node 2 -m fastlt.ddp_demo [demo options]


The same training as ``fastlt demo`` (:mod:`fastlt.demo`), on the CPU with the gloo backend: every model is wrapped
in ``DistributedDataParallel``, each global batch of 32 is split into contiguous per-rank parts, every loss gets
``dp_group`` (the global batch's loss: LADE's column statistics and the means over all ranks, GCL's noise rows of
the single process), and GCL's stage-2 :class:`fastlt.data.CBENSampler` draws one seeded stream that the ranks
slice. Rank 0 prints the demo's table; it matches the single-process ``fastlt demo`` up to the rounding of the
gradient all-reduce (SGD over 60 epochs can turn that into a test image or two).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from . import demo

__all__ = ["main", "DDPRanks"]


class DDPRanks(demo.Ranks):
    """:class:`fastlt.demo.Ranks` of the initialised default process group: models wrapped in DDP."""

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model.module if isinstance(model, DistributedDataParallel) else model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --standalone --nproc_per_node N -m fastlt.ddp_demo",
                                     description="fastlt demo under DistributedDataParallel (gloo, CPU).")
    demo.add_arguments(parser)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run me under torchrun: torchrun --standalone --nproc_per_node 2 -m fastlt.ddp_demo")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        ranks = DDPRanks(group=dist.group.WORLD, rank=dist.get_rank(), size=dist.get_world_size())
        if ranks.rank != 0:
            args.no_progress = True
        torch.manual_seed(0)  # every rank seeded alike, the usual DDP setup (the demo seeds what it draws)
        code = demo.run_from_args(args, ranks)
        # every rank done before any tears gloo down (a rank leaving first was seen, once in ~20 runs, to abort in
        # gloo's teardown: "terminate called without an active exception")
        dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
