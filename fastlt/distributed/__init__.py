"""Scaling past one GPU. Data parallel (``dp_group=`` on every loss and head, :mod:`.data_parallel`): the loss of the
global batch on every rank, gradients that DDP/FSDP averaging turns into the single-process gradient. Class parallel
(``shard=`` on the logits losses, :mod:`.class_parallel`, or class-sharded DTensor logits, :mod:`.dtensor`): each
rank holds the logits of a :class:`ClassShard`, two all-reduces per forward; class-parallel heads
(:mod:`.sharded_heads`) and what training them needs (:mod:`.sharded_training`). The collectives
(:mod:`.collectives`); a single-process simulation of the ranks for tests (:mod:`.simulate`). The distributed
samplers are :class:`fastlt.data.ClassBalancedSampler` and :class:`fastlt.data.CBENSampler` (``num_replicas``,
``rank``, ``seed``, ``set_epoch``)."""

from .class_parallel import shared_input
from .class_shard import ClassShard, balanced_bounds, chunked_bounds
from .collectives import all_gather, all_reduce, global_logsumexp, global_sum, rank_and_size, world_gradient
from .data_parallel import global_batch_loss, global_lade_loss, noise_row_offset
from .dtensor import from_dtensor
from .sharded_heads import gather_rows
from .sharded_training import clip_grad_norm_, exclude_from_ddp, gather_full_weight
from .simulate import SimulatedWorld

__all__ = ["all_reduce", "all_gather", "global_logsumexp", "global_sum", "rank_and_size", "world_gradient",
           "global_batch_loss", "global_lade_loss", "noise_row_offset", "SimulatedWorld", "ClassShard",
           "balanced_bounds", "chunked_bounds", "shared_input", "from_dtensor", "gather_rows", "exclude_from_ddp",
           "clip_grad_norm_", "gather_full_weight"]
