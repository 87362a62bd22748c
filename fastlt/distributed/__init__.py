"""Scaling past one GPU. Data parallel (``dp_group=`` on every loss and head, :mod:`.data_parallel`): the loss of the
global batch on every rank, gradients that DDP/FSDP averaging turns into the single-process gradient. Class parallel
(``shard=`` on the logits losses, :mod:`.class_parallel`): each rank holds the logits of a :class:`ClassShard`,
two all-reduces per forward. The collectives (:mod:`.collectives`); a single-process simulation of the ranks for
tests (:mod:`.simulate`). The distributed samplers are :class:`fastlt.data.ClassBalancedSampler` and
:class:`fastlt.data.CBENSampler` (``num_replicas``, ``rank``, ``seed``, ``set_epoch``)."""

from .class_parallel import shared_input
from .class_shard import ClassShard, balanced_bounds, chunked_bounds
from .collectives import all_reduce, global_logsumexp, global_sum, rank_and_size, world_gradient
from .data_parallel import global_batch_loss, global_lade_loss, noise_row_offset
from .simulate import SimulatedWorld

__all__ = ["all_reduce", "global_logsumexp", "global_sum", "rank_and_size", "world_gradient", "global_batch_loss",
           "global_lade_loss", "noise_row_offset", "SimulatedWorld", "ClassShard", "balanced_bounds",
           "chunked_bounds", "shared_input"]
