"""The launchers' static choices: tile shapes per path, the ``ALIGN`` row-stride hint and the ``END_ALIGN``
column-range hint.

``ALIGN`` and ``END_ALIGN`` are promises to the compiler (``tl.multiple_of``) that the interpreter cannot check: a
wrong one is a misaligned vector access on a GPU, or a masked tile's vector that reaches past its last column. So
they are tested here directly, on the strides and column bounds they must divide.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from fastlt.kernels import launch, tiles


@pytest.mark.parametrize("dtype,C,want", [
    (torch.float32, 131072, 4), (torch.bfloat16, 131072, 8), (torch.float16, 8192, 8),
    (torch.float32, 8142, 2), (torch.bfloat16, 8142, 2), (torch.float32, 7, 1), (torch.bfloat16, 12, 4),
])
def test_row_align_is_the_largest_vector_dividing_the_row_stride(dtype, C, want):
    z = torch.empty((3, C), dtype=dtype)
    assert launch.row_align(z) == want
    assert z.stride(0) % want == 0 and want * z.element_size() <= 16


def test_row_align_takes_every_operand_views_and_single_rows():
    buf = torch.empty((4, 8200), dtype=torch.bfloat16)
    view = buf[:, :8142]  # padded rows: stride 8200, divisible by 8
    assert launch.row_align(view) == 8
    assert launch.row_align(view, torch.empty((4, 8142), dtype=torch.bfloat16)) == 2  # the stricter operand
    assert launch.row_align(torch.empty((1, 7))) == 4  # one row: its stride is never used
    assert launch.row_align(torch.empty((5, 6)).t()) == 1  # columns not unit-stride: no vector claim
    for t in (view, torch.empty((5, 30), dtype=torch.float16), torch.empty((2, 9), dtype=torch.float32)):
        a = launch.row_align(t)
        assert t.stride(0) % a == 0 or t.shape[0] == 1


@pytest.mark.parametrize("bounds,want", [
    ((8142, 8192), 2), ((0, 131072, 1024), 16), ((8141,), 1), ((1018, 2036, 1024), 2), ((24, 48), 8), ((), 16),
])
def test_end_align_is_the_largest_power_of_two_up_to_16_dividing_the_bounds(bounds, want):
    assert launch.end_align(*bounds) == want
    assert all(b % want == 0 for b in bounds)


def _row_launches(run) -> list[dict]:
    """The keyword arguments of the row kernels' launches ``run()`` makes, in order (recorded by
    tools/kernel_report.py's ``record``: no kernel runs)."""
    from tools import kernel_report as K

    return [kw for fn, _, kw in K.record(run) if fn.__name__ in ("row_loss_forward", "row_loss_grad")]


def _views(dtype):
    """(name, logits): iNaturalist's 8142 classes contiguous (row stride 8142: 2-element vectors), the same in rows
    padded to 8200 (ALIGN 8, but the last column still even only), and 8141 classes in rows of 8142 (an odd end)."""
    pad = torch.empty((4, 8200), dtype=dtype, device=DEVICE)
    odd = torch.empty((4, 8142), dtype=dtype, device=DEVICE)
    return [("8142", torch.empty((4, 8142), dtype=dtype, device=DEVICE), 2), ("8142-padded", pad[:, :8142], 2),
            ("8141-in-8142", odd[:, :8141], 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_end_align_divides_every_launch_column_range(dtype):
    """Every row launch (the forward with the gradient in it or not, its tile configurations, the recomputed
    gradient, a class chunk at an odd base) declares its last column a multiple of END_ALIGN: it must divide the
    Columns' base, end and split width, and it is 2 where 8142 classes let the masked tile move pairs."""
    from fastlt._operator import AdjustedCEArgs

    args = AdjustedCEArgs()
    for name, z, want in _views(dtype):
        y = torch.zeros(z.shape[0], dtype=torch.int64, device=DEVICE)

        def whole(z=z, y=y):
            for grad_out in (None, z):
                for cfg in (None, launch.pick_tiles(4, z.shape[1], z.device, block_n=1024),
                            launch.pick_tiles(4, z.shape[1], z.device, block_n=512, num_splits=3)):
                    _, lse, factor = launch.loss(z, y, args, config=cfg, grad_out=grad_out)
                    launch.grad(z, y, args, lse, factor, None, config=cfg)

        def chunk(c0, c1, z=z, y=y):  # a class chunk [c0, c1) of the logits, as a class-parallel rank holds it
            part = torch.zeros((launch.PARTIAL_PLANES, 4, 1), dtype=torch.float32, device=DEVICE)
            launch.chunk_partials(z[:, c0:c1], y, args, part, 0, col_base=c0, num_classes=z.shape[1])
            _, stats, coef = launch.combine_partials(part, y, args, z.shape[1], out=torch.empty((), device=DEVICE))
            launch.grad(z[:, c0:c1], y, args, stats, coef, None, col_base=c0, num_classes=z.shape[1])

        launches = _row_launches(whole)
        assert len(launches) >= 6
        assert {kw["END_ALIGN"] for kw in launches} == {want}, name
        chunked = []
        # rank 1 of 8 (torch.chunk of 8142: 1018 wide at 1018); a start less aligned than the width (1017, or 18
        # with 12 classes: a launcher that forgot the base would claim 2 and 4); one aligned chunk of 16
        for (c0, c1), expect in (((1018, 2036), 2), ((1017, 2035), 1), ((18, 30), 2), ((32, 48), 16)):
            got = _row_launches(lambda c0=c0, c1=c1: chunk(c0, c1))
            assert len(got) == 2 and {kw["END_ALIGN"] for kw in got} == {expect}, (name, c0, c1)
            chunked += got
        for kw in launches + chunked:
            a, cols = kw["END_ALIGN"], kw["cols_of"]
            assert a & (a - 1) == 0 and 1 <= a <= 16, name
            assert cols.base % a == 0 and cols.end % a == 0 and cols.per_split % a == 0, (name, cols, a)


def test_the_whole_row_register_cap_reaches_only_the_whole_row_launch():
    """``tiles.WHOLE_ROW_MAX_REGISTERS`` (an A/B of benchmarks/ab_switches.py): the whole-row gradient-in-forward
    launch takes it as Triton's ``maxnreg``; the recompute forward and its gradient do not, and by default none does."""
    from fastlt._operator import AdjustedCEArgs

    z = torch.empty((4, 8142), dtype=torch.bfloat16, device=DEVICE)
    y = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    args = AdjustedCEArgs()

    def run():
        launch.loss(z, y, args, grad_out=z)  # the whole row, the gradient in the forward
        _, lse, factor = launch.loss(z, y, args)
        launch.grad(z, y, args, lse, factor, None)

    assert [kw.get("maxnreg") for kw in _row_launches(run)] == [None, None, None]
    with tiles.reconfigured(WHOLE_ROW_MAX_REGISTERS=64):
        launches = _row_launches(run)
    assert [kw.get("maxnreg") for kw in launches] == [64, None, None]
    assert launches[0]["SINGLE_TILE"] and launches[0]["GRAD_IN_FWD"] and not launches[1]["GRAD_IN_FWD"]


def test_noise_tiles_narrower_than_a_philox_group_are_refused():
    """GCL's noise is drawn 8 columns at a time: an explicit tile config narrower than that is a clear error, not
    noise from the wrong group; the same config without noise runs."""
    from fastlt._operator import AdjustedCEArgs

    z = torch.randn(3, 20, device=DEVICE)
    y = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    cfg = launch.pick_tiles(3, 20, z.device, block_n=4)
    gcl = AdjustedCEArgs(cloud=torch.rand(20, device=DEVICE), noise_mul=1.0, seed=1)
    with pytest.raises(ValueError, match="multiple of 8 columns"):
        launch.loss(z, y, gcl, config=cfg)
    with pytest.raises(ValueError, match="multiple of 8 columns"):
        launch.grad(z, y, gcl, torch.zeros(2, 3, device=DEVICE), torch.ones(3, device=DEVICE), None, config=cfg)
    launch.loss(z, y, AdjustedCEArgs(), config=cfg)


def test_lade_tiles_without_spilling_shapes():
    """LADE's forward takes 16-row tiles (the column partials) and its gradient 4-row tiles (the column vectors
    shared by 4 rows); other paths keep one-row tiles, and explicit arguments win."""
    cpu = torch.device("cpu")
    stats = launch.pick_tiles(4096, 131072, cpu, column_stats=True)
    assert (stats.block_m, stats.block_n, stats.num_warps) == (64, 128, 16)  # tiles.COLUMN_STATS_ROWS
    term = launch.pick_tiles(4096, 131072, cpu, column_term=True)
    assert (term.block_m, term.block_n) == (4, 512)
    assert launch.pick_tiles(4096, 131072, cpu).block_m == 1
    assert launch.pick_tiles(4096, 131072, cpu, column_term=True, block_m=1, block_n=2048).block_n == 2048
    assert launch.pick_tiles(3, 7, cpu, column_term=True).block_m == 4
    assert launch.column_stat_blocks(4096) == 4096 // 64
    assert launch.pick_tiles(3, 1000, cpu, column_stats=True).block_m == 4  # short batches: wider tiles
    assert launch.pick_tiles(3, 1000, cpu, column_stats=True).block_n == 1024


def _tiles_on_h100(N, C, elem_bytes, **kw):
    return tiles._pick_tiles(N, C, 132, False, False, True, elem_bytes, False, kw.get("block_m"), kw.get("block_n"),
                             None, kw.get("num_warps"), None, kw.get("row_programs"))


def test_persistent_grid_only_where_the_rows_in_flight_overflow_l2():
    """The gradient-in-forward gets a persistent grid when the default grid's rows in flight overflow half the L2
    but one row per SM fits in it: bf16 4096 x 131072 (132 programs of 16 warps); not at 8142 classes (the default
    grid's rows fit), not for fp32 131072 or 1M classes (one row per SM already overflows), never without the
    gradient in the forward."""
    bf16 = _tiles_on_h100(4096, 131072, 2)
    assert (bf16.row_programs, bf16.num_warps, bf16.block_n, bf16.block_m, bf16.num_splits) == (132, 16, 8192, 1, 1)
    two = _tiles_on_h100(4096, 32768, 2)  # 64 KB rows: 2 programs of 8 warps per SM
    assert (two.row_programs, two.num_warps, two.block_n) == (264, 8, 4096)
    for N, C, eb in [(4096, 8142, 2), (4096, 8142, 4), (4096, 131072, 4), (1024, 1 << 20, 2), (64, 131072, 2)]:
        assert _tiles_on_h100(N, C, eb).row_programs is None, (N, C, eb)
    assert tiles._pick_tiles(4096, 131072, 132, False, False, False, 2, False, *[None] * 6).row_programs is None
    # explicit arguments win; row_programs=0 turns the grid off
    assert _tiles_on_h100(4096, 131072, 2, num_warps=4).num_warps == 4
    assert _tiles_on_h100(4096, 131072, 2, row_programs=0).row_programs is None
    assert bf16.row_grid(4096) == 132 and bf16.row_grid(7) == 7
    assert _tiles_on_h100(4096, 8142, 2).row_grid(4096) == 4096


def test_two_byte_rows_share_class_vector_tiles_between_two_rows():
    """bf16 / fp16 rows past one tile whose launch reads a (C,) class vector per element get 2 x 1024 tiles (each
    vector tile loaded once for two rows); fp32 rows, launches without class vectors, rows of one tile, LADE's tiles
    and explicit tiles keep theirs. tiles.reconfigure(HALF_WIDTH_ROWS=1) restores one-row tiles."""
    cpu = torch.device("cpu")
    half = launch.pick_tiles(4096, 131072, cpu, elem_bytes=2, class_vectors=True)
    assert (half.block_m, half.block_n, half.num_warps) == (2, 1024, 4)
    assert launch.pick_tiles(4096, 131072, cpu, elem_bytes=4, class_vectors=True).block_m == 1
    assert launch.pick_tiles(4096, 131072, cpu, elem_bytes=2).block_m == 1
    assert launch.pick_tiles(4096, 2000, cpu, elem_bytes=2, class_vectors=True).block_n == 2048
    assert launch.pick_tiles(4096, 131072, cpu, elem_bytes=2, class_vectors=True, column_term=True).block_m == 4
    assert launch.pick_tiles(4096, 131072, cpu, elem_bytes=2, class_vectors=True, block_n=2048).block_m == 1
    with tiles.reconfigured(HALF_WIDTH_ROWS=1):
        assert launch.pick_tiles(4096, 131072, cpu, elem_bytes=2, class_vectors=True).block_m == 1
    assert launch.pick_tiles(4096, 131072, cpu, elem_bytes=2, class_vectors=True).block_m == 2
    with pytest.raises(ValueError, match="no policy constant 'TILE_M'"):
        tiles.reconfigure(TILE_M=3)


def test_splits_only_for_long_rows_of_short_batches(monkeypatch):
    """On an H100's 132 SMs: rows of 4 default tiles and more split over columns when the batch gives fewer than ~16
    programs an SM; LADE's 128-wide column-statistics tiles do not split a 512-class row (a combine launch more for
    nothing), and bf16 rows two a tile split as one-row tiles would (4096 x 131072: not at all)."""
    monkeypatch.setattr(tiles, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    assert launch.pick_tiles(4096, 131072, dev, elem_bytes=2, class_vectors=True).num_splits == 1
    assert launch.pick_tiles(4096, 131072, dev).num_splits == 1
    assert launch.pick_tiles(1000, 131072, dev, elem_bytes=2, class_vectors=True).num_splits > 1
    assert launch.pick_tiles(128, 1_000_000, dev, elem_bytes=2, class_vectors=True).num_splits > 1
    assert launch.pick_tiles(4096, 131072, dev, column_stats=True).num_splits > 1  # 64 row blocks
    assert launch.pick_tiles(64, 512, dev, column_stats=True).num_splits == 1
    assert launch.pick_tiles(512, 8142, dev).num_splits == 1  # a whole-row width (tiles.WHOLE_ROW_BYTES)


def test_pipeline_buffers_fit_an_h100_block():
    """A k-stage column loop keeps k - 1 tiles of each stream it loads in shared memory: the 8192-wide fp32 tiles
    (the persistent and the whole-row gradient-in-forward grids) with the logits and three (C,) vectors, or class
    probabilities, weights and a log prior, needed 256 KB at 3 stages (the compiled kernel 262208-270336 B), over an
    H100 block's 227 KB: OutOfResources on the GPU only. Stages drop until the buffers fit; narrow tiles keep 3.
    tools/kernel_report.py --check compiles two such launches and fails above the limit."""
    def stages(N, C, eb, **streams):
        return tiles._pick_tiles(N, C, 132, False, False, True, eb, True, *[None] * 6, **streams).num_stages

    assert stages(4096, 32768, 4) == 3  # the logits alone: 128 KB
    assert stages(4096, 32768, 4, streamed_vectors=2) == 3  # 192 KB
    assert stages(4096, 32768, 4, streamed_vectors=3) == 2
    assert stages(4096, 32768, 4, streamed_vectors=2, soft_bytes=4) == 2
    assert stages(4096, 8142, 4, streamed_vectors=3) == 2  # the whole-row tile
    assert stages(4096, 131072, 2, streamed_vectors=1) == 3  # bf16 persistent, LA or GCL: 2 x 48 KB
    assert stages(4096, 131072, 2, streamed_vectors=3) == 2  # every term: 2 x 112 KB
    for N, C, eb in [(4096, 131072, 2), (4096, 32768, 4), (4096, 8142, 4), (128, 1 << 20, 4)]:
        for vectors in range(4):
            for soft in (0, eb):
                cfg = tiles._pick_tiles(N, C, 132, False, False, True, eb, True, *[None] * 6, vectors, soft)
                per_stage = cfg.block_m * cfg.block_n * (eb + soft) + cfg.block_n * 4 * vectors
                budget = tiles.SMEM_BYTES - tiles.SMEM_RESERVED
                assert (cfg.num_stages - 1) * per_stage <= budget, (N, C, eb, vectors, soft)
    # a GPU with less shared memory a block (an A100's 163 KB) drops a stage sooner
    a100 = tiles._pick_tiles(4096, 32768, 108, False, False, True, 4, True, *[None] * 6, 2, 0, 167936)
    assert a100.num_stages == 2 and stages(4096, 32768, 4, streamed_vectors=2) == 3
    # the launcher counts the streams of its terms
    args = launch.AdjustedCEArgs(log_prior=torch.zeros(8), cloud=torch.ones(8), noise_mul=1.0, weight=torch.ones(8),
                                 label_smoothing=0.1)
    assert launch._tile_streams(launch.kernel_groups(args, torch.device("cpu")).flags, None) == dict(
        class_vectors=True, streamed_vectors=3, soft_bytes=0)
