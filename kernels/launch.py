"""Launchers of the adjusted cross-entropy's kernels (docs/design.md, "Kernels"): they turn an
:class:`fastlt._operator.AdjustedCEArgs` and tensors into the kernels' argument groups, pick the tiles
(:mod:`fastlt.kernels.tiles`) and the batch reduction's place (:mod:`fastlt.kernels.counters`), allocate the
outputs and launch, every argument by keyword. No host syncs.

Per row the forward leaves ``loss_rows`` (N,), ``row_stats`` (2, N) = (row max, log sum-exp) of the adjusted row
(the LSE is their sum, kept apart so the backward's ``exp((a - max) - log_sum)`` is as exact as torch's softmax)
and ``row_coef`` (N,), the backward's coefficient of the row before grad_output (d reduced loss / d loss_i times
the focal factor); all fp32.

Targets are class indices (N,) or, as a floating (N, C) tensor in their place, class probabilities
(:class:`fastlt.kernels.adjusted_ce.Soft`): then ``row_stats`` is (3, N) with ``W_q`` third, the reduction must be
'sum' or 'none', and ``args.row_scale`` multiplies the rows (the callers run 'mean' as 'sum' with ``1 / N``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .._operator import AdjustedCEArgs
from ..noise import noise_table
from . import counters, tiles
from .adjusted_ce import (
    ClassVectors,
    Columns,
    ColumnStats,
    ColumnTerm,
    Flags,
    Hyper,
    Operand,
    RowOutputs,
    Soft,
    StoredTiles,
    row_loss_combine,
    row_loss_forward,
    row_loss_grad,
)
from .device_guard import on_its_device
from .reduce import (
    DENOM_OWN,
    DENOM_POINTER,
    DENOM_PUBLISHED,
    Reduction,
    Scaled,
    Targets,
    reduce_rows,
    scale_rows,
)
from .tiles import TileConfig, cdiv, column_stat_blocks, end_align, pick_tiles, row_align

__all__ = ["loss", "forward", "grad", "StepPlans", "chunk_partials", "combine_partials", "PARTIAL_PLANES", "reduce",
           "inv_denominator_of", "scale_by", "scale_all", "new_column_stats", "ColumnStats", "TileConfig", "pick_tiles",
           "row_align", "end_align", "column_stat_blocks"]


# --- the operator's argument groups ---------------------------------------------------------------------------------

def kernel_flags(args: AdjustedCEArgs) -> Flags:
    """The :class:`fastlt.kernels.adjusted_ce.Flags` of ``args``: which terms are on."""
    noise_mode = 0 if not args.has_noise else (1 if args.noise_mul == 1.0 else 2)
    return Flags(HAS_LOG_PRIOR=args.has_log_prior, NOISE_MODE=noise_mode, MARGIN_MODE=args.margin_mode,
                 SCALE_MODE=_scale_mode(args.scale), HAS_WEIGHT=args.weight is not None,
                 HAS_SMOOTH=args.label_smoothing > 0.0, HAS_FOCAL=args.gamma != 0.0,
                 SEED_FROM_PTR=args.seed_from_device)


def _scale_mode(s: float) -> int:
    """:class:`fastlt.kernels.adjusted_ce.Flags`' SCALE_MODE of the logit scale s: 0 (s = 1), 1 (s > 0), 2."""
    return 0 if s == 1.0 else (1 if s > 0.0 else 2)


# A pointer a flag leaves unused is this placeholder, not None: None would drop the parameter, and the parameters'
# layout decides which pairs of 32-bit scalars ptxas loads as one 64-bit word (tools/kernel_report.py counted one
# more load in a few kernels with Nones). A scalar a kernel never reads is None (see Hyper).
@functools.cache
def _dummy(device: torch.device) -> torch.Tensor:
    """A 1-element placeholder for pointer arguments a flag leaves unused (never read or written)."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _or_dummy(t: torch.Tensor | None, dev) -> torch.Tensor:
    return t if t is not None else _dummy(dev)


class KernelGroups(NamedTuple):
    """The argument groups the launches of ``args`` take: the class vectors, the runtime scalars and the flags of the
    forward, the noise's arguments but the int seed (``noise_row0``, ``seed_ptr``, ``noise_table``, as keywords) and
    that seed (``args``'; a launch passes a call's drawn seed in its place: GCL's fresh seed of a step whose other
    arguments are cached, :func:`fastlt._glue.adjusted_cross_entropy_triton`), and the scalars and flags of the
    gradient (which reads no gamma)."""

    vecs: ClassVectors
    hp: Hyper
    flags: Flags
    rng: dict
    seed: int
    grad_hp: Hyper
    grad_flags: Flags


def kernel_groups(args: AdjustedCEArgs, dev) -> KernelGroups:
    """:class:`KernelGroups` of ``args`` on ``dev``, made once per ``args`` (in its ``memo``: a module's steps reuse
    their arguments, :class:`fastlt._operator.ArgsCache`, so they make them once)."""
    groups = args.memo.get(dev)
    if groups is None:
        d = _dummy(dev)
        margin = args.margin_vector
        vecs = ClassVectors(d if args.log_prior is None else args.log_prior, d if args.cloud is None else args.cloud,
                            d if margin is None else margin, d if args.weight is None else args.weight)
        hp = Hyper(args.ignore_index, args.tau, args.noise_mul, args.margin_value, args.scale, args.gamma,
                   args.label_smoothing)
        f = kernel_flags(args)
        rng = dict(noise_row0=args.noise_row_offset, seed_ptr=args.seed if args.seed_from_device else d,
                   noise_table=noise_table(dev) if args.has_noise else d)
        groups = args.memo[dev] = KernelGroups(vecs, hp, f, rng, args.seed_value, hp._replace(gamma=None),
                                               f._replace(HAS_FOCAL=False))
    return groups


def _operand(t: torch.Tensor) -> Operand:
    return Operand(t, t.stride(0), t.stride(1))


def _soft(y: torch.Tensor, args: AdjustedCEArgs | None) -> Soft | None:
    """The :class:`Soft` group when ``y`` holds class probabilities (floating, (N, C)), else None (no parameter);
    ``args.row_scale`` multiplies the rows (``args`` None: a launch that finishes no row, no scale)."""
    if not y.is_floating_point():
        return None
    if args is not None and args.reduction == "mean":
        raise ValueError("class-probability targets: run 'mean' as 'sum' with row_scale=1/N (fastlt._glue.soft_mean)")
    return Soft(q=y, stride_m=y.stride(0), stride_n=y.stride(1),
                row_scale=None if args is None else float(args.row_scale))


def _flags(flags: Flags, soft: Soft | None, col_base: int = 0) -> Flags:
    """``flags`` for a launch: SOFT with class-probability targets; NOISE_SHIFT, how far past a multiple of 8 the
    noise columns start (a class chunk or shard at ``col_base``)."""
    if soft is not None:
        flags = flags._replace(SOFT=True)
    if flags.NOISE_MODE and col_base % 8:
        flags = flags._replace(NOISE_SHIFT=col_base % 8)
    return flags


def _check_noise_tiles(flags: Flags, cfg: TileConfig) -> None:
    """GCL's noise is drawn a Philox group of 8 columns at a time, so a tile (and a column split) must span whole
    groups: its columns then start on the group grid, or at a class shard's own shift from it (NOISE_SHIFT). The
    tile picker's widths always do; an explicit ``config`` may not."""
    if flags.NOISE_MODE and (cfg.block_n % 8 or cfg.cols_per_split % 8):
        raise ValueError(f"GCL's noise needs tiles and column splits of a multiple of 8 columns, got block_n="
                         f"{cfg.block_n}, cols_per_split={cfg.cols_per_split} (config)")


def reads_class_vectors(f: Flags) -> bool:
    """Whether the row kernels of the terms ``f`` read a (C,) vector per element (a log prior, GCL's cloud, class
    weights with label smoothing): :func:`fastlt.kernels.tiles.pick_tiles`'s ``class_vectors``."""
    return f.HAS_LOG_PRIOR or f.NOISE_MODE != 0 or (f.HAS_WEIGHT and f.HAS_SMOOTH)


def _tile_streams(f: Flags, soft) -> dict:
    """:func:`fastlt.kernels.tiles.pick_tiles`'s arguments for what the column loop of the terms ``f`` loads beside
    the logits: whether it reads class vectors, how many ((C,) fp32: the log prior, GCL's cloud, class weights with
    smoothing or class probabilities) and the class probabilities' element size (``soft``, or 0)."""
    vectors = int(f.HAS_LOG_PRIOR) + int(f.NOISE_MODE != 0) + int(f.HAS_WEIGHT and (f.HAS_SMOOTH or soft is not None))
    return dict(class_vectors=reads_class_vectors(f), streamed_vectors=vectors,
                soft_bytes=0 if soft is None else soft.q.element_size())


def weight_sum(args: AdjustedCEArgs) -> torch.Tensor | None:
    """(1,) fp32 ``W = sum_j w_j``, which the kernels need only for label smoothing with class weights (else None);
    one launch per ``args`` (cached on it: the forward and the backward share it)."""
    if args.weight is None or args.label_smoothing == 0.0:
        return None
    return args.weight_total


def new_column_stats(N: int, C: int, device, row_blocks: int | None = None, *, soft: bool = False) -> ColumnStats:
    """An uninitialised :class:`ColumnStats` for N rows and C classes (LADE's column partials), in ``row_blocks``
    blocks of rows (default: :func:`column_stat_blocks`, the default tiles' count); ``soft``: (4, R, C) partials,
    the class sums and counts of class-probability targets as planes 2 and 3."""
    R = column_stat_blocks(N) if row_blocks is None else row_blocks
    return ColumnStats(partials=torch.empty((4 if soft else 2, R, C), dtype=torch.float32, device=device),
                       target_logits=torch.empty(N, dtype=torch.float32, device=device))


def _check_partials(part: torch.Tensor, N: int, soft: bool) -> None:
    """``part``: (PARTIAL_PLANES, N, chunks) fp32 ((6, N, chunks) for class probabilities), contiguous."""
    planes = 6 if soft else PARTIAL_PLANES
    if (part.dim() != 3 or part.shape[0] != planes or part.shape[1] != N or part.dtype != torch.float32
            or not part.is_contiguous()):
        raise ValueError(f"partials must be a contiguous fp32 ({planes}, {N}, chunks) tensor, got "
                         f"{tuple(part.shape)} {part.dtype}")


# The planes of a split row's partials: max, sum-exp, target logit, label smoothing's sum_j w_j (a_j - max) and its
# weights sum_j w_j (the combine moves each split's sum to the row's max); (6, ...) for class probabilities
# (:class:`fastlt.kernels.adjusted_ce.Soft`).
PARTIAL_PLANES = 5


def _row_outputs(N: int, dev, soft: bool = False) -> RowOutputs:
    # three allocations, not views of one: the torch.compile ops return row_stats and row_coef, and an op's outputs
    # may not share memory (sizes as separate arguments, positional: a shape tuple and keywords cost the host more)
    f32 = torch.float32
    return RowOutputs(torch.empty(N, dtype=f32, device=dev), torch.empty(3 if soft else 2, N, dtype=f32, device=dev),
                      torch.empty(N, dtype=f32, device=dev))


# --- batch reductions -----------------------------------------------------------------------------------------------

def _targets(y: torch.Tensor, args: AdjustedCEArgs) -> Targets:
    return Targets(ptr=y, weight=_or_dummy(args.weight, y.device), N=y.shape[0],
                   C=args.weight.shape[0] if args.weight is not None else 0, ignore_index=args.ignore_index)


def fused_reduction(device: torch.device, values: int, rblock: int, reduction: str) -> tuple[torch.Tensor | None, int]:
    """``(counter, REDUCE)`` for a launch whose last program would sum ``values`` values in ``rblock``-wide steps: a
    counter (:func:`fastlt.kernels.counters.reduce_counter`) and 1 ('sum') or 2 ('mean'), or ``(None, 0)`` when the
    reduction must be a launch of its own (:func:`fastlt.kernels.tiles.fusable_reduction` says no, or no counter is
    to be had)."""
    if not tiles.fusable_reduction(values, rblock):
        return None, 0
    counter = counters.reduce_counter(device)
    return counter, 0 if counter is None else (2 if reduction == "mean" else 1)


def _mean_denominator(y: torch.Tensor, args: AdjustedCEArgs, inv_denominator, mean: bool, programs: int,
                      counter: torch.Tensor | None):
    """``(inv, DENOM)`` for a launch of ``programs`` row programs (see ``row_loss_forward``'s DENOM): with 'mean'
    scaling (``mean``) and no given ``inv_denominator``, the programs sum the denominator themselves when that is
    cheap (:func:`fastlt.kernels.tiles.own_denominator`: ``inv`` None), else the launch's first program sums and
    publishes it when the launch reduces the batch (``counter``, its slot, is ``inv``), else one launch computes it
    first (:func:`inv_denominator_of`)."""
    if not mean or inv_denominator is not None:
        return inv_denominator, DENOM_POINTER
    if tiles.own_denominator(programs, y.shape[0]):
        return None, DENOM_OWN
    if counter is not None:
        return counter, DENOM_PUBLISHED
    return inv_denominator_of(y, args), DENOM_POINTER


def reduce_unless_fused(out: torch.Tensor | None, counter: torch.Tensor | None, loss_rows: torch.Tensor,
                        y: torch.Tensor, args: AdjustedCEArgs, *, inv_denominator=None, row_coef=None,
                        scale_mean: bool = True, extra=None) -> None:
    """The batch loss into ``out`` by one :func:`reduce` launch, for a launch that was asked for it (``out``) but had
    no ``counter`` (:func:`fused_reduction`) to reduce it itself; else nothing. With 'mean' and ``scale_mean=False``
    the rows' ``row_coef`` is scaled by 1 / sum_i w_{y_i} there too; ``extra`` as :func:`reduce`."""
    if out is None or counter is not None:
        return
    unscaled = args.reduction == "mean" and not scale_mean
    reduce(loss_rows, y, args, inv_denominator=inv_denominator, row_coef=row_coef if unscaled else None,
           extra=extra, out=out)


def _reduce_launch(y: torch.Tensor, args: AdjustedCEArgs, *, loss_rows=None, row_coef=None, inv_denom=None, out=None,
                   extra=None, denom: bool, mean: bool) -> None:
    dev = y.device
    reduce_rows[(1,)](
        loss_ptr=_or_dummy(loss_rows, dev), t=_targets(y, args), coef_ptr=_or_dummy(row_coef, dev),
        inv_denom_ptr=_or_dummy(inv_denom, dev), out_ptr=_or_dummy(out, dev), extra_ptr=_or_dummy(extra, dev),
        E=extra.shape[0] if extra is not None else 0, HAS_WEIGHT=args.weight is not None,
        DENOM=denom, LOSS=loss_rows is not None, MEAN=mean, SCALE_COEF=row_coef is not None,
        EXTRA=extra is not None, BLOCK=tiles.REDUCE_BLOCK, num_warps=8)


@on_its_device
def inv_denominator_of(y: torch.Tensor, args: AdjustedCEArgs) -> torch.Tensor:
    """(1,) fp32 ``1 / sum_i w_{y_i}`` over the valid rows ('mean'; inf for an empty batch; a target outside
    [0, C) counts 0). No sync; one launch up to ``tiles.ONE_PROGRAM_ROWS`` rows."""
    if y.shape[0] > tiles.ONE_PROGRAM_ROWS:
        valid = y != args.ignore_index
        if args.weight is not None:
            in_range = valid & (y >= 0) & (y < args.weight.shape[0])
            safe = torch.where(in_range, y, torch.zeros_like(y)).long()
            denom = (args.weight.to(torch.float32)[safe] * in_range).sum()
        else:
            denom = valid.sum(dtype=torch.float32)
        return denom.reciprocal_().reshape(1)
    inv = torch.empty(1, dtype=torch.float32, device=y.device)
    _reduce_launch(y, args, inv_denom=inv, denom=True, mean=True)
    return inv


@on_its_device
def reduce(loss_rows: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, *,
           inv_denominator: torch.Tensor | None = None, row_coef: torch.Tensor | None = None,
           extra: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss from the (N,) fp32 per-row losses: 'none' returns ``loss_rows``; 'sum' their sum; 'mean'
    the sum times ``inv_denominator`` ((1,) fp32, see :func:`inv_denominator_of`), computed here when None;
    then ``row_coef`` (the forward's, run with ``scale_mean=False``), if given, is multiplied by it in place.
    ``extra``: (E,) fp32 values added to the reduced loss (LADE's LADER partials). Returns a 0-dim tensor of
    ``out_dtype`` (NaN for the 'mean' of no rows), or writes it into ``out`` (0-dim) when given. One deterministic
    launch up to ``tiles.ONE_PROGRAM_ROWS`` rows (and extra values), torch reductions beyond."""
    if args.reduction == "none":
        if extra is not None:
            raise ValueError("extra= needs a reduced loss ('mean' or 'sum')")
        return loss_rows
    mean = args.reduction == "mean"
    if max(loss_rows.shape[0], 0 if extra is None else extra.shape[0]) > tiles.ONE_PROGRAM_ROWS:
        inv = inv_denominator if inv_denominator is not None or not mean else inv_denominator_of(y, args)
        if mean and inv_denominator is None and row_coef is not None:  # ignored rows stay 0 (inf when none is valid)
            row_coef.mul_(inv).masked_fill_(y == args.ignore_index, 0.0)
        total = loss_rows.sum()
        total = total * inv[0] if mean else total
        total = total if extra is None else total + extra.sum()
        return total.to(out_dtype) if out is None else out.copy_(total)
    out = torch.empty((), dtype=out_dtype, device=loss_rows.device) if out is None else out
    if mean and inv_denominator is None:
        inv = torch.empty(1, dtype=torch.float32, device=loss_rows.device)
        _reduce_launch(y, args, loss_rows=loss_rows, row_coef=row_coef, inv_denom=inv, out=out, extra=extra,
                       denom=True, mean=True)
    else:
        _reduce_launch(y, args, loss_rows=loss_rows, inv_denom=inv_denominator if mean else None, out=out,
                       extra=extra, denom=False, mean=mean)
    return out


# --- the row kernels ------------------------------------------------------------------------------------------------

class StepPlans:
    """The launch plans of a loss module's repeated call (:class:`fastlt.losses._LastCall`: one ``args``, logits and
    targets of one shape, dtype, device and layout, class indices, the default tiles), kept by the caller and passed
    to :func:`loss`, :func:`forward` and :func:`grad`, which then look up no plan by a key built per call (host
    time): the forward's, by whether it writes the gradient (over the logits), takes LADE's column statistics and
    scales 'mean' (:func:`forward_slot`), and the recompute gradient's (a given ``grad_output``, with or without
    LADE's column term: ``GRAD``, ``GRAD_COLUMN_TERM``), each made at its first launch. Void after the tile settings
    change (``tiles.GENERATION``, ``STORE_PROBS``: tests, tuning). The caller answers for the rest: plans of other
    tensors would launch wrong grids (the gradient's checks the saved logits' layout, which hooks may change)."""

    __slots__ = ("slots", "settings")

    GRAD, GRAD_COLUMN_TERM = 8, 9  # (0-7: the forward's)
    SIZE = 10

    def __init__(self):
        self.slots: list = [None] * self.SIZE
        self.settings = (tiles.GENERATION, STORE_PROBS)

    @staticmethod
    def forward_slot(writes_grad: bool, column_stats: bool, scale_mean: bool) -> int:
        """The slot of a :func:`forward` plan: one per combination of the arguments its key takes beside the
        tensors (``grad_out`` given, and then the logits themselves; ``column_stats``; ``scale_mean``)."""
        return 4 * writes_grad + 2 * column_stats + scale_mean

    def get(self, slot: int):
        """The plan in ``slot``, or None (not made yet, or made under other tile settings)."""
        return self.slots[slot] if self.settings == (tiles.GENERATION, STORE_PROBS) else None

    def put(self, slot: int, plan) -> None:
        settings = (tiles.GENERATION, STORE_PROBS)
        if self.settings != settings:
            self.slots, self.settings = [None] * self.SIZE, settings
        self.slots[slot] = plan


@on_its_device
def loss(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, *, grad_out: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float32, config: TileConfig | None = None, seed: int | None = None,
         plans: StepPlans | None = None):
    """The reduced loss (0-dim, ``out_dtype``; the (N,) fp32 rows for 'none') in the fewest launches: ``(loss,
    row_stats, row_coef)`` as :func:`forward` gives them (the coefficient includes 'mean''s 1 / sum w_{y_i}). Up to
    :func:`fused_reduction`'s rows the row kernel's last program reduces the batch, so a step is one launch (plus
    the combine of split rows); with ``grad_out`` (gradient in the forward) 'mean' needs its denominator before any
    gradient is written, which the row programs sum themselves when that is cheap (``tiles.OWN_DENOM_READS``), the
    launch's first program sums and publishes to the others when the launch also reduces the batch (4096 x 8142:
    still one launch), and one small launch computes first otherwise (batches past the fused reduction's rows).
    ``seed``, ``plans``: as :func:`forward`."""
    # (forward's body: this launcher already runs on z's device)
    if args.reduction == "none":
        loss_rows, row_stats, row_coef, _ = forward.__wrapped__(z, y, args, grad_out=grad_out, config=config,
                                                                seed=seed, plans=plans)
        return loss_rows, row_stats, row_coef
    out = torch.empty((), dtype=out_dtype, device=z.device)
    _, row_stats, row_coef, _ = forward.__wrapped__(z, y, args, grad_out=grad_out, config=config,
                                                    scale_mean=grad_out is not None, out=out, seed=seed, plans=plans)
    return out, row_stats, row_coef


# A gradient in the forward over rows of several tiles makes two passes. With STORE_P (row_loss_forward) the first
# also stores each tile's exp(a - max) over the gradient buffer and the second only scales it: one more write of the
# row (absorbed by L2 while the row is still there, which the reverse walk and the persistent grid aim at), and a
# second pass without z, class vectors, noise or exp. Static count, GCL 4096 x 131072 bf16: that pass's loop takes
# ~200 SASS instructions per 16 elements a thread instead of ~860, the noise drawn once instead of twice (split rows:
# the forward's splits store, and grad(stored=) scales after the combine; GCL 128 x 1M: 196 instead of 899). Where
# the tile is cheap to recompute (no noise) the extra write is not worth it. "noise" (default): only when GCL's noise
# is on; "always" / "never": for tests and tuning.
STORE_PROBS = "noise"


def _store_probs(args: AdjustedCEArgs) -> bool:
    return STORE_PROBS == "always" or (STORE_PROBS == "noise" and args.has_noise)


@on_its_device
def forward(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, *, grad_out: torch.Tensor | None = None,
            column_stats: bool = False, config: TileConfig | None = None,
            inv_denominator: torch.Tensor | None = None, scale_mean: bool = True, out: torch.Tensor | None = None,
            seed: int | None = None, plans: StepPlans | None = None):
    """Run the forward on (N, C) logits ``z`` and (N,) targets ``y``. Returns ``(loss_rows, row_stats, row_coef,
    column_stats)`` (see the module docstring; ``column_stats``: a :class:`ColumnStats` (LADE) when asked for,
    else None).

    ``grad_out``: a tensor (N, C), possibly ``z`` itself, that receives d(reduced loss)/dz.
    ``inv_denominator``: a (1,) fp32 device tensor replacing 1 / sum_i w_{y_i} for 'mean' (callers that
    process the rows of one batch in chunks pass the whole batch's value).
    ``scale_mean=False`` ('mean', no ``grad_out``): leave the coefficient without 1 / sum_i w_{y_i}; the reduction
    (``out``, or :func:`reduce` with ``row_coef=``) finishes it, which saves the denominator's launch.
    ``out`` (0-dim, 'mean' or 'sum', not with ``column_stats``): receives the reduced loss, from the last program
    of the launch that finishes the rows when :func:`fused_reduction` allows, else from one :func:`reduce` launch
    after it.
    ``y`` may be (N, C) class probabilities ('sum' or 'none'; ``args.row_scale`` multiplies the rows): see the
    module.
    ``seed``: an int noise seed for this call in place of ``args``' (whose seed must then be an int): a module's
    steps keep their cached ``args`` and draw a seed each (passed beside the plan's other arguments).
    ``plans``: a :class:`StepPlans` of these tensors and ``args``, which keeps this launch's plan (with class indices,
    the default tiles and ``grad_out`` None or ``z`` itself).
    """
    N, C = z.shape
    dev = z.device
    soft = _soft(y, args) if y.is_floating_point() else None
    if not scale_mean and grad_out is not None:
        raise ValueError("scale_mean=False needs the recompute mode (grad_out=None): the gradient needs the mean")
    if out is not None and (args.reduction == "none" or column_stats):
        raise ValueError("out= takes the 'mean' or 'sum' of a loss without column_stats")
    writes = grad_out is not None
    slot = None  # that of this launch's plan among plans
    if plans is not None and soft is None and config is None and (grad_out is None or grad_out is z):
        slot = StepPlans.forward_slot(writes, column_stats, scale_mean)
    plan = None if slot is None else plans.get(slot)
    if plan is None:
        plan = _forward_plan(args, z, y, grad_out if writes else z, soft, writes, column_stats, config, scale_mean)
        if slot is not None:
            plans.put(slot, plan)
    cfg, split, d = plan.cfg, plan.split, plan.dummy
    counter, reduce_mode = fused_reduction(dev, N, plan.rblock, args.reduction) if out is not None else (None, 0)
    inv, denom = _mean_denominator(y, args, inv_denominator, plan.mean, plan.programs, counter)
    rows = _row_outputs(N, dev, soft is not None)
    buffers = {}  # the per-call buffers this plan has no placeholders for
    if split:
        buffers["part_ptr"] = part = torch.empty(PARTIAL_PLANES if soft is None else 6, N, cfg.num_splits,
                                                 dtype=torch.float32, device=dev)
    colstats = new_column_stats(N, C, dev, plan.row_blocks, soft=soft is not None) if column_stats else None
    if colstats is not None:
        buffers["colstats"] = colstats
    stored = None
    if plan.store_p:
        buffers["stored"] = stored = StoredTiles(
            maxima=torch.empty(N, cdiv(C, cfg.block_n), dtype=torch.float32, device=dev), count=cdiv(C, cfg.block_n))
    if N > 0:
        z_op = Operand(z, *plan.z_strides)
        row_loss_forward[plan.grid](
            z_op=z_op, y_ptr=y, inv_denom_ptr=d if inv is None else inv, out=rows,
            g_op=Operand(grad_out, *plan.g_strides) if plan.writes_g else z_op,
            red=Reduction(d if out is None else out, d if counter is None else counter), soft=soft,
            DENOM=DENOM_POINTER if split else denom, REDUCE=0 if split else reduce_mode,
            seed=plan.seed if seed is None else seed, **plan.static, **buffers)
        if split:
            _launch_combine(part, y, args, C, rows, inv, mean=plan.mean, denom=denom, out=out, counter=counter,
                            reduce_mode=reduce_mode, soft=soft)
    reduce_unless_fused(out, counter, rows.loss, y, args, inv_denominator=inv, row_coef=rows.coef,
                        scale_mean=scale_mean)
    if grad_out is not None and split:
        grad(z, y, args, rows.stats, rows.coef, None, out=grad_out, config=cfg, stored=stored, seed=seed)
    return rows.loss, rows.stats, rows.coef, colstats


class _ForwardPlan(NamedTuple):
    """What a :func:`forward` launch takes from its shapes and ``args`` alone: the tiles, the grid, the programs that
    finish the rows and the width of their batch sums (for the reduction's and the denominator's choices), and the
    kernel arguments that are the same on every call (``static``, with placeholders for the buffers it does not
    use)."""

    cfg: TileConfig
    split: bool
    row_blocks: int
    grid: tuple
    mean: bool
    programs: int
    rblock: int
    store_p: bool
    writes_g: bool
    static: dict  # with the noise's arguments but the int seed (noise_row0, seed_ptr, noise_table)
    z_strides: tuple  # those of the key (the operands' strides, without asking the tensors again)
    g_strides: tuple
    dummy: torch.Tensor  # the placeholder of the unused pointers (_dummy)
    seed: int  # the noise seed of ``args`` (a call's drawn seed replaces it)


def _forward_plan(args: AdjustedCEArgs, z, y, g, soft, grad_in_forward: bool, column_stats: bool, config,
                  scale_mean: bool) -> _ForwardPlan:
    """The :class:`_ForwardPlan` of a launch, kept in ``args.memo`` for the common launch (class indices, the
    default tiles) under its shapes, strides and dtypes, so that a module's steps build it once."""
    key = None
    if soft is None and config is None:
        key = ("forward", tiles.GENERATION, STORE_PROBS, z.device, z.shape, z.stride(), z.dtype,
               None if g is z else (g.stride(), g.dtype), y.stride(), y.dtype, grad_in_forward, column_stats,
               scale_mean)
    return _kept(args, key, _new_forward_plan, z, y, g, soft, grad_in_forward, column_stats, config, scale_mean)


def _new_forward_plan(args: AdjustedCEArgs, z, y, g, soft, grad_in_forward: bool, column_stats: bool, config,
                      scale_mean: bool) -> _ForwardPlan:
    N, C = z.shape
    dev = z.device
    kg = kernel_groups(args, dev)
    cfg = config or pick_tiles(N, C, dev, column_stats=column_stats, grad_in_forward=grad_in_forward,
                               elem_bytes=z.element_size(), **_tile_streams(kg.flags, soft))
    _check_noise_tiles(kg.flags, cfg)
    split = cfg.num_splits > 1
    row_blocks = cdiv(N, cfg.block_m)
    grid_rows = cfg.row_grid(row_blocks)
    mean = args.reduction == "mean" and scale_mean
    programs = cdiv(N, tiles.combine_tiles(cfg.num_splits)[1]) if split else grid_rows  # those that finish the rows
    rblock = tiles.COMBINE_RBLOCK if split else tiles.rblock(cfg.num_warps)
    fuse_grad = grad_in_forward and not split
    # split rows: the gradient comes from grad() after the combine; with STORE_P it scales what the forward stored
    store_p = grad_in_forward and not cfg.single_tile and not column_stats and _store_probs(args)
    writes_g = fuse_grad or store_p
    d = _dummy(dev)
    static = dict(
        vecs=kg.vecs, wsum_ptr=_or_dummy(weight_sum(args), dev), N=N, C=C,
        cols_of=Columns(per_split=cfg.cols_per_split, base=0, end=C, first_split=0, num_splits=cfg.num_splits),
        num_row_blocks=row_blocks, hp=kg.hp, F=_flags(kg.flags, soft), MEAN=mean and not split, SPLIT=split,
        SINGLE_TILE=cfg.single_tile, GRAD_IN_FWD=fuse_grad, COLUMN_STATS=column_stats,
        ALIGN=row_align(z, g if writes_g else z, *([] if soft is None else [y])), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PERSISTENT=grid_rows < row_blocks, RBLOCK=rblock, STORE_P=store_p,
        STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    static["GROUP"], static["GROUP_SPAN"] = _stats_group(z, static["ALIGN"], cfg, kg.flags)
    static["END_ALIGN"] = end_align(C, cfg.cols_per_split)
    if cfg.single_tile and fuse_grad and tiles.WHOLE_ROW_MAX_REGISTERS:
        static["maxnreg"] = tiles.WHOLE_ROW_MAX_REGISTERS
    # placeholders for the buffers a launch of this plan does not use (forward passes the others per call: a
    # copy of this dict per call would cost the hot path more)
    if not split:
        static["part_ptr"] = d
    if not column_stats:
        static["colstats"] = ColumnStats(partials=d, target_logits=d)
    if not store_p:
        static["stored"] = StoredTiles(maxima=d, count=0)
    static.update(kg.rng)
    return _ForwardPlan(cfg, split, row_blocks, (grid_rows, cfg.num_splits), mean, programs, rblock, store_p,
                        writes_g, static, z.stride(), g.stride(), d, kg.seed)


def _stats_group(z: torch.Tensor, align: int, cfg: TileConfig, flags: Flags) -> tuple[int, int]:
    """``row_loss_forward``'s ``(GROUP, GROUP_SPAN)``, the layout its statistics pass keeps per-thread statistics in
    (:func:`_group_stats` in ``kernels/adjusted_ce.py``): GROUP the columns a thread loads as one vector (16 bytes,
    or the launch's ``ALIGN`` where that is less) and GROUP_SPAN the columns a row's threads cover once (Triton's
    blocked layout puts a tile's threads along the contiguous row first, its warps too while the row has room).
    ``(0, 0)`` (the per-tile cross-thread reductions) where a thread holds one element of a row per tile (a rescale
    ``exp`` per element), with GCL's seed read from the device (its per-round keys then sit in registers: with
    triton 3.6 the grouped loop reloads a spilled one every tile, kernel_report), and when ``tiles.GROUPED_STATS``
    is off. Two elements are enough: the per-tile path rescales each row's sum in every thread that holds the row
    too, so the grouped one takes no more ``exp`` (LADE 4096 x 8142 bf16, 64 x 128 tiles in 2-column vectors:
    583 -> 376 SASS per 16 elements a thread, the same 40 MUFU)."""
    vec = min(16 // z.element_size(), align, cfg.block_n)
    threads = max(1, min(cfg.num_warps * 32, cfg.block_n // vec))
    if not tiles.GROUPED_STATS or cfg.block_n // threads < 2 or flags.SEED_FROM_PTR:
        return 0, 0
    return vec, threads * vec


_MAX_PLANS = 16  # per args: a batch of another length is another plan (variable-length batches must not pile up)


def _kept(args: AdjustedCEArgs, key: tuple | None, build, *build_args):
    """The launch plan ``build(args, *build_args)`` makes, kept in ``args.memo["plans"]`` under ``key`` (its
    shape signature; None: not kept) and made once there; the plans start over before a new one past
    :data:`_MAX_PLANS`."""
    if key is None:
        return build(args, *build_args)
    plans = args.memo.setdefault("plans", {})
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[key] = build(args, *build_args)
    return plan


@on_its_device
def grad(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, row_stats: torch.Tensor, row_coef: torch.Tensor,
         grad_output: torch.Tensor | None, *, column_term=None, out: torch.Tensor | None = None,
         config: TileConfig | None = None, col_base: int = 0, num_classes: int | None = None,
         stored: StoredTiles | None = None, seed: int | None = None, plans: StepPlans | None = None) -> torch.Tensor:
    """d loss / d z recomputed from the saved ``row_stats`` and ``row_coef``; ``grad_output``: scalar or (N,)
    (None: 1). ``column_term``: LADE's :class:`ColumnTerm` (its (3, C) fp32 rows ``col_a``, ``col_b``, ``col_lse``
    over all ``num_classes``, alpha included: :func:`fastlt.kernels.lade.column_term`); its loss is reduced, so
    ``grad_output`` must then be a scalar, which the kernel applies to the column term too. A class chunk: ``z``
    (N, Ck) holds classes ``[col_base, col_base + Ck)`` of ``num_classes``.
    ``stored`` (:func:`forward` of split rows with STORE_P, same ``config``): the running maxima whose tiles of
    ``exp(a - max)`` that forward left in ``out``; they are scaled in place, ``z`` is not read.
    ``seed``: the forward's (:func:`forward`). ``plans``: a :class:`StepPlans` of these tensors and ``args``, which
    keeps the plan of a launch with a given ``grad_output`` and a fresh ``out``, with or without a column term."""
    N, Ck = z.shape
    C = Ck if num_classes is None else num_classes
    if column_term is not None and grad_output is not None and grad_output.dim() != 0:
        raise ValueError(f"column_term (LADE) needs a scalar grad_output, got shape {tuple(grad_output.shape)}")
    if stored is not None and (out is None or column_term is not None or col_base or num_classes not in (None, Ck)):
        raise ValueError("stored= scales the forward's tiles in out=, over all classes, without column_term")
    dev = z.device
    slot = None  # that of this launch's plan among plans
    if (plans is not None and out is None and stored is None and config is None and grad_output is not None
            and not col_base and C == Ck and not y.is_floating_point()):
        slot = StepPlans.GRAD if column_term is None else StepPlans.GRAD_COLUMN_TERM
    out = torch.empty(N, Ck, dtype=z.dtype, device=dev) if out is None else out
    if N == 0 or Ck == 0:  # nothing to write (an empty class shard holds no column)
        return out
    soft = _soft(y, None) if y.is_floating_point() else None
    plan = None if slot is None else plans.get(slot)
    if plan is not None and (plan.z_strides != z.stride() or plan.z_dtype != z.dtype):
        # the logits a backward gets are the saved ones, which saved-tensor hooks (offloading: save_on_cpu) may
        # hand back in a layout of their own: the plan of another layout would read other elements
        plan = None
    if plan is None:
        plan = _grad_plan(args, z, y, out, soft, column_term is not None, grad_output is not None, config, col_base,
                          C, stored)
        if slot is not None:
            plans.put(slot, plan)
    grid, static, z_strides, out_strides = plan.grid, plan.static, plan.z_strides, plan.out_strides
    buffers = {}  # the per-call buffers this plan has no placeholders for
    if column_term is not None:
        buffers["col_term"] = column_term
    if stored is not None:
        buffers["stored"] = stored
    if grad_output is None:
        go, go_stride = _dummy(dev), 0
    else:
        go, go_stride = grad_output, 0 if grad_output.dim() == 0 else grad_output.stride(0)
    row_loss_grad[grid](
        z_op=Operand(z, *z_strides), y_ptr=y, row_stats_ptr=row_stats, coef_ptr=row_coef, go_ptr=go,
        go_stride=go_stride, g_op=Operand(out, *out_strides), soft=soft, seed=plan.seed if seed is None else seed,
        **static, **buffers)
    return out


def _grad_plan(args: AdjustedCEArgs, z, y, out, soft, column_term: bool, upstream: bool, config, col_base: int,
               C: int, stored) -> _GradPlan:
    """The :class:`_GradPlan` of a :func:`grad` launch, kept in ``args``' plans for launches with class indices and
    no ``stored``."""
    key = None
    if soft is None and stored is None:
        key = ("grad", tiles.GENERATION, z.device, z.shape, z.stride(), z.dtype, out.stride(), y.stride(), y.dtype,
               column_term, upstream, config, col_base, C)
    return _kept(args, key, _new_grad_plan, z, y, out, soft, column_term, upstream, config, col_base, C, stored)


class _GradPlan(NamedTuple):
    """What a :func:`grad` launch takes from its shapes and ``args`` alone: the grid, the kernel arguments (with
    placeholders for the buffers it does not use; all but the int noise seed, ``args``' one last), and the operands'
    strides and the logits' dtype of its key."""

    grid: tuple
    static: dict
    z_strides: tuple
    out_strides: tuple
    seed: int
    z_dtype: torch.dtype


def _new_grad_plan(args: AdjustedCEArgs, z, y, out, soft, column_term: bool, upstream: bool, config, col_base: int,
                   C: int, stored) -> _GradPlan:
    N, Ck = z.shape
    dev = z.device
    kg = kernel_groups(args, dev)
    cfg = config or pick_tiles(N, Ck, dev, column_term=column_term, elem_bytes=z.element_size(),
                               **_tile_streams(kg.flags, soft))
    _check_noise_tiles(kg.grad_flags, cfg)
    d = _dummy(dev)
    static = dict(
        vecs=kg.vecs, wsum_ptr=_or_dummy(weight_sum(args), dev), N=N, C=C,
        cols_of=Columns(per_split=cfg.cols_per_split, base=col_base, end=col_base + Ck), hp=kg.grad_hp,
        F=_flags(kg.grad_flags, soft, col_base), HAS_UPSTREAM=upstream,
        COLUMN_TERM=column_term, ALIGN=row_align(z, out, *([] if soft is None else [y])), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, STORED=stored is not None, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    static["END_ALIGN"] = end_align(col_base, Ck, cfg.cols_per_split)
    if not column_term:  # placeholders for the buffers it does not use (grad passes the others per call)
        static["col_term"] = ColumnTerm(columns=d)
    if stored is None:
        static["stored"] = StoredTiles(maxima=d, count=0)
    static.update(kg.rng)
    return _GradPlan((cdiv(N, cfg.block_m), cfg.num_splits), static, z.stride(), out.stride(), kg.seed,
                     z.dtype)


@on_its_device
def chunk_partials(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, part: torch.Tensor, chunk: int, *,
                   col_base: int, num_classes: int, column_stats: ColumnStats | None = None,
                   seed: int | None = None) -> None:
    """Row partials of one class chunk: ``z`` (N, Ck) holds classes ``[col_base, col_base + Ck)`` of
    ``num_classes``; writes (max, sum-exp, a_y, sum w*a) of those classes to ``part[:, :, chunk]``
    (``part``: (:data:`PARTIAL_PLANES`, N, num_chunks) fp32; class probabilities ``y`` (N, Ck), the chunk's
    columns: (6, N, num_chunks),
    see :class:`fastlt.kernels.adjusted_ce.Soft`). :func:`combine_partials` finishes the rows once every chunk is
    in.
    ``column_stats`` (LADE): a :class:`ColumnStats` for N rows and ``num_classes`` columns
    (:func:`new_column_stats`) that receives this chunk's column partials in its columns
    ``[col_base, col_base + Ck)`` and the target logits of the rows whose targets lie there (as :func:`forward`
    fills them for the whole matrix). ``seed``: as :func:`forward`."""
    N, Ck = z.shape
    dev = z.device
    has_cols = column_stats is not None
    soft = _soft(y, None)
    _check_partials(part, N, soft is not None)
    planes = 2 if soft is None else 4
    if has_cols and (tuple(column_stats.partials.shape) != (planes, column_stat_blocks(N), num_classes)
                     or tuple(column_stats.target_logits.shape) != (N,)):
        raise ValueError(f"column_stats must hold ({planes}, {column_stat_blocks(N)}, {num_classes}) partials and "
                         f"({N},) target logits (new_column_stats), got {tuple(column_stats.partials.shape)} and "
                         f"{tuple(column_stats.target_logits.shape)}")
    if N == 0 or Ck == 0:
        return
    cfg = pick_tiles(N, Ck, dev, column_stats=has_cols)
    row_blocks = cdiv(N, cfg.block_m)
    d = _dummy(dev)
    kg = kernel_groups(args, dev)
    row_loss_forward[(row_blocks, 1)](
        z_op=_operand(z), y_ptr=y, vecs=kg.vecs, wsum_ptr=d, inv_denom_ptr=d,
        out=RowOutputs(loss=d, stats=d, coef=d), part_ptr=part,
        colstats=column_stats or ColumnStats(partials=d, target_logits=d), g_op=Operand(ptr=z, stride_m=0, stride_n=0),
        stored=StoredTiles(maxima=d, count=0), N=N, C=num_classes,
        cols_of=Columns(per_split=Ck, base=col_base, end=col_base + Ck, first_split=chunk, num_splits=part.shape[2]),
        num_row_blocks=row_blocks, hp=kg.hp, seed=kg.seed if seed is None else seed, **kg.rng,
        red=Reduction(out=d, counter=d), soft=soft,
        F=_flags(kg.flags, soft, col_base), MEAN=False, SPLIT=True, SINGLE_TILE=Ck <= cfg.block_n, GRAD_IN_FWD=False,
        COLUMN_STATS=has_cols, ALIGN=row_align(z, *([] if soft is None else [y])), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PERSISTENT=False, DENOM=DENOM_POINTER, REDUCE=0, RBLOCK=tiles.rblock(cfg.num_warps),
        STORE_P=False, STAGES=cfg.num_stages, END_ALIGN=end_align(col_base, Ck), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def _launch_combine(part, y, args: AdjustedCEArgs, C: int, rows: RowOutputs, inv_denom, *, mean: bool,
                    denom: int, out, counter, reduce_mode: int, soft: Soft | None = None) -> None:
    """One ``row_loss_combine`` launch over the (5, N, S) partials ((6, N, S) with ``soft``) into ``rows``."""
    dev = part.device
    N, num_splits = part.shape[1], part.shape[2]
    block_s, block_m = tiles.combine_tiles(num_splits)
    kg = kernel_groups(args, dev)
    row_loss_combine[(cdiv(N, block_m),)](
        part_ptr=part, y_ptr=y,
        vecs=ClassVectors(log_prior=None, cloud=None, margin=_or_dummy(args.margin_vector, dev),
                          weight=_or_dummy(args.weight, dev)),
        inv_denom_ptr=_or_dummy(inv_denom, dev), out=rows,
        red=Reduction(out=_or_dummy(out, dev), counter=_or_dummy(counter, dev)), N=N, C=C, num_splits=num_splits,
        hp=kg.hp._replace(tau=None, noise_mul=None, margin_value=None, scale=None),
        soft=None if soft is None else soft._replace(q=None, stride_m=None, stride_n=None),
        F=Flags(HAS_WEIGHT=kg.flags.HAS_WEIGHT, HAS_SMOOTH=kg.flags.HAS_SMOOTH, HAS_FOCAL=kg.flags.HAS_FOCAL,
                SOFT=soft is not None),
        MEAN=mean, DENOM=denom, REDUCE=reduce_mode, BLOCK_M=block_m, BLOCK_S=block_s,
        RBLOCK=tiles.COMBINE_RBLOCK)


@on_its_device
def combine_partials(part: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, num_classes: int, *,
                     inv_denominator: torch.Tensor | None = None, scale_mean: bool = True,
                     out: torch.Tensor | None = None):
    """``(loss_rows, row_stats, row_coef)`` (fp32) from the (5, N, num_chunks) partials of :func:`chunk_partials`, as
    :func:`forward` returns them; ``inv_denominator``, ``scale_mean`` and ``out`` as there: the combine's last
    program reduces the batch into ``out`` when :func:`fused_reduction` allows, and its programs sum 'mean''s
    denominator themselves when that is cheap, so a reduced loss is one launch. Class probabilities ``y`` (N, C):
    (6, N, num_chunks) partials, 'sum' or 'none', ``args.row_scale`` as :func:`forward`."""
    N = part.shape[1]
    dev = part.device
    soft = _soft(y, args)
    _check_partials(part, N, soft is not None)
    if out is not None and args.reduction == "none":
        raise ValueError("out= takes the 'mean' or 'sum' of the rows")
    mean = args.reduction == "mean" and scale_mean
    counter, reduce_mode = (fused_reduction(dev, N, tiles.COMBINE_RBLOCK, args.reduction) if out is not None
                            else (None, 0))
    inv, denom = _mean_denominator(y, args, inv_denominator, mean, cdiv(N, tiles.combine_tiles(part.shape[2])[1]),
                                   counter)
    rows = _row_outputs(N, dev, soft is not None)
    if N > 0:
        _launch_combine(part, y, args, num_classes, rows, inv, mean=mean, denom=denom, out=out,
                        counter=counter, reduce_mode=reduce_mode, soft=soft)
    reduce_unless_fused(out, counter, rows.loss, y, args, inv_denominator=inv, row_coef=rows.coef,
                        scale_mean=scale_mean)
    return rows.loss, rows.stats, rows.coef


# --- the gradients' rescale -----------------------------------------------------------------------------------------

@on_its_device
def scale_by(grad_tensor: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad_tensor *= grad_output`` in place: (M, C) by a scalar or by one value per row ((M,)); a scalar 1 costs
    one launch of a few programs (``scale_rows``). Returns ``grad_tensor``."""
    if grad_output.dim() != 0 and grad_output.shape != grad_tensor.shape[:1]:
        raise ValueError(f"grad_output must be a scalar or ({grad_tensor.shape[0]},), got {tuple(grad_output.shape)}")
    _scale([grad_tensor], grad_output)
    return grad_tensor


@on_its_device
def scale_all(grads, grad_output: torch.Tensor) -> None:
    """Multiply each tensor of ``grads`` (up to 3; None entries skipped; any shape) in place by the scalar
    ``grad_output``, in one launch (the fused heads' dx, dW and db)."""
    mats = [_as_matrix(g) for g in grads if g is not None]
    if grad_output.dim() != 0:
        raise ValueError(f"scale_all takes a scalar grad_output, got shape {tuple(grad_output.shape)}")
    if len(mats) > 3:
        raise ValueError(f"scale_all takes at most 3 tensors, got {len(mats)}")
    _scale(mats, grad_output)


def _as_matrix(g: torch.Tensor) -> torch.Tensor:
    """A 2-D view of ``g`` for ``scale_rows``: one row when contiguous (whole 4096-element tiles)."""
    if g.is_contiguous():
        return g.view(1, -1)
    if g.dim() == 1:
        return g.unsqueeze(0)
    if g.dim() == 2:
        return g
    raise ValueError(f"scale_all takes contiguous tensors or 1-D/2-D views, got a non-contiguous {g.dim()}-D one")


def _scale(mats, grad_output: torch.Tensor) -> None:
    mats = [m for m in mats if m.numel() > 0]
    if not mats:
        return
    dev = mats[0].device
    block_n = min(tiles.next_pow2(max(m.shape[1] for m in mats)), tiles.SCALE_TILE)
    block_m = max(1, min(16, tiles.SCALE_TILE // block_n))
    num_tiles = sum(cdiv(m.shape[0], block_m) * cdiv(m.shape[1], block_n) for m in mats)
    scaled = [Scaled(ptr=m, stride_m=m.stride(0), stride_n=m.stride(1), M=m.shape[0], C=m.shape[1]) for m in mats]
    scaled += [scaled[0]._replace(M=0)] * (3 - len(scaled))  # unused slots: no rows
    scale_rows[(max(1, min(num_tiles, tiles.SCALE_PROGRAMS_PER_SM * tiles.sm_count(dev))),)](
        g0=scaled[0], g1=scaled[1], g2=scaled[2], go_ptr=grad_output,
        go_stride=0 if grad_output.dim() == 0 else grad_output.stride(0), NUM=len(mats), BLOCK_M=block_m,
        BLOCK_N=block_n)
