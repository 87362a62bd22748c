"""The launch policy of the row kernels: tile shapes, row splits, persistent grids, alignment, and where a batch
reduction runs (docs/design.md, "Kernels"). Pure arithmetic on shapes (and the device's SM count), cached."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

TILE_N = 2048  # default elements of z per program and tile


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


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@functools.cache  # (as sm_count: a device property, asked once per device, not per launch plan)
def block_smem_bytes(device: torch.device) -> int:
    """The shared memory a block may have on ``device`` (opt-in maximum: 227 KB on an H100 or H200, 163 KB on an
    A100); :data:`SMEM_BYTES` elsewhere (the interpreter, and the sm_90 compiles of tools/kernel_report.py)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", SMEM_BYTES)
    return SMEM_BYTES


def pick_tiles(N: int, C: int, device: torch.device, *, column_stats: bool = False, column_term: bool = False,
               grad_in_forward: bool = False, elem_bytes: int = 4, class_vectors: bool = False,
               block_m: int | None = None, block_n: int | None = None, num_splits: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               row_programs: int | None = None, streamed_vectors: int = 0, soft_bytes: int = 0) -> TileConfig:
    """Tile shape and row split for an (N, C) problem (cached). ``column_stats``: LADE's forward;
    ``column_term``: LADE's gradient; ``grad_in_forward`` (with ``elem_bytes``, the logits' element size): the
    forward that also writes the gradient, which may get a persistent grid (:func:`_persistent_per_sm`);
    ``class_vectors``: the launch reads a (C,) fp32 vector per element (a log prior, GCL's cloud, class weights with
    label smoothing), which 2-byte rows share between :data:`HALF_WIDTH_ROWS` rows; ``streamed_vectors``: how many
    such vectors its column loop loads, and ``soft_bytes`` the element size of class-probability targets loaded
    beside the logits (0: none), for the pipeline's shared memory (:func:`_fitting_stages`). Explicit arguments
    override (tests, tuning); ``row_programs=0`` turns the persistent grid off."""
    return _pick_tiles(N, C, sm_count(device), column_stats, column_term, grad_in_forward, elem_bytes, class_vectors,
                       block_m, block_n, num_splits, num_warps, num_stages, row_programs, streamed_vectors,
                       soft_bytes, block_smem_bytes(device))


# Shared memory a block may have on the target GPUs (H100, H200: 227 KB; other GPUs: block_smem_bytes) less room
# for what else a row kernel keeps there (its reductions; GCL's table of noise levels, 8 KB a gather: 8-24 KB seen):
# the column loop's pipeline buffers fit in the rest, or the launch raises OutOfResources on the GPU only (the
# interpreter has no such limit)
SMEM_BYTES = 232448
SMEM_RESERVED = 32 << 10


def _fitting_stages(stages: int, block_m: int, block_n: int, elem_bytes: int, streamed_vectors: int,
                    soft_bytes: int, smem_bytes: int = SMEM_BYTES) -> int:
    """``stages``, or fewer where its buffers would not fit ``smem_bytes`` less :data:`SMEM_RESERVED`: a loop of
    ``k`` stages keeps ``k - 1`` tiles of each stream it loads in shared memory (the logits', the targets' with class
    probabilities, each (C,) fp32 vector's). The wide one-row tiles (8192 fp32 columns, the whole-row and the
    persistent gradient-in-forward grids) with four streams needed 256 KB at 3 stages."""
    per_stage = block_m * block_n * (elem_bytes + soft_bytes) + block_n * 4 * streamed_vectors
    while stages > 1 and (stages - 1) * per_stage > smem_bytes - SMEM_RESERVED:
        stages -= 1
    return stages


GENERATION = 0  # bumped by reconfigure(): launch plans (fastlt.kernels.launch) made under another policy are not reused


def reconfigure(**values) -> dict:
    """Set this module's policy constants by name (``DEFAULT_STAGES=1``, ``HALF_WIDTH_ROWS=1``,
    ``WHOLE_ROW_GRAD_IN_FORWARD=False``, ...: the A/B switches of benchmarks/ab_switches.py) so that every later
    launch follows them: the tile cache is cleared and the launch plans kept with loss arguments
    (:mod:`fastlt.kernels.launch`) are not reused. Returns the previous values, for a second call to restore."""
    global GENERATION
    before = {}
    for name, value in values.items():
        if not name.isupper() or name not in globals():
            raise ValueError(f"tiles has no policy constant {name!r}")
        before[name] = globals()[name]
        globals()[name] = value
    _pick_tiles.cache_clear()
    GENERATION += 1
    return before


@contextlib.contextmanager
def reconfigured(**values):
    """:func:`reconfigure` inside the ``with`` block, the previous values restored after it."""
    before = reconfigure(**values)
    try:
        yield
    finally:
        reconfigure(**before)


# Rows of at most this many bytes (8192 fp32 classes, 16384 bf16: iNaturalist's 8142 either way) are never split
# over columns (512 x 8142 is one launch, not a split forward and its combine), and with the gradient in the forward
# one program holds the whole row as one tile (WHOLE_ROW_GRAD_IN_FORWARD; 16 warps at 8192 and more: 16 fp32 or 32
# bf16 elements a thread), so it is read once and written once. SPEC 8's calibration kernel reached 1.26x the floor
# this way at 4096 x 8142 fp32; the H100 sweep of 2026-11-23 timed 2048-wide tiles faster, but with a host-bound
# forward column and the unpipelined loops: benchmarks/tune_tiles.py's fused sweep (8192-wide tiles against 2048)
# decides on the next GPU. Static count (tools/kernel_report.py, sm_90): LA 4096 x 8142 bf16 63 registers, GCL 85,
# with triton 3.9; 64 and 95 with triton 3.6 (since the whole-row tile's pointers are a row's plus column offsets:
# 86 before, one 16-warp block an SM; kernels/adjusted_ce.py: _tile_ptrs).
WHOLE_ROW_BYTES = 32768
WHOLE_ROW_GRAD_IN_FORWARD = True

# The whole-row gradient-in-forward tile's register cap (ptxas' .maxnreg, Triton's ``maxnreg``): None lets ptxas
# choose, which at 16 warps a block is one block an SM above 64 registers (the device image's triton 3.6: GCL
# 4096 x 8142 bf16 95; LA 64 since _tile_ptrs, 86 before) and two at 64 or fewer (latency hidden by the other block's
# row). 64: two blocks at a few spilled registers outside any loop (GCL with triton 3.9: 8 B, 73.2 SASS an element on
# its straight path against 71.5). Untimed: benchmarks/ab_switches.py times 64 against None.
WHOLE_ROW_MAX_REGISTERS = None

# The statistics pass over rows of several tiles keeps per-thread (max, sum-exp) per group of the columns a thread
# loads as one vector, and reduces across threads once per row instead of twice per tile (kernels/launch.py:
# _stats_group; the kernels' _group_stats). False: the per-tile reductions (the old form, for ab_switches.py).
GROUPED_STATS = True


def whole_row_elements(elem_bytes: int) -> int:
    """The longest row (in elements of ``elem_bytes`` bytes) kept whole: :data:`WHOLE_ROW_BYTES` of logits."""
    return WHOLE_ROW_BYTES // max(1, elem_bytes)


DEFAULT_STAGES = 3  # the column loops' software-pipelining depth (tl.range num_stages); 1: the unpipelined loops
# LADE's column statistics: per program, BLOCK_M rows reduce into one partial per column ((2, N / BLOCK_M, C) fp32,
# written by the row pass and read back by the merge). 16-row partials add 2 x 12.5% to fp32 logits' traffic and
# 2 x 25% to bf16's; 64-row tiles of 128 columns quarter that (issue 17, item 3). The H100 run of 2026-11-23 timed
# 16 x 1024 at 6.74 ms and 64 x 256 at 8.72 ms (4096 x 131072 fp32), but those held 32 elements a thread (16 x 1024
# with 16 warps spilled then); at 16 elements a thread, 16 x 512, 32 x 256 and 64 x 128 of 16 warps compile alike
# (kernel_report, sm_90, fp32: 122 / 115 / 122 registers, no spills, 27.8 / 28.4 / 28.3 SASS an element).
# benchmarks/tune_tiles.py --lade and ab_switches.py time 64 against 16 on the next GPU.
COLUMN_STATS_ROWS = 64
COLUMN_STATS_ELEMENTS = 8192  # a column-statistics tile: 16 elements a thread of 16 warps
# Rows of bf16 / fp16 logits longer than one tile, in a launch that reads a (C,) fp32 class vector per element (LA's
# log prior, GCL's cloud): this many rows a tile, TILE_N / HALF_WIDTH_ROWS columns wide, so each vector tile is
# loaded once for them (issue 17, item 3). Static count (kernel_report, sm_90, LA 4096 x 131072 bf16): 12 vector
# loads a tile instead of 18, forward loop 229 -> 272 SASS per 16 elements a thread, gradient 360/249 -> 364/268,
# no spills; GCL 689 -> 693/612, 771/580 -> 777/569. Untimed: 1 restores one-row tiles (benchmarks/ab_switches.py).
HALF_WIDTH_ROWS = 2
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
def _pick_tiles(N, C, sm_count, column_stats, column_term, grad_in_forward, elem_bytes, class_vectors, block_m,
                block_n, num_splits, num_warps, num_stages, row_programs, streamed_vectors=0,
                soft_bytes=0, smem_bytes=SMEM_BYTES) -> TileConfig:
    # Defaults from benchmarks/tune_tiles.py on an H100 (triton 3.6, 2026-11-23): 2048-wide tiles and 4 warps beat
    # whole-row tiles at every shape measured (more programs in flight per SM hide HBM latency better than one
    # 16-warp program holding a whole 8K row). num_stages: that sweep found it inert, rightly then: Triton
    # software-pipelines the loads of a loop without tl.dot only when it is written tl.range(..., num_stages=k), and
    # the column loops were plain range() loops. They are tl.range(num_stages=STAGES) loops now, STAGES the config's
    # num_stages (default 3: async copies, 3 tiles in flight, ~24 KB of shared memory per 2048-wide bf16 program;
    # tools/kernel_report.py shows and checks it). Not timed yet: num_stages=1 is the old loop form, which
    # benchmarks/tune_tiles.py sweeps against it on the next GPU.
    # LADE's column statistics: see COLUMN_STATS_ROWS.
    # LADE's gradient reads three (C,) fp32 vectors per element beside z (12 B from L2 per 4 B of fp32 z with
    # one-row tiles): 4 x 512 tiles share each vector load between 4 rows (no spills, 64 registers).
    # Gradient-in-forward of long rows (unmeasured; benchmarks/tune_tiles.py sweeps it): with one program
    # per row, thousands of rows are in flight and the second pass re-reads each from HBM (1.5x the floor at
    # best). A persistent grid keeps the rows in flight within half the L2: p = 1, 2 or 4 programs per SM of 16 / p
    # warps and 8192 / p-column tiles (16 elements per thread; the row-block loop raises a program to ~122 registers,
    # so 16 warps per SM is what fits).
    row_kernel = not (column_stats or column_term)  # LADE's column statistics and gradient have tiles of their own
    whole_row = C <= whole_row_elements(elem_bytes) and row_kernel
    if (grad_in_forward and whole_row and WHOLE_ROW_GRAD_IN_FORWARD and block_n is None and num_splits is None
            and row_programs is None):
        # the row is one tile, held in registers from its read to its gradient's write (read once, written once)
        block_n = max(16, next_pow2(C))
        num_splits = 1
        if num_warps is None and block_n > TILE_N:
            num_warps = min(16, block_n // 512)
    if row_programs is None and grad_in_forward and row_kernel and not whole_row:
        per_sm = _persistent_per_sm(N, C, sm_count, elem_bytes)
        if per_sm is not None:
            row_programs = per_sm * sm_count
            block_m = 1 if block_m is None else block_m
            block_n = max(16, min(next_pow2(C), _PERSISTENT_TILE // per_sm)) if block_n is None else block_n
            num_warps = 16 // per_sm if num_warps is None else num_warps
            num_splits = 1 if num_splits is None else num_splits
    row_programs = row_programs or None
    half_width = (class_vectors and elem_bytes == 2 and HALF_WIDTH_ROWS > 1 and C > TILE_N and block_m is None
                  and block_n is None and row_programs is None and row_kernel)
    if half_width:
        # 2-byte rows that read a (C,) fp32 vector per element: tiles of HALF_WIDTH_ROWS rows of TILE_N /
        # HALF_WIDTH_ROWS columns load each vector tile once for those rows (2 B of L2 per 2 B of logits, was 4)
        block_m, block_n = HALF_WIDTH_ROWS, TILE_N // HALF_WIDTH_ROWS
    if column_stats and block_m is None:
        block_m = min(COLUMN_STATS_ROWS, max(1, next_pow2(N)))
    if block_n is None:
        if column_stats:  # COLUMN_STATS_ELEMENTS a tile: shorter batches get wider tiles
            width = max(16, COLUMN_STATS_ELEMENTS // block_m)
        else:
            width = TILE_N // _COLUMN_TERM_ROWS if column_term and block_m is None else TILE_N
        block_n = max(16, min(next_pow2(C), width))
    if block_m is None:
        if column_term:
            block_m = min(_COLUMN_TERM_ROWS, next_pow2(max(N, 1)))
        else:
            block_m = max(1, min(64, TILE_N // block_n, next_pow2(max(N, 1))))
    tiles = cdiv(C, block_n)
    if num_splits is None:
        num_splits = 1
        row_blocks = cdiv(max(N, 1), block_m)
        target = 16 * sm_count  # short batches of long rows: ~16 programs per SM (128 x 1M: ~17 splits)
        # long rows: 4 default tiles and more, whatever this launch's tile width (LADE's 128-wide column-statistics
        # tiles would otherwise split a 512-class row, a combine launch more for a small batch)
        # (a program of half-width rows holds what one of a 2048-wide row would: counted in rows here, so that
        # they split, or not, as one-row tiles would)
        if cdiv(C, TILE_N) >= 4 and (N if half_width else row_blocks) < target and not whole_row:
            num_splits = min(tiles, cdiv(target, row_blocks))
    cols_per_split = cdiv(tiles, num_splits) * block_n
    num_splits = cdiv(C, cols_per_split)
    if num_warps is None:
        elements = block_m * block_n
        if column_stats:  # ~16 elements per thread: more spill (see COLUMN_STATS_ROWS)
            num_warps = max(4, min(16, elements // 512))
        else:
            num_warps = 4 if elements <= 2048 else (8 if elements <= 8192 else 16)
    if num_stages is None:
        stages = _fitting_stages(DEFAULT_STAGES, block_m, block_n, elem_bytes, streamed_vectors, soft_bytes,
                                 smem_bytes)
    else:
        stages = num_stages
    return TileConfig(block_m, block_n, num_splits, cols_per_split, num_warps, stages, row_programs)


def row_align(*tensors: torch.Tensor) -> int:
    """The ``ALIGN`` constexpr of the row kernels: the largest power of two, at most one 16-byte vector of elements,
    dividing the row stride of every (N, C) operand (1 unless their rows are unit-stride). Triton specialises
    strides divisible by 16 by itself; this lets an odd width such as 8142 still move 2 elements per access."""
    align, strides = 16, []
    for t in tensors:
        (rows, cols), (stride_m, stride_n) = t.shape, t.stride()
        if rows > 1 and cols > 1 and stride_n != 1:
            return 1
        align = min(align, 16 // t.element_size())
        if rows > 1:
            strides.append(stride_m)
    return _power_of_two_dividing(align, strides)


def end_align(*bounds: int) -> int:
    """The ``END_ALIGN`` constexpr of the row kernels: the largest power of two, at most 16, dividing every one of
    ``bounds`` (the :class:`~fastlt.kernels.adjusted_ce.Columns`' base, end and split width). The kernels declare
    each program's last column a multiple of it, so it must divide them: a wrong claim would vectorise the masked
    tile's accesses past its last column."""
    return _power_of_two_dividing(16, bounds)


def _power_of_two_dividing(limit: int, values) -> int:
    """The largest power of two, at most ``limit`` (a power of two), dividing every one of ``values``."""
    align = limit
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def combine_tiles(num_splits: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_M)`` of :func:`row_loss_combine` for rows split in ``num_splits`` (4096 partials a tile)."""
    block_s = max(2, next_pow2(num_splits))
    return block_s, max(1, min(64, 4096 // block_s))


def column_stat_blocks(N: int) -> int:
    """Row blocks of the LADE column partials for N rows (what :func:`forward` and :func:`chunk_partials` use)."""
    return cdiv(N, pick_tiles(max(N, 1), 1, torch.device("cpu"), column_stats=True).block_m)


REDUCE_BLOCK = 4096
# One program reduces up to this many rows (a few loop steps: host launches dominate there). Longer batches
# take torch's multi-block reductions, whose launch overhead is small next to their row kernels.
ONE_PROGRAM_ROWS = 32768
# A row kernel's programs each sum the 'mean' denominator themselves (DENOM_OWN) when programs x N targets stay
# under this (8 MB of int64 reads from L2 in all: at 512 x 8142, 512 programs read 512 targets each), which
# saves the denominator's launch before a gradient-in-forward; longer, the launch's first program sums it and
# publishes it to the others (DENOM_PUBLISHED, when the launch reduces the batch).
OWN_DENOM_READS = 1 << 20


def own_denominator(programs: int, N: int) -> bool:
    """Whether ``programs`` row programs each sum 'mean''s denominator over the N targets themselves."""
    return programs * N <= OWN_DENOM_READS


def rblock(num_warps: int) -> int:
    """Width of the batch sums inside a row kernel (one 4-element vector per thread: no extra registers)."""
    return 128 * num_warps


COMBINE_RBLOCK = 128  # one value per thread of the 4-warp combine (wider, triton 3.6's ptxas spills in its loop)
# The last program's sums walk the N rows in RBLOCK-wide steps, each an L2 round trip (~0.3 us) it waits for: up to
# this many steps the tail costs about what a launch of its own would (larger batches take reduce_rows, 4096 wide).
FUSED_REDUCE_STEPS = 8


def fusable_reduction(values: int, rblock: int) -> bool:
    """Whether a launch's last program may sum ``values`` values (rows and any extra ones) in ``rblock``-wide steps
    (:func:`fastlt.kernels.reduce.last_program_reduces`): some, and at most :data:`FUSED_REDUCE_STEPS` steps and
    :data:`ONE_PROGRAM_ROWS` values."""
    return 0 < values <= min(ONE_PROGRAM_ROWS, FUSED_REDUCE_STEPS * rblock)


SCALE_TILE = 4096  # elements per tile of scale_rows
SCALE_PROGRAMS_PER_SM = 8
