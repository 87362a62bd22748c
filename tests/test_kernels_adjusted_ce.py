"""The Triton row-operator kernels against the float64 reference (docs/design.md, Tests).

Without a GPU these run the real kernels in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with one they run natively on CUDA tensors. Shapes stay small for CI.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import DEVICE, DTYPES, class_vectors, to_device
from oracle import assert_oracle_close

from fastlt import _operator as O
from fastlt import functional as LF
from fastlt import reference as R
from fastlt.kernels import launch
from fastlt.kernels.philox_noise import gcl_noise_kernel


def _flags(name: str, cv: dict, seed: int) -> dict:
    return {
        "plain": {},
        "la": dict(log_prior=cv["log_prior"], tau=1.3),
        "ldam": dict(margin=cv["margins"], scale=30.0),
        "gcl": dict(cloud=cv["cloud"], noise_mul=1.0, seed=seed, margin=0.5, scale=30.0),
        "gcl_focal": dict(cloud=cv["cloud"], noise_mul=0.5, seed=seed, margin=0.1, scale=20.0, gamma=1.0),
        "weighted_smooth": dict(log_prior=cv["log_prior"], weight=cv["weight"], label_smoothing=0.15),
        "all": dict(log_prior=cv["log_prior"], tau=0.7, cloud=cv["cloud"], noise_mul=0.5, seed=seed,
                    margin=cv["margins"], scale=8.0, gamma=2.0, weight=cv["weight"], label_smoothing=0.1),
    }[name]


def _inputs(N, C, dtype, gen, *, peaked=False, ignore_rows=(1,)):
    z = torch.randn(N, C, generator=gen, dtype=torch.float64) * (25.0 if peaked else 2.0)
    y = torch.randint(0, C, (N,), generator=gen)
    for r in ignore_rows:
        if r < N:
            y[r] = -100
    return z.to(dtype), y


def run_and_compare(z, y, kw, *, reduction="mean", grad_in_forward=False, config=None, go_scale=True):
    """Kernel vs float64 reference vs same-dtype reference: loss and d loss / d z."""
    dtype = z.dtype
    zk = z.to(DEVICE).clone()
    yk = y.to(DEVICE)
    if grad_in_forward:
        leaf = zk.clone().requires_grad_()
        zin = leaf * 1.0  # a non-leaf, as a layer output would be
    else:
        zin = zk.requires_grad_()
    loss = _call_kernel(zin, yk, kw, reduction, grad_in_forward, config)
    go = torch.randn(loss.shape, dtype=torch.float64) * 1.7 + (0.5 if go_scale else 0.0)
    loss.backward(go.to(DEVICE, loss.dtype))
    grad = leaf.grad if grad_in_forward else zin.grad

    z64 = z.to(torch.float64).requires_grad_()
    ref64 = R.adjusted_cross_entropy(z64, y, reduction=reduction, **to_device(kw, torch.float64, "cpu"))
    ref64.backward(go)
    zs = z.clone().requires_grad_()
    kw_same = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in to_device(kw, None, "cpu").items()}
    ref_same = R.adjusted_cross_entropy(zs, y, reduction=reduction, **kw_same)
    ref_same.backward(go.to(dtype))
    assert_oracle_close(loss, ref64, ref_same, dtype, what="loss")
    assert grad.dtype == dtype
    # the gradient in the forward is stored in the logits' dtype and the backward scales it by grad_output (not 1
    # here): one rounding more than the reference's softmax backward. STORE_P (a gradient in the forward over
    # several tiles, GCL's by default) first stores exp(a - max) in that dtype too: one more
    noise = kw.get("noise") is not None
    stored = grad_in_forward and (launch.STORE_PROBS == "always" or (launch.STORE_PROBS == "noise" and noise))
    assert_oracle_close(grad, z64.grad, zs.grad, dtype, what="grad", roundings=1 + grad_in_forward + stored)


def _call_kernel(zin, yk, kw, reduction, grad_in_forward, config):
    if config is None:
        return LF.adjusted_cross_entropy(zin, yk, reduction=reduction, backend="triton",
                                         grad_in_forward=grad_in_forward, **to_device(kw))
    # a forced tile configuration (split rows, many tiles): go through the Function with patched tiles
    orig = launch.pick_tiles
    launch.pick_tiles = lambda N, C, device, **k: orig(N, C, device, **{**config, **k})
    try:
        return LF.adjusted_cross_entropy(zin, yk, reduction=reduction, backend="triton",
                                         grad_in_forward=grad_in_forward, **to_device(kw))
    finally:
        launch.pick_tiles = orig


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("flags", ["plain", "la", "ldam", "gcl", "gcl_focal", "weighted_smooth", "all"])
def test_every_flag_dtype_reduction(flags, reduction, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flags, reduction, str(dtype))).encode()))  # stable per case
    N, C = 6, 37
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen)
    run_and_compare(z, y, _flags(flags, cv, seed=int(torch.randint(0, 2**40, (), generator=gen))),
                    reduction=reduction)


@pytest.mark.parametrize("N,C", [(1, 1), (1, 7), (3, 7), (257, 5), (4, 1000), (2, 8142), (3, 2)])
@pytest.mark.parametrize("flags", ["plain", "all"])
def test_odd_shapes(N, C, flags):
    gen = torch.Generator().manual_seed(N * 100003 + C)
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, torch.float32, gen)
    run_and_compare(z, y, _flags(flags, cv, seed=5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_confident_logits(dtype):
    gen = torch.Generator().manual_seed(11)
    cv = class_vectors(50, gen)
    z, y = _inputs(16, 50, dtype, gen, peaked=True)
    z[torch.arange(16), y.clamp(min=0)] = 60.0  # the target dominates: p_y -> 1, gradient tiny
    run_and_compare(z, y, _flags("la", cv, 0))
    run_and_compare(z, y, _flags("gcl_focal", cv, 3))


@pytest.mark.parametrize("config", [dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3),
                                    dict(block_n=32, num_splits=2, block_m=2),
                                    dict(block_n=32, num_splits=1, block_m=2, row_programs=2)],
                         ids=["tiles", "split3", "split2x2", "persistent"])
@pytest.mark.parametrize("flags", ["plain", "gcl", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_split_and_multi_tile_paths(config, flags, reduction):
    gen = torch.Generator().manual_seed(7)
    N, C = 5, 101
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, torch.float32, gen)
    run_and_compare(z, y, _flags(flags, cv, 17), reduction=reduction, config=config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("flags", ["gcl", "all"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_row_blocks_past_the_last_row(dtype, flags, grad_in_forward):
    """Two-row blocks over an odd number of rows (N = 7: the last block's second row is past N) in several
    column tiles: the tiles' values are masked by column only (kernels/adjusted_ce.py: _finish_tile), so the row
    past N computes finite statistics that must reach no store, no batch sum and no gradient; against float64."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flags, str(dtype), grad_in_forward)).encode()))
    N, C = 7, 104
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen, ignore_rows=(1,))
    config = dict(block_n=32, num_splits=1, block_m=2)
    assert launch.pick_tiles(N, C, torch.device(DEVICE), **config).block_m == 2
    run_and_compare(z, y, _flags(flags, cv, 41), config=config, grad_in_forward=grad_in_forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [dict(block_n=16, num_splits=1), dict(block_n=32, num_splits=3),
                                    dict(block_n=32, num_splits=1, block_m=2, row_programs=2)],
                         ids=["tiles", "split3", "persistent"])
@pytest.mark.parametrize("flags", ["la", "gcl_focal", "weighted_smooth", "all"])
def test_grouped_statistics(dtype, config, flags):
    """Rows loaded in vectors of 4 (fp32) or 8 (bf16, fp16) columns keep per-thread statistics per such group over
    their tiles (kernels/adjusted_ce.py: _group_stats, _combine_groups; launch._stats_group): C = 104 in 16- and
    32-wide tiles with a tail tile, split or not, (without smoothing) a row masked with the dtype's minimum and one
    half with -inf, against the float64 reference, with the gradient in the forward too."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flags, str(dtype), sorted(config.items()))).encode()))
    N, C = 6, 104
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen, ignore_rows=(3,))
    if "label_smoothing" not in _flags(flags, cv, 0):  # (smoothing sums such logits: an infinite loss, as torch's)
        z[2, : C - 5] = torch.finfo(dtype).min
        y[2] = C - 2
        z[4, : C // 2] = float("-inf")
        y[4] = C - 1
    cfg = launch.pick_tiles(N, C, torch.device(DEVICE), **config)
    plain = launch.kernel_flags(O.AdjustedCEArgs())
    assert launch._stats_group(z, launch.row_align(z), cfg, plain)[0] == 16 // dtype.itemsize  # grouped
    run_and_compare(z, y, _flags(flags, cv, 29), config=config)
    run_and_compare(z, y, _flags(flags, cv, 29), reduction="none", grad_in_forward=True, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [dict(block_n=512, num_splits=1), dict(block_n=512, num_splits=2, block_m=2),
                                    dict(block_n=256, num_splits=1)],
                         ids=["tiles", "split2x2", "one-vector"])
@pytest.mark.parametrize("flags", ["la", "all"])
def test_grouped_statistics_of_rows_in_two_column_vectors(dtype, config, flags):
    """Rows of an odd width (C = 1030: 2-column vectors) in wide tiles: each thread's two vectors of a row per tile
    (one vector in 256-wide tiles: 2 elements) are its group (GROUP 2, GROUP_SPAN 256), against float64."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flags, str(dtype), sorted(config.items()))).encode()))
    N, C = 5, 1030
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen)
    cfg = launch.pick_tiles(N, C, torch.device(DEVICE), **config)
    plain = launch.kernel_flags(O.AdjustedCEArgs())
    assert launch._stats_group(z, launch.row_align(z), cfg, plain) == (2, 256)
    run_and_compare(z, y, _flags(flags, cv, 31), config=config)


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_tiles_only(dtype, grad_in_forward):
    """C a multiple of the tile: every tile takes the unmasked-column path and no partial tile follows."""
    gen = torch.Generator().manual_seed(19)
    N, C = 6, 64
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen)
    run_and_compare(z, y, _flags("all", cv, 29), grad_in_forward=grad_in_forward, config=dict(block_n=16))


@pytest.mark.parametrize("config", [None, dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=4),
                                    dict(block_n=16, num_splits=1, row_programs=3)],
                         ids=["single_tile", "tiles", "split", "persistent"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_in_forward(config, reduction, dtype):
    gen = torch.Generator().manual_seed(3)
    N, C = 7, 70
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen)
    run_and_compare(z, y, _flags("all", cv, 23), reduction=reduction, grad_in_forward=True, config=config)


@pytest.mark.parametrize("flags", ["all", "gcl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_in_forward_whole_row_past_the_default_tile(flags, dtype):
    """A row wider than the 2048-wide default tile but within tiles.WHOLE_ROW_BYTES: with the gradient in the forward
    it is one 4096-wide tile of 8 warps (read once, its gradient written from registers), against float64."""
    gen = torch.Generator().manual_seed(4)
    N, C = 3, 2900
    cfg = launch.pick_tiles(N, C, torch.device(DEVICE), grad_in_forward=True, elem_bytes=dtype.itemsize)
    assert cfg.single_tile and cfg.block_n == 4096 and cfg.num_warps == 8
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen)
    run_and_compare(z, y, _flags(flags, cv, 5), grad_in_forward=True)


@pytest.mark.parametrize("flags", ["all", "gcl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_two_byte_rows_in_two_row_tiles(flags, dtype):
    """2-byte rows past one tile that read class vectors: 2 x 1024 tiles (tiles.HALF_WIDTH_ROWS) by default, an odd
    row count (the last tile's second row masked), several column tiles and a partial one, against float64."""
    gen = torch.Generator().manual_seed(6)
    N, C = 5, 2100
    cfg = launch.pick_tiles(N, C, torch.device(DEVICE), elem_bytes=2, class_vectors=True)
    assert (cfg.block_m, cfg.block_n) == (2, 1024)
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen)
    run_and_compare(z, y, _flags(flags, cv, 9))


def test_two_byte_rows_in_two_row_tiles_with_the_gradient_in_the_forward():
    """bf16 GCL rows past a whole-row tile (tiles.WHOLE_ROW_BYTES) with the gradient in the forward: two-row tiles,
    split over columns (a short batch), the split forward storing exp(a - max) for the gradient (STORE_P: the noise
    drawn once), against float64."""
    gen = torch.Generator().manual_seed(8)
    N, C = 3, 16500
    cfg = launch.pick_tiles(N, C, torch.device(DEVICE), grad_in_forward=True, elem_bytes=2, class_vectors=True)
    assert cfg.block_m == 2 and not cfg.single_tile
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, torch.bfloat16, gen)
    run_and_compare(z, y, _flags("gcl", cv, 9), grad_in_forward=True)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("store", ["never", "always"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_in_forward_stored_probabilities(store, dtype, splits, monkeypatch):
    """STORE_P: the gradient pass of a multi-tile row scales the exp(a - max) that the statistics pass stored over
    the gradient (rounded to the logits' dtype) instead of recomputing the tile; for split rows that pass is
    row_loss_grad's STORED after the combine. Both policies, every dtype, one and several splits, confident
    logits, the flags with and without noise (by default only GCL's noise turns it on). A confident target was
    the running max where its exp(a - max) was stored, which is exactly 1, so its p_y - 1 stays exact in bf16 and
    fp16."""
    monkeypatch.setattr(launch, "STORE_PROBS", store)
    gen = torch.Generator().manual_seed(13)
    N, C = 9, 50
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen, peaked=True)
    z[torch.arange(N), y.clamp(min=0)] = 60.0
    for flags in ("la", "gcl_focal", "all"):
        for reduction in ("mean", "none"):
            run_and_compare(z, y, _flags(flags, cv, 3), reduction=reduction, grad_in_forward=True,
                            config=dict(block_n=16, num_splits=splits))


def test_split_grad_in_forward_draws_the_noise_once(monkeypatch):
    """GCL's gradient in the forward over split rows (128 x 1M's path): the gradient launch after the combine
    scales what the forward stored and never reads the logits, so the noise is drawn once. Proven by handing that
    launch logits full of NaN: the gradient still matches the reference (and the launch was asked for STORED)."""
    seen = []
    orig = launch.grad

    def spy(z, *a, stored=None, **k):
        seen.append(stored is not None)
        return orig(torch.full_like(z, float("nan")), *a, stored=stored, **k)

    monkeypatch.setattr(launch, "grad", spy)
    gen = torch.Generator().manual_seed(31)
    N, C = 5, 70
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, torch.float32, gen)
    run_and_compare(z, y, _flags("gcl", cv, 41), grad_in_forward=True, config=dict(block_n=16, num_splits=3))
    assert seen == [True]


@pytest.mark.parametrize("scale", [30.0, 0.25, 0.0, -2.0])
@pytest.mark.parametrize("config", [None, dict(block_n=16, num_splits=1), dict(block_n=32, num_splits=3),
                                    dict(block_n=32, num_splits=1, block_m=2, row_programs=2)],
                         ids=["single_tile", "tiles", "split3", "persistent"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_scale_of_either_sign(scale, config, grad_in_forward):
    """The logit scale s in each of its kernel modes (Flags.SCALE_MODE): s > 0 takes each tile's max of the
    unscaled logits and scales it (kernels/adjusted_ce.py: Tile, _tile_max), s <= 0 scales every element first.
    GCL's terms with s, fp32 rows of 104 classes (grouped statistics in 16-wide tiles, split rows, two-row blocks,
    the gradient in the forward), against float64; with s > 0 half a row is masked with -inf (masked before the
    scale: -inf * s)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((scale, sorted((config or {}).items()))).encode()))
    N, C = 5, 104
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, torch.float32, gen, ignore_rows=(3,))
    if scale > 0:
        z[4, : C // 2] = float("-inf")
        y[4] = C - 1
    mode = launch.kernel_flags(O.AdjustedCEArgs(scale=scale)).SCALE_MODE
    assert mode == (1 if scale > 0 else 2)
    kw = dict(cloud=cv["cloud"], noise_mul=0.5, seed=13, margin=0.2, scale=scale, gamma=1.0)
    run_and_compare(z, y, kw, reduction="none", grad_in_forward=grad_in_forward, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [None, dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3),
                                    dict(block_n=32, num_splits=1, block_m=2, row_programs=2)],
                         ids=["default", "tiles", "split3", "persistent"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_logits_masked_with_the_dtype_minimum(dtype, config, grad_in_forward):
    """Classes masked with ``torch.finfo(dtype).min`` (the usual masking idiom): a row masked whole (its target
    too), a row masked but for a few classes, an ignored masked row; and half a row masked with -inf. The running
    maxima start at the float32 minimum, so such a row's max is its own (finite) value; they used to start at
    -1e30, above every entry, which gave -inf losses and inf / NaN gradients where torch gives finite ones."""
    gen = torch.Generator().manual_seed(23)
    N, C = 5, 70
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, dtype, gen, ignore_rows=(3,))
    low = torch.finfo(dtype).min
    z[0] = low
    z[2, : C - 5] = low
    y[2] = C - 2
    z[3] = low
    z[4, : C // 2] = float("-inf")  # masked with -inf (the target is not)
    y[4] = C - 1
    for flags in ("plain", "la"):
        run_and_compare(z, y, _flags(flags, cv, 3), reduction="none", grad_in_forward=grad_in_forward,
                        config=config)


@pytest.mark.parametrize("loss", ["ldam", "gcl"])
def test_a_scaled_row_masked_whole_is_nan_as_torch(loss):
    """Under a scale s (LDAM's and GCL's 30) ``finfo(float32).min`` overflows to -inf once scaled, so a row masked
    whole has no finite loss: NaN from the kernels and from the same-dtype reference, as ``F.cross_entropy(s * z)``
    gives (the README says so and advises ``ignore_index`` for such a row: the next test); the other rows keep
    their values."""
    gen = torch.Generator().manual_seed(29)
    N, C = 4, 37
    z = torch.randn(N, C, generator=gen)
    z[1] = torch.finfo(torch.float32).min
    y = torch.randint(0, C, (N,), generator=gen)
    kw = _flags(loss, class_vectors(C, gen), 7)
    rows = LF.adjusted_cross_entropy(z.to(DEVICE), y.to(DEVICE), backend="triton", reduction="none",
                                     **to_device(kw)).cpu()
    ref = R.adjusted_cross_entropy(z, y, reduction="none", **kw)
    assert torch.isnan(rows[1]) and torch.isnan(ref[1])
    assert torch.isnan(torch.nn.functional.cross_entropy(30.0 * z[1:2], y[1:2]))
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(rows[keep], ref[keep], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("config", [None, dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3),
                                    dict(block_n=32, num_splits=1, block_m=2, row_programs=2)],
                         ids=["default", "tiles", "split3", "persistent"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("flags", ["plain", "ldam", "gcl", "all"])
def test_an_ignored_row_masked_whole_has_a_zero_gradient(flags, grad_in_forward, config):
    """Ignored rows masked whole: with -inf, and with ``finfo.min`` that a scale turns into -inf. Their log sum-exp
    is -inf, and ``p = exp(a - max - log_sum)`` would be NaN, times a zero coefficient still NaN (torch's own
    softmax backward gives NaN there): the gradient passes take such rows' probabilities as 0, so their gradient is
    0, as the float64 reference's (where ``30 * finfo(float32).min`` is finite). Every path: one tile, several, split
    rows, two-row persistent tiles; the gradient in the forward (with GCL's stored tiles) and recomputed."""
    gen = torch.Generator().manual_seed(31)
    N, C = 5, 70
    z = torch.randn(N, C, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    z[1] = torch.finfo(torch.float32).min
    z[3] = float("-inf")
    y[1] = y[3] = -100
    for reduction in ("mean", "none"):
        run_and_compare(z, y, _flags(flags, class_vectors(C, gen), 5), reduction=reduction,
                        grad_in_forward=grad_in_forward, config=config)


def test_grad_in_forward_overwrites_logits_and_skips_unit_scale():
    gen = torch.Generator().manual_seed(4)
    z, y = _inputs(4, 9, torch.float32, gen, ignore_rows=())
    leaf = z.to(DEVICE).requires_grad_()
    logits = leaf * 1.0
    loss = LF.adjusted_cross_entropy(logits, y.to(DEVICE), backend="triton", grad_in_forward=True)
    expected = torch.softmax(z.double(), 1) - torch.nn.functional.one_hot(y, 9)
    # before backward the logits already hold d loss / d z (for grad_output = 1)
    torch.testing.assert_close(logits.detach().cpu().double(), expected / 4, atol=1e-6, rtol=1e-5)
    loss.backward()
    torch.testing.assert_close(leaf.grad.cpu().double(), expected / 4, atol=1e-6, rtol=1e-5)


def test_grad_in_forward_refuses_a_leaf():
    z = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="grad_in_forward"):
        LF.adjusted_cross_entropy(z, torch.tensor([0, 1], device=DEVICE), backend="triton", grad_in_forward=True)


@pytest.mark.parametrize("layout", ["row_stride", "transposed"])
def test_non_contiguous_logits(layout):
    gen = torch.Generator().manual_seed(5)
    N, C = 6, 29
    cv = class_vectors(C, gen)
    base = torch.randn(N, C + 11, generator=gen) if layout == "row_stride" else torch.randn(C, N, generator=gen)
    z = base[:, :C] if layout == "row_stride" else base.t()
    assert not z.is_contiguous()
    y = torch.randint(0, C, (N,), generator=gen)
    zk = z.detach() if DEVICE == "cpu" else (base.to(DEVICE)[:, :C] if layout == "row_stride"
                                                else base.to(DEVICE).t())
    zk.requires_grad_()
    assert zk.stride() == z.stride()
    kw = _flags("all", cv, 2)
    loss = LF.adjusted_cross_entropy(zk, y.to(DEVICE), backend="triton", **to_device(kw))
    loss.backward()
    z64 = z.double().requires_grad_()
    ref = R.adjusted_cross_entropy(z64, y, **to_device(kw, torch.float64, "cpu"))
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zk.grad.double().cpu(), z64.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_and_empty_batch(reduction):
    C = 5
    for N in (0, 3):
        z = torch.randn(N, C)
        y = torch.full((N,), -100, dtype=torch.long)
        zk = z.to(DEVICE).requires_grad_()
        got = LF.adjusted_cross_entropy(zk, y.to(DEVICE), reduction=reduction, backend="triton")
        want = torch.nn.functional.cross_entropy(z, y, reduction=reduction)
        torch.testing.assert_close(got.cpu(), want, equal_nan=True)
        got.sum().backward()
        # 'mean' too: 1 / sum w is inf, yet every row is ignored, so torch's gradient is 0, not NaN
        assert (zk.grad == 0).all()


@pytest.mark.parametrize("config", [None, dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3)],
                         ids=["single_tile", "tiles", "split"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_all_rows_ignored_mean_gives_zero_gradients(config, grad_in_forward):
    """Every path that scales 'mean''s row factors by 1 / sum w (inf here): in the row kernel, the combine of split
    rows, the fused reduction, and with weights and GCL's flags."""
    gen = torch.Generator().manual_seed(33)
    N, C = 4, 40
    cv = class_vectors(C, gen)
    z, _ = _inputs(N, C, torch.float32, gen)
    y = torch.full((N,), -100)
    leaf = z.to(DEVICE).requires_grad_()
    zin = leaf * 1.0 if grad_in_forward else leaf
    loss = _call_kernel(zin, y.to(DEVICE), _flags("all", cv, 5), "mean", grad_in_forward, config)
    assert torch.isnan(loss).item()
    loss.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_custom_ignore_index_and_int32_targets():
    gen = torch.Generator().manual_seed(8)
    z, y = _inputs(9, 12, torch.float32, gen, ignore_rows=())
    y[[2, 5]] = 3  # ignore class 3 rows
    zk = z.to(DEVICE).requires_grad_()
    got = LF.adjusted_cross_entropy(zk, y.to(DEVICE, torch.int32), ignore_index=3, backend="triton")
    want = torch.nn.functional.cross_entropy(z, y, ignore_index=3)
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=1e-5)


def test_deterministic_for_a_seed_and_noise_follows_manual_seed():
    gen = torch.Generator().manual_seed(9)
    C = 40
    cv = class_vectors(C, gen)
    z, y = _inputs(8, C, torch.float32, gen)
    zk, yk = z.to(DEVICE), y.to(DEVICE)
    kw = to_device(dict(cloud=cv["cloud"], noise_mul=1.0, margin=0.5, scale=30.0))
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        zz = zk.clone().requires_grad_()
        loss = LF.adjusted_cross_entropy(zz, yk, backend="triton", reduction="none", **kw)
        loss.sum().backward()
        outs.append((loss.detach().clone(), zz.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.manual_seed(1234)
    ref = R.adjusted_cross_entropy(z, y, reduction="none", **to_device(kw, None, "cpu"))
    torch.testing.assert_close(outs[0][0].cpu(), ref, atol=1e-4, rtol=1e-5)
    other = LF.adjusted_cross_entropy(zk, yk, backend="triton", reduction="none", seed=77, **kw)
    assert not torch.allclose(other, outs[0][0])


def test_kernel_noise_equals_reference_noise_elementwise():
    """The noise tile the loss kernels use, written out, equals fastlt.noise bit for bit (one table of levels: no
    transcendental function whose rounding could differ between the GPU, the interpreter and torch)."""
    from fastlt.noise import gcl_noise

    for seed, N, C in [(0, 3, 5), (12345, 7, 67), (2**40 + 3, 5, 130), (2**61 + 17, 2, 33)]:
        out = gcl_noise_kernel(seed, N, C, DEVICE)
        ref = gcl_noise(seed, N, C)
        assert torch.equal(out.cpu(), ref)
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("config,grad_in_forward", [(None, False), (None, True),
                                                    (dict(block_n=16, num_splits=3), False),
                                                    (dict(block_n=16, num_splits=1, row_programs=2), True)],
                         ids=["default", "grad_in_forward", "split", "persistent"])
def test_seed_tensor_gives_the_int_seeds_noise(config, grad_in_forward):
    """A seed given as a one-element int64 tensor on the logits' device (read by the kernels from memory, so a CUDA
    graph replays the read) gives exactly the noise of the same int seed, forward and backward; the reference
    path takes it too."""
    gen = torch.Generator().manual_seed(31)
    N, C = 5, 67
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, torch.float32, gen)
    seed = 2**45 + 987
    outs = []
    for s in (seed, torch.tensor([seed], device=DEVICE), torch.tensor(seed, device=DEVICE)):
        kw = to_device(dict(cloud=cv["cloud"], noise_mul=1.0, margin=0.5, scale=30.0))
        leaf = z.to(DEVICE).clone().requires_grad_()
        zin = leaf * 1.0
        loss = _call_kernel(zin, y.to(DEVICE), {**kw, "seed": s}, "none", grad_in_forward, config)
        loss.sum().backward()
        outs.append((loss.detach(), leaf.grad))
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])
    ref_kw = to_device(dict(cloud=cv["cloud"], noise_mul=1.0, margin=0.5, scale=30.0), None, "cpu")
    ref_int = R.adjusted_cross_entropy(z, y, reduction="none", seed=seed, **ref_kw)
    ref_t = R.adjusted_cross_entropy(z, y, reduction="none", seed=torch.tensor([seed]), **ref_kw)
    assert torch.equal(ref_int, ref_t)
    torch.testing.assert_close(outs[0][0].cpu(), ref_int, atol=1e-4, rtol=1e-5)
