"""Launchers for the row-operator kernels: tile shapes, split decisions, buffers. No host syncs.

``AdjustedCEArgs`` carries every hyperparameter of SPEC 2.4 (per-class tensors and runtime floats)
so the autograd Function passes one object through forward and backward.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._operator import AdjustedCEArgs
from .row_operator import reduce_rows, row_loss_combine, row_loss_forward, row_loss_grad, scale_rows

_TILE_N = 2048  # default elements of z per program and tile


class ColumnStats(NamedTuple):
    """LADE's per-column statistics as the row kernel leaves them: ``partials`` (2, R, C) fp32, per block of rows
    the column max of z and sum exp(z - max) over its valid rows; ``target_logits`` (N,) fp32, each valid row's
    ``z_{i, y_i}`` (rows that are ignored or whose target is out of range are left unwritten). The per-class
    target sums and counts are folded from these by :func:`fastlt.kernels.lade.finish`."""

    partials: torch.Tensor
    target_logits: torch.Tensor

    @staticmethod
    def empty(N: int, C: int, device) -> ColumnStats:
        return ColumnStats(torch.empty((2, column_stat_blocks(N), C), dtype=torch.float32, device=device),
                           torch.empty(N, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_splits: int
    cols_per_split: int
    num_warps: int
    num_stages: int = 2
    row_programs: int | None = None  # persistent forward: this many row programs walk the row blocks (None: one each)

    @property
    def single_tile(self) -> bool:
        return self.num_splits == 1 and self.cols_per_split <= self.block_n

    def row_grid(self, row_blocks: int) -> int:
        """Row programs of the forward's grid for ``row_blocks`` row blocks."""
        return row_blocks if self.row_programs is None else max(1, min(self.row_programs, row_blocks))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def pick_tiles(N: int, C: int, device: torch.device, *, column_stats: bool = False, column_term: bool = False,
               grad_in_forward: bool = False, elem_bytes: int = 4, block_m: int | None = None,
               block_n: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, row_programs: int | None = None) -> TileConfig:
    """Tile shape and row split for an (N, C) problem (cached). ``column_stats``: LADE's forward;
    ``column_term``: LADE's gradient; ``grad_in_forward`` (with ``elem_bytes``, the logits' element size): the
    forward that also writes the gradient, which may get a persistent grid (:func:`_persistent_per_sm`). Explicit
    arguments override (tests, tuning); ``row_programs=0`` turns the persistent grid off."""
    return _pick_tiles(N, C, _sm_count(device), column_stats, column_term, grad_in_forward, elem_bytes, block_m,
                       block_n, num_splits, num_warps, num_stages, row_programs)


_COLUMN_TERM_ROWS = 4  # rows per LADE gradient tile: its three (C,) vectors are read once per 4 rows

# L2 of the target GPUs (H100, H200: 50 MB). The gradient-in-forward's second pass over a row hits L2 only if the
# rows in flight fit in about half of it (the gradient being written shares it); see _persistent_per_sm.
L2_BYTES = 50 << 20
_RESIDENT_PROGRAMS = 8  # 4-warp row programs an SM holds at once (registers), for the estimate of rows in flight
_PERSISTENT_TILE = 8192  # columns per tile of a persistent program: 16 warps x 16 elements per thread


def _persistent_per_sm(N: int, C: int, sm_count: int, elem_bytes: int) -> int | None:
    """Row programs per SM of a persistent gradient-in-forward (1, 2 or 4: as many as keep the rows in flight,
    ``programs * C * elem_bytes``, within half of :data:`L2_BYTES`), or None: when a row fits one persistent tile,
    when the default grid's rows in flight fit half the L2 anyway, or when even one row per SM overflows the L2
    (then no grid gets the re-reads from L2, and the default grid keeps more loads in flight)."""
    row_bytes = C * elem_bytes
    budget = L2_BYTES // 2
    if (C <= _PERSISTENT_TILE or min(N, _RESIDENT_PROGRAMS * sm_count) * row_bytes <= budget
            or sm_count * row_bytes > L2_BYTES):
        return None
    fit = budget // (sm_count * row_bytes)
    return 4 if fit >= 4 else (2 if fit >= 2 else 1)


@functools.lru_cache(maxsize=1024)
def _pick_tiles(N, C, sm_count, column_stats, column_term, grad_in_forward, elem_bytes, block_m, block_n, num_splits,
                num_warps, num_stages, row_programs) -> TileConfig:
    # Defaults from benchmarks/tune_tiles.py on an H100 (triton 3.6): 2048-wide tiles, 4 warps and a
    # 3-stage pipelined column loop beat whole-row tiles at every shape (more programs in flight per SM
    # hide HBM latency better than one 16-warp program holding a whole 8K row).
    # LADE's column statistics: per program, BLOCK_M rows reduce into one partial per column
    # ((2, N/BLOCK_M, C) fp32). 16 x 1024 tiles measured 6.74 ms at 4096 x 131072 fp32 (H100), 64 x 256
    # tiles (4x fewer partials) 8.72 ms: taller tiles cost more in the kernel than the partials save. Since the
    # class sums left the tile (static count, benchmarks/kernel_report.py): 16 x 1024 with 16 warps still
    # spills in fp32 (32 elements per thread), 16 x 512 with 16 warps does not (16 per thread, ~100
    # registers, the same 16 warps per SM), so that is the default until a GPU run of
    # benchmarks/tune_tiles.py --lade says otherwise.
    # LADE's gradient reads three (C,) fp32 vectors per element beside z (12 B from L2 per 4 B of fp32 z with
    # one-row tiles): 4 x 512 tiles share each vector load between 4 rows (no spills, 64 registers).
    # Gradient-in-forward of long rows (unmeasured; benchmarks/tune_tiles.py sweeps it): with one program
    # per row, thousands of rows are in flight and the second pass re-reads each from HBM (1.5x the floor at
    # best). A persistent grid keeps the rows in flight within half the L2: p = 1, 2 or 4 programs per SM of 16 / p
    # warps and 8192 / p-column tiles (16 elements per thread; the row-block loop raises a program to ~122 registers,
    # so 16 warps per SM is what fits).
    if row_programs is None and grad_in_forward and not (column_stats or column_term):
        per_sm = _persistent_per_sm(N, C, sm_count, elem_bytes)
        if per_sm is not None:
            row_programs = per_sm * sm_count
            block_m = 1 if block_m is None else block_m
            block_n = max(16, min(_next_pow2(C), _PERSISTENT_TILE // per_sm)) if block_n is None else block_n
            num_warps = 16 // per_sm if num_warps is None else num_warps
            num_splits = 1 if num_splits is None else num_splits
    row_programs = row_programs or None
    if block_n is None:
        width = 512 if column_stats else (_TILE_N // _COLUMN_TERM_ROWS if column_term and block_m is None else _TILE_N)
        block_n = max(16, min(_next_pow2(C), width))
    if block_m is None:
        if column_stats:
            block_m = min(16, max(1, _next_pow2(N)))
        elif column_term:
            block_m = min(_COLUMN_TERM_ROWS, _next_pow2(max(N, 1)))
        else:
            block_m = max(1, min(64, _TILE_N // block_n, _next_pow2(max(N, 1))))
    tiles = _cdiv(C, block_n)
    if num_splits is None:
        num_splits = 1
        row_blocks = _cdiv(max(N, 1), block_m)
        target = 16 * sm_count  # short batches of long rows: ~16 programs per SM (128 x 1M: ~17 splits)
        if tiles >= 4 and row_blocks < target:
            num_splits = min(tiles, _cdiv(target, row_blocks))
    cols_per_split = _cdiv(tiles, num_splits) * block_n
    num_splits = _cdiv(C, cols_per_split)
    if num_warps is None:
        elements = block_m * block_n
        if column_stats:  # ~16 elements per thread: more spill (see above)
            num_warps = max(4, min(16, elements // 512))
        else:
            num_warps = 4 if elements <= 2048 else (8 if elements <= 8192 else 16)
    return TileConfig(block_m, block_n, num_splits, cols_per_split, num_warps, 3 if num_stages is None else num_stages,
                      row_programs)


@functools.cache
def _dummy(device: torch.device) -> torch.Tensor:
    """A 1-element placeholder for pointer arguments a flag leaves unused (never written)."""
    return torch.empty(1, dtype=torch.float32, device=device)


_COUNTER_SLOTS = 4096
# 16 bytes apart: Triton specialises a pointer on 16-byte alignment, so every slot gets the kernel variant the first
# one compiled (a capture's fresh slot must not compile a new variant inside the capture)
_SLOT_STRIDE = 4


class _CounterBank:
    """Zeroed int32 counters of one device for the fused batch reductions (:func:`reduce_counter`): one per stream
    (per thread on the CPU), and one more for each launch captured into a CUDA graph (a graph replays its launch
    on whatever stream it is given, so it keeps a counter of its own). A launch leaves its counter at 0."""

    def __init__(self, device: torch.device):
        self.slots = torch.zeros(_COUNTER_SLOTS * _SLOT_STRIDE, dtype=torch.int32, device=device)
        self.taken = 0
        self.by_stream: dict[int, torch.Tensor] = {}

    def fresh(self) -> torch.Tensor | None:
        if self.taken == _COUNTER_SLOTS:
            return None
        start = self.taken * _SLOT_STRIDE
        self.taken += 1
        return self.slots[start:start + 1]


_BANKS: dict[torch.device, _CounterBank] = {}


def _stream_key(device: torch.device) -> int:
    if device.type != "cuda":
        return threading.get_ident()  # the interpreter runs a launch on the calling thread
    return torch._C._cuda_getCurrentRawStream(device.index)


def reduce_counter(device: torch.device) -> torch.Tensor | None:
    """A (1,) int32 device counter, 0 between launches, for a launch whose last program reduces the batch
    (``REDUCE``), or None when none can be had: the first use on a device is inside a CUDA-graph capture (the bank
    must be allocated outside it), or a process captured more than 4096 such launches. Then the caller launches
    the reduction on its own. Launches on one stream share its counter; those on other streams do not."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    bank = _BANKS.get(device)
    if bank is None:
        if capturing:
            return None
        bank = _BANKS[device] = _CounterBank(device)
    if capturing:
        return bank.fresh()
    key = _stream_key(device)
    counter = bank.by_stream.get(key)
    if counter is None:
        counter = bank.by_stream[key] = bank.fresh()
    return counter


def weight_sum(args: AdjustedCEArgs, device) -> torch.Tensor:
    """(1,) fp32 ``W = sum_j w_j``, which the kernels need only for label smoothing with class weights (else a
    placeholder); one launch per ``args`` (cached on it: the forward and the backward share it)."""
    if args.weight is None or args.label_smoothing == 0.0:
        return _dummy(device)
    return args.weight_total


_REDUCE_BLOCK = 4096
# One program reduces up to this many rows (a few loop steps: host launches dominate there). Longer batches
# take torch's multi-block reductions, whose launch overhead is small next to their row kernels.
ONE_PROGRAM_ROWS = 32768
# A row kernel's programs each sum the 'mean' denominator themselves (OWN_DENOM) when programs x N targets stay
# under this (8 MB of int64 reads from L2 in all: at 512 x 8142, 512 programs read 512 targets each), which
# saves the denominator's launch before a gradient-in-forward.
_OWN_DENOM_READS = 1 << 20


def _own_denominator(programs: int, N: int) -> bool:
    return programs * N <= _OWN_DENOM_READS


def _rblock(num_warps: int) -> int:
    """Width of the batch sums inside a row kernel (one 4-element vector per thread: no extra registers)."""
    return 128 * num_warps


_COMBINE_RBLOCK = 128  # one value per thread of the 4-warp combine (wider, triton 3.6's ptxas spills in its loop)
# The last program's sums walk the N rows in RBLOCK-wide steps, each an L2 round trip (~0.3 us) it waits for: up to
# this many steps the tail costs about what a launch of its own would (larger batches take reduce_rows, 4096 wide).
_FUSED_REDUCE_STEPS = 8


def fused_reduction(device: torch.device, values: int, rblock: int, reduction: str) -> tuple[torch.Tensor | None, int]:
    """``(counter, REDUCE)`` for a launch whose last program would sum ``values`` values (rows and any extra ones) in
    ``rblock``-wide steps: a counter (:func:`reduce_counter`) and 1 ('sum') or 2 ('mean'), or ``(None, 0)`` when the
    reduction must be a launch of its own (no values, more than :data:`_FUSED_REDUCE_STEPS` steps or
    ``ONE_PROGRAM_ROWS`` values, or no counter to be had)."""
    if not 0 < values <= min(ONE_PROGRAM_ROWS, _FUSED_REDUCE_STEPS * rblock):
        return None, 0
    counter = reduce_counter(device)
    return counter, 0 if counter is None else (2 if reduction == "mean" else 1)


def _mean_denominator(y: torch.Tensor, args: AdjustedCEArgs, inv_denominator, mean: bool, programs: int):
    """``(inv, own_denom)`` for a launch of ``programs`` row programs: with 'mean' scaling (``mean``) and no given
    ``inv_denominator``, the programs sum the denominator themselves when that is cheap (:func:`_own_denominator`:
    ``inv`` None), else one launch computes it first (:func:`inv_denominator_of`)."""
    own = mean and inv_denominator is None and _own_denominator(programs, y.shape[0])
    inv = inv_denominator
    if inv is None and mean and not own:
        inv = inv_denominator_of(y, args)
    return inv, own


def reduce_unless_fused(out: torch.Tensor | None, counter: torch.Tensor | None, loss_rows: torch.Tensor,
                        y: torch.Tensor, args: AdjustedCEArgs, *, inv_denominator=None, factor=None,
                        scale_mean: bool = True, extra=None) -> None:
    """The batch loss into ``out`` by one :func:`reduce` launch, for a launch that was asked for it (``out``) but had
    no ``counter`` (:func:`fused_reduction`) to reduce it itself; else nothing. With 'mean' and ``scale_mean=False``
    the rows' ``factor`` is scaled by 1 / sum_i w_{y_i} there too; ``extra`` as :func:`reduce`."""
    if out is None or counter is not None:
        return
    unscaled = args.reduction == "mean" and not scale_mean
    reduce(loss_rows, y, args, inv_denominator=inv_denominator, factor=factor if unscaled else None, extra=extra,
           out=out)


def _combine_tiles(num_splits: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_M)`` of :func:`row_loss_combine` for rows split in ``num_splits`` (4096 partials a tile)."""
    block_s = max(2, _next_pow2(num_splits))
    return block_s, max(1, min(64, 4096 // block_s))


def _reduce_launch(y: torch.Tensor, args: AdjustedCEArgs, *, loss_rows=None, factor=None, inv_denom=None, out=None,
                   extra=None, denom: bool, mean: bool) -> None:
    dev = y.device
    d = _dummy(dev)
    N = y.shape[0]
    reduce_rows[(1,)](
        loss_rows if loss_rows is not None else d, y, args.weight if args.weight is not None else d,
        factor if factor is not None else d, inv_denom if inv_denom is not None else d, out if out is not None else d,
        extra if extra is not None else d, N, args.weight.shape[0] if args.weight is not None else 0,
        extra.shape[0] if extra is not None else 0, args.ignore_index,
        HAS_WEIGHT=args.weight is not None, DENOM=denom, LOSS=loss_rows is not None, MEAN=mean,
        SCALE_FACTOR=factor is not None, EXTRA=extra is not None, BLOCK=_REDUCE_BLOCK, num_warps=8)


def inv_denominator_of(y: torch.Tensor, args: AdjustedCEArgs) -> torch.Tensor:
    """(1,) fp32 ``1 / sum_i w_{y_i}`` over the valid rows ('mean'; inf for an empty batch; a target outside
    [0, C) counts 0). No sync; one launch up to ``ONE_PROGRAM_ROWS`` rows."""
    if y.shape[0] > ONE_PROGRAM_ROWS:
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


def reduce(loss_rows: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, *,
           inv_denominator: torch.Tensor | None = None, factor: torch.Tensor | None = None,
           extra: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss from the (N,) fp32 per-row losses: 'none' returns ``loss_rows``; 'sum' their sum; 'mean'
    the sum times ``inv_denominator`` ((1,) fp32, see :func:`inv_denominator_of`), computed here when None —
    then ``factor`` (the forward's, run with ``scale_mean=False``), if given, is multiplied by it in place.
    ``extra``: (E,) fp32 values added to the reduced loss (LADE's LADER partials). Returns a 0-dim tensor of
    ``out_dtype`` (NaN for the 'mean' of no rows), or writes it into ``out`` (0-dim) when given. One deterministic
    launch up to ``ONE_PROGRAM_ROWS`` rows (and extra values), torch reductions beyond."""
    if args.reduction == "none":
        if extra is not None:
            raise ValueError("extra= needs a reduced loss ('mean' or 'sum')")
        return loss_rows
    mean = args.reduction == "mean"
    if max(loss_rows.shape[0], 0 if extra is None else extra.shape[0]) > ONE_PROGRAM_ROWS:
        inv = inv_denominator if inv_denominator is not None or not mean else inv_denominator_of(y, args)
        if mean and inv_denominator is None and factor is not None:  # ignored rows stay 0 (inf when none is valid)
            factor.mul_(inv).masked_fill_(y == args.ignore_index, 0.0)
        total = loss_rows.sum()
        total = total * inv[0] if mean else total
        total = total if extra is None else total + extra.sum()
        return total.to(out_dtype) if out is None else out.copy_(total)
    out = torch.empty((), dtype=out_dtype, device=loss_rows.device) if out is None else out
    if mean and inv_denominator is None:
        inv = torch.empty(1, dtype=torch.float32, device=loss_rows.device)
        _reduce_launch(y, args, loss_rows=loss_rows, factor=factor, inv_denom=inv, out=out, extra=extra, denom=True,
                       mean=True)
    else:
        _reduce_launch(y, args, loss_rows=loss_rows, inv_denom=inv_denominator if mean else None, out=out,
                       extra=extra, denom=False, mean=mean)
    return out


def loss(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, *, grad_out: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float32, config: TileConfig | None = None):
    """The reduced loss (0-dim, ``out_dtype``; the (N,) fp32 rows for 'none') in the fewest launches: ``(loss,
    lse, factor)`` as :func:`forward` gives them (the factor includes 'mean''s 1 / sum w_{y_i}). Up to
    :func:`fused_reduction`'s rows the row kernel's last program reduces the batch, so a step is one launch (plus
    the combine of split rows); with ``grad_out`` (gradient in the forward) 'mean' needs its denominator before any
    gradient is written, which the row programs sum themselves when that is cheap (:data:`_OWN_DENOM_READS`) and
    one small launch first computes otherwise."""
    if args.reduction == "none":
        loss_rows, lse, factor, _ = forward(z, y, args, grad_out=grad_out, config=config)
        return loss_rows, lse, factor
    out = torch.empty((), dtype=out_dtype, device=z.device)
    _, lse, factor, _ = forward(z, y, args, grad_out=grad_out, config=config, scale_mean=grad_out is not None,
                                out=out)
    return out, lse, factor


def row_align(*tensors: torch.Tensor) -> int:
    """The ``ALIGN`` constexpr of the row kernels: the largest power of two, at most one 16-byte vector of elements,
    dividing the row stride of every (N, C) operand (1 unless their rows are unit-stride). Triton specialises
    strides divisible by 16 by itself; this lets an odd width such as 8142 still move 2 elements per access."""
    align = 16
    for t in tensors:
        (rows, cols), (stride_m, stride_n) = t.shape, t.stride()
        if rows > 1 and cols > 1 and stride_n != 1:
            return 1
        align = min(align, 16 // t.element_size())
        if rows > 1:
            while align > 1 and stride_m % align:
                align //= 2
    return align


def _common_flags(args: AdjustedCEArgs) -> dict:
    return dict(HAS_PRIOR=args.log_prior is not None, HAS_NOISE=args.has_noise, MARGIN_MODE=args.margin_mode,
                HAS_SCALE=args.scale != 1.0, HAS_WEIGHT=args.weight is not None,
                HAS_SMOOTH=args.label_smoothing > 0.0, SEED_FROM_PTR=args.seed_from_device)


def _seed_ptr(args: AdjustedCEArgs, dev: torch.device):
    return args.seed if args.seed_from_device else _dummy(dev)


def _class_ptrs(args: AdjustedCEArgs, dev: torch.device):
    d = _dummy(dev)
    return tuple(t if t is not None else d for t in (args.log_prior, args.cloud, args.margin_vector, args.weight))


# A gradient in the forward over rows of several tiles makes two passes. With STORE_P (row_loss_forward) the first
# also stores each tile's exp(a - max) over the gradient buffer and the second only scales it: one more write of the
# row (absorbed by L2 while the row is still there, which the reverse walk and the persistent grid aim at), and a
# second pass without z, class vectors, noise or exp. Static count, GCL 4096 x 131072 bf16: that pass's loop goes
# from ~860 to ~200 SASS instructions per 16 elements a thread, the noise drawn once instead of twice (split rows:
# the forward's splits store, and grad(stored=) scales after the combine; GCL 128 x 1M: 899 -> 196). Where the tile
# is cheap to recompute (no noise) the extra write is not worth it. "noise" (default): only when GCL's noise is on;
# "always" / "never": for tests and tuning.
STORE_PROBS = "noise"


def _store_probs(args: AdjustedCEArgs) -> bool:
    return STORE_PROBS == "always" or (STORE_PROBS == "noise" and args.has_noise)


def forward(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, *, grad_out: torch.Tensor | None = None,
            column_stats: bool = False, config: TileConfig | None = None,
            inv_denominator: torch.Tensor | None = None, scale_mean: bool = True, out: torch.Tensor | None = None):
    """Run the forward. Returns ``(loss_rows, lse, factor, column_stats)``, all fp32.

    ``loss_rows`` (N,): per-row losses (0 for ignored rows); ``lse`` (2, N): fp32 (row max, log
    sum-exp) of the adjusted row, kept apart so the backward's ``exp((a - max) - log_sum)`` is as exact
    as torch's softmax; ``factor`` (N,): d(reduced loss)/d(loss_i) times the focal factor (the backward's row
    coefficient before grad_output); ``column_stats``: a :class:`ColumnStats` (LADE) when asked for, else None.
    ``grad_out``: a tensor (N, C), possibly ``z`` itself, that receives d(reduced loss)/dz.
    ``inv_denominator``: a (1,) fp32 device tensor replacing 1 / sum_i w_{y_i} for 'mean' (callers that
    process the rows of one batch in chunks pass the whole batch's value).
    ``scale_mean=False`` ('mean', no ``grad_out``): leave the factor without 1 / sum_i w_{y_i}; the reduction
    (``out``, or :func:`reduce` with ``factor=``) finishes it, which saves the denominator's launch.
    ``out`` (0-dim, 'mean' or 'sum', not with ``column_stats``): receives the reduced loss, from the last program
    of the launch that finishes the rows when :func:`fused_reduction` allows (up to 4096 rows for 4-warp programs
    and a counter at hand), else from one :func:`reduce` launch after it.
    """
    N, C = z.shape
    dev = z.device
    cfg = config or pick_tiles(N, C, dev, column_stats=column_stats, grad_in_forward=grad_out is not None,
                               elem_bytes=z.element_size())
    if not scale_mean and grad_out is not None:
        raise ValueError("scale_mean=False needs the recompute mode (grad_out=None): the gradient needs the mean")
    if out is not None and (args.reduction == "none" or column_stats):
        raise ValueError("out= takes the 'mean' or 'sum' of a loss without column_stats")
    d = _dummy(dev)
    prior, cloud, margin, weight = _class_ptrs(args, dev)
    wsum = weight_sum(args, dev)
    split = cfg.num_splits > 1
    row_blocks = _cdiv(N, cfg.block_m)
    grid_rows = cfg.row_grid(row_blocks)
    mean = args.reduction == "mean" and scale_mean
    programs = _cdiv(N, _combine_tiles(cfg.num_splits)[1]) if split else grid_rows  # those that finish the rows
    inv, own_denom = _mean_denominator(y, args, inv_denominator, mean, programs)
    rblock = _COMBINE_RBLOCK if split else _rblock(cfg.num_warps)
    counter, reduce_mode = fused_reduction(dev, N, rblock, args.reduction) if out is not None else (None, 0)
    # three allocations, not views of one: the torch.compile ops return lse and factor, and an op's outputs may
    # not share memory
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty((2, N), dtype=torch.float32, device=dev)  # (row max, log sum-exp): LSE = their sum
    factor = torch.empty(N, dtype=torch.float32, device=dev)
    part = torch.empty((4, N, cfg.num_splits), dtype=torch.float32, device=dev) if split else d
    colstats = (ColumnStats(torch.empty((2, row_blocks, C), dtype=torch.float32, device=dev),
                            torch.empty(N, dtype=torch.float32, device=dev)) if column_stats
                else ColumnStats(d, d))
    fuse_grad = grad_out is not None and not split
    # split rows: the gradient comes from grad() after the combine; with STORE_P it scales what the forward stored
    store_p = grad_out is not None and not cfg.single_tile and not column_stats and _store_probs(args)
    g = grad_out if fuse_grad or store_p else z
    num_tiles = _cdiv(C, cfg.block_n) if store_p else 0
    tile_max = torch.empty((N, num_tiles), dtype=torch.float32, device=dev) if store_p else d
    flags = _common_flags(args)
    inv_denom = inv if inv is not None else d
    if N > 0:
        row_loss_forward[(grid_rows, cfg.num_splits)](
            z, z.stride(0), z.stride(1), y, prior, cloud, margin, weight, wsum, inv_denom,
            loss, lse, factor, part, colstats.partials, colstats.target_logits, g, g.stride(0), g.stride(1),
            tile_max, num_tiles, N, C, cfg.cols_per_split, 0, C, 0, cfg.num_splits, row_blocks, args.ignore_index,
            args.tau, args.noise_mul, args.margin_value, args.scale, args.gamma, args.label_smoothing, args.seed_value,
            args.noise_row_offset,
            _seed_ptr(args, dev), out if out is not None else d, counter if counter is not None else d,
            HAS_FOCAL=args.gamma != 0.0, MEAN=mean and not split, SPLIT=split,
            SINGLE_TILE=cfg.single_tile, GRAD_IN_FWD=fuse_grad, COLUMN_STATS=column_stats, ALIGN=row_align(z, g),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PERSISTENT=grid_rows < row_blocks,
            OWN_DENOM=own_denom and not split, REDUCE=0 if split else reduce_mode, RBLOCK=rblock, STORE_P=store_p,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)
        if split:
            _launch_combine(part, y, args, C, (loss, lse, factor), inv_denom, mean=mean, own_denom=own_denom,
                            out=out, counter=counter, reduce_mode=reduce_mode)
    reduce_unless_fused(out, counter, loss, y, args, inv_denominator=inv, factor=factor, scale_mean=scale_mean)
    if grad_out is not None and split:
        grad(z, y, args, lse, factor, None, out=grad_out, config=cfg, stored=tile_max if store_p else None)
    return loss, lse, factor, (colstats if column_stats else None)


def grad(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, lse: torch.Tensor, factor: torch.Tensor,
         grad_output: torch.Tensor | None, *, column_term=None, out: torch.Tensor | None = None,
         config: TileConfig | None = None, col_base: int = 0, num_classes: int | None = None,
         stored: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d z recomputed from the saved ``lse`` and ``factor``; ``grad_output``: scalar or (N,)
    (None: 1). ``column_term``: LADE's ``(col_a, col_b, col_lse)`` (C,) fp32 vectors (alpha included: see
    :class:`fastlt.kernels.lade.LaderTerms`); its loss is reduced, so ``grad_output`` must then be a scalar, which
    the kernel applies to the column term too. A class chunk: ``z`` (N, Ck) holds classes
    ``[col_base, col_base + Ck)`` of ``num_classes``.
    ``stored`` (:func:`forward` of split rows with STORE_P, same ``config``): the (N, tiles) fp32 running maxima
    whose tiles of ``exp(a - max)`` that forward left in ``out``; they are scaled in place, ``z`` is not read."""
    N, Ck = z.shape
    C = Ck if num_classes is None else num_classes
    if column_term is not None and grad_output is not None and grad_output.dim() != 0:
        raise ValueError(f"column_term (LADE) needs a scalar grad_output, got shape {tuple(grad_output.shape)}")
    if col_base % 8:
        raise ValueError(f"col_base must be a multiple of 8 (8 noise columns per Philox call), got {col_base}")
    if stored is not None and (out is None or column_term is not None or col_base or num_classes not in (None, Ck)):
        raise ValueError("stored= scales the forward's tiles in out=, over all classes, without column_term")
    dev = z.device
    cfg = config or pick_tiles(N, Ck, dev, column_term=column_term is not None)
    out = torch.empty((N, Ck), dtype=z.dtype, device=dev) if out is None else out
    if N == 0:
        return out
    prior, cloud, margin, weight = _class_ptrs(args, dev)
    wsum = weight_sum(args, dev)
    go = grad_output if grad_output is not None else _dummy(dev)
    go_stride = 0 if grad_output is None or grad_output.dim() == 0 else grad_output.stride(0)
    ca, cb, cl = column_term if column_term is not None else (_dummy(dev),) * 3
    row_loss_grad[(_cdiv(N, cfg.block_m), cfg.num_splits)](
        z, z.stride(0), z.stride(1), y, prior, cloud, margin, weight, wsum, lse, factor, go, go_stride,
        ca, cb, cl, out, out.stride(0), out.stride(1),
        N, C, cfg.cols_per_split, col_base, col_base + Ck, args.ignore_index, args.tau, args.noise_mul,
        args.margin_value, args.scale, args.label_smoothing, args.seed_value, args.noise_row_offset,
        _seed_ptr(args, dev),
        stored if stored is not None else _dummy(dev), stored.shape[1] if stored is not None else 0,
        HAS_UPSTREAM=grad_output is not None, COLUMN_TERM=column_term is not None, ALIGN=row_align(z, out),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STORED=stored is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **_common_flags(args))
    return out


def chunk_partials(z: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, part: torch.Tensor, chunk: int, *,
                   col_base: int, num_classes: int, column_stats: ColumnStats | None = None) -> None:
    """Row partials of one class chunk: ``z`` (N, Ck) holds classes ``[col_base, col_base + Ck)`` of
    ``num_classes``; writes (max, sum-exp, a_y, sum w*a) of those classes to ``part[:, :, chunk]``
    (``part``: (4, N, num_chunks) fp32). :func:`combine_partials` finishes the rows once every chunk is in.
    ``column_stats`` (LADE): a :class:`ColumnStats` for N rows and ``num_classes`` columns
    (:meth:`ColumnStats.empty`) that receives this chunk's column partials in its columns
    ``[col_base, col_base + Ck)`` and the target logits of the rows whose targets lie there (as :func:`forward`
    fills them for the whole matrix)."""
    N, Ck = z.shape
    if col_base % 8:
        raise ValueError(f"col_base must be a multiple of 8 (8 noise columns per Philox call), got {col_base}")
    dev = z.device
    has_cols = column_stats is not None
    cfg = pick_tiles(N, Ck, dev, column_stats=has_cols)
    row_blocks = _cdiv(N, cfg.block_m)
    if has_cols and (tuple(column_stats.partials.shape) != (2, column_stat_blocks(N), num_classes)
                     or tuple(column_stats.target_logits.shape) != (N,)):
        raise ValueError(f"column_stats must hold (2, {column_stat_blocks(N)}, {num_classes}) partials and ({N},) "
                         f"target logits (ColumnStats.empty), got {tuple(column_stats.partials.shape)} and "
                         f"{tuple(column_stats.target_logits.shape)}")
    if N == 0 or Ck == 0:
        return
    block_n = cfg.block_n
    prior, cloud, margin, weight = _class_ptrs(args, dev)
    d = _dummy(dev)
    row_loss_forward[(row_blocks, 1)](
        z, z.stride(0), z.stride(1), y, prior, cloud, margin, weight, d, d, d, d, d, part,
        column_stats.partials if has_cols else d, column_stats.target_logits if has_cols else d, z, 0, 0, d, 0,
        N, num_classes, Ck, col_base, col_base + Ck, chunk, part.shape[2], row_blocks, args.ignore_index, args.tau,
        args.noise_mul, args.margin_value, args.scale, args.gamma, args.label_smoothing, args.seed_value,
        args.noise_row_offset, _seed_ptr(args, dev), d, d, HAS_FOCAL=args.gamma != 0.0, MEAN=False, SPLIT=True,
        SINGLE_TILE=Ck <= block_n,
        GRAD_IN_FWD=False, COLUMN_STATS=has_cols, ALIGN=row_align(z), BLOCK_M=cfg.block_m, BLOCK_N=block_n,
        PERSISTENT=False, OWN_DENOM=False, REDUCE=0, RBLOCK=_rblock(cfg.num_warps), STORE_P=False,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_common_flags(args))


def column_stat_blocks(N: int) -> int:
    """Row blocks of the LADE column partials for N rows (what :func:`forward` and :func:`chunk_partials` use)."""
    return _cdiv(N, pick_tiles(max(N, 1), 1, torch.device("cpu"), column_stats=True).block_m)


def _launch_combine(part, y, args: AdjustedCEArgs, C: int, rows, inv_denom, *, mean: bool, own_denom: bool, out,
                    counter, reduce_mode: int) -> None:
    """One ``row_loss_combine`` launch over the (4, N, S) partials into ``rows`` = (loss, lse, factor)."""
    dev = part.device
    N, num_splits = part.shape[1], part.shape[2]
    block_s, block_m = _combine_tiles(num_splits)
    _, _, margin, weight = _class_ptrs(args, dev)
    d = _dummy(dev)
    row_loss_combine[(_cdiv(N, block_m),)](
        part, y, margin, weight, weight_sum(args, dev), inv_denom, *rows, out if out is not None else d,
        counter if counter is not None else d, N, C, num_splits, args.ignore_index, args.gamma, args.label_smoothing,
        HAS_WEIGHT=args.weight is not None, HAS_SMOOTH=args.label_smoothing > 0.0, HAS_FOCAL=args.gamma != 0.0,
        MEAN=mean, OWN_DENOM=own_denom, REDUCE=reduce_mode, BLOCK_M=block_m, BLOCK_S=block_s, RBLOCK=_COMBINE_RBLOCK)


def combine_partials(part: torch.Tensor, y: torch.Tensor, args: AdjustedCEArgs, num_classes: int, *,
                     inv_denominator: torch.Tensor | None = None, scale_mean: bool = True,
                     out: torch.Tensor | None = None):
    """``(loss_rows, lse, factor)`` (fp32) from the (4, N, num_chunks) partials of :func:`chunk_partials`, as
    :func:`forward` returns them; ``inv_denominator``, ``scale_mean`` and ``out`` as there: the combine's last
    program reduces the batch into ``out`` when :func:`fused_reduction` allows, and its programs sum 'mean''s
    denominator themselves when that is cheap, so a reduced loss is one launch."""
    N = part.shape[1]
    dev = part.device
    if out is not None and args.reduction == "none":
        raise ValueError("out= takes the 'mean' or 'sum' of the rows")
    mean = args.reduction == "mean" and scale_mean
    inv, own_denom = _mean_denominator(y, args, inv_denominator, mean, _cdiv(N, _combine_tiles(part.shape[2])[1]))
    counter, reduce_mode = fused_reduction(dev, N, _COMBINE_RBLOCK, args.reduction) if out is not None else (None, 0)
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty((2, N), dtype=torch.float32, device=dev)
    factor = torch.empty(N, dtype=torch.float32, device=dev)
    if N > 0:
        _launch_combine(part, y, args, num_classes, (loss, lse, factor), inv if inv is not None else _dummy(dev),
                        mean=mean, own_denom=own_denom, out=out, counter=counter, reduce_mode=reduce_mode)
    reduce_unless_fused(out, counter, loss, y, args, inv_denominator=inv, factor=factor, scale_mean=scale_mean)
    return loss, lse, factor


_SCALE_TILE = 4096  # elements per tile of scale_rows
_SCALE_PROGRAMS_PER_SM = 8


def scale_by(grad_tensor: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad_tensor *= grad_output`` in place: (M, C) by a scalar or by one value per row ((M,)); a scalar 1 costs
    one launch of a few programs (:func:`scale_rows`). Returns ``grad_tensor``."""
    if grad_output.dim() != 0 and grad_output.shape != grad_tensor.shape[:1]:
        raise ValueError(f"grad_output must be a scalar or ({grad_tensor.shape[0]},), got {tuple(grad_output.shape)}")
    _scale([grad_tensor], grad_output)
    return grad_tensor


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
    """A 2-D view of ``g`` for :func:`scale_rows`: one row when contiguous (whole 4096-element tiles)."""
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
    block_n = min(_next_pow2(max(m.shape[1] for m in mats)), _SCALE_TILE)
    block_m = max(1, min(16, _SCALE_TILE // block_n))
    tiles = sum(_cdiv(m.shape[0], block_m) * _cdiv(m.shape[1], block_n) for m in mats)
    slots = []
    for k in range(3):
        m = mats[k] if k < len(mats) else mats[0]
        slots += [m, m.stride(0), m.stride(1), m.shape[0] if k < len(mats) else 0, m.shape[1]]
    go_stride = 0 if grad_output.dim() == 0 else grad_output.stride(0)
    scale_rows[(max(1, min(tiles, _SCALE_PROGRAMS_PER_SM * _sm_count(dev))),)](
        *slots, grad_output, go_stride, NUM=len(mats), BLOCK_M=block_m, BLOCK_N=block_n)
