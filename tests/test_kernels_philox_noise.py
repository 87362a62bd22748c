"""The kernels' noise draws (``fastlt.kernels.philox_noise``): a word's two levels and their lookups, on every
16-bit half, and the one-element draws against the tile's, bit for bit against ``fastlt.noise``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from fastlt import noise as NZ
from fastlt.kernels import philox_noise as PN
from fastlt.kernels.philox_noise import _levels, gcl_noise_at, gcl_noise_kernel, gcl_noise_tile, load_noise_table
from fastlt.noise import gcl_noise, noise_table


@triton.jit
def _philox_words(c0_ptr, c1_ptr, out_ptr, seed, n, ROUNDS: tl.constexpr, OURS: tl.constexpr, WIDE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The four words of Philox4x32-ROUNDS of counters (c0, c1, 0, 0): fastlt's (OURS; WIDE its products' form) or
    ``tl.randint4x``'s."""
    i = tl.arange(0, BLOCK)
    c0 = tl.load(c0_ptr + i, mask=i < n, other=0)
    c1 = tl.load(c1_ptr + i, mask=i < n, other=0)
    if OURS:
        w0, w1, w2, w3 = PN.philox4x32(seed, c0.to(tl.uint32), c1.to(tl.uint32), ROUNDS, WIDE)
    else:
        w0, w1, w2, w3 = tl.randint4x(seed, (c1 << 32) | c0, ROUNDS)
    tl.store(out_ptr + i, w0.to(tl.int64) & 0xFFFFFFFF, mask=i < n)
    tl.store(out_ptr + n + i, w1.to(tl.int64) & 0xFFFFFFFF, mask=i < n)
    tl.store(out_ptr + 2 * n + i, w2.to(tl.int64) & 0xFFFFFFFF, mask=i < n)
    tl.store(out_ptr + 3 * n + i, w3.to(tl.int64) & 0xFFFFFFFF, mask=i < n)


def _words(seed, c0, c1, rounds, ours, wide=False):
    n = c0.numel()
    out = torch.empty(4 * n, dtype=torch.int64, device=DEVICE)
    _philox_words[(1,)](c0.to(DEVICE), c1.to(DEVICE), out, seed, n, ROUNDS=rounds, OURS=ours, WIDE=wide, BLOCK=64)
    return out.view(4, n).cpu()


@pytest.mark.parametrize("rounds", [1, 2, 3, 7, 10])
def test_philox_is_tritons_philox(rounds):
    """The kernels' Philox (either form of its products) gives ``tl.randint4x``'s words, bit for bit, at 1, 2, 3, 7
    and 10 rounds, on counters with their top bit set and seeds up to 2^64 - 1; at 10 rounds, Random123's known
    answer."""
    gen = torch.Generator().manual_seed(rounds)
    c0 = torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64)
    c1 = torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64)
    c0[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    c1[:3] = torch.tensor([0, 0, 2**31 - 1])
    for seed in (0, 12345, 2**40 + 9, 2**62 - 1, 2**64 - 1):
        ours = _words(seed, c0, c1, rounds, True, wide=True)
        assert torch.equal(ours, _words(seed, c0, c1, rounds, False))
        assert torch.equal(ours, _words(seed, c0, c1, rounds, True, wide=False))
        assert torch.equal(ours, torch.stack(NZ.philox4x32(seed, c0, c1, rounds)))
        if rounds == 10 and seed == 0:
            assert ours[:, 0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@triton.jit
def _levels_of_words(w_ptr, table_ptr, low_ptr, high_ptr, n, BLOCK: tl.constexpr):
    """The noise of each word's two halves, looked up as the tiles do (the table held by the program, tl.gather)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + i, mask=i < n, other=0).to(tl.uint32, bitcast=True)
    table = load_noise_table(table_ptr)
    low, high = _levels(w)
    tl.store(low_ptr + i, tl.gather(table, low, 0), mask=i < n)
    tl.store(high_ptr + i, tl.gather(table, high, 0), mask=i < n)


def test_every_half_looks_up_its_level():
    """Level k of a half h is its bits 2 to 12 (fastlt.noise's docstring, written out here)."""
    h = torch.arange(65536, dtype=torch.int64)
    w = torch.cat([h + (17 << 16), 3 + (h << 16)])  # every low half, every high half
    n = w.numel()
    as_int32 = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).to(DEVICE)
    low = torch.empty(n, device=DEVICE)
    high = torch.empty(n, device=DEVICE)
    _levels_of_words[(triton.cdiv(n, 1024),)](as_int32, noise_table(DEVICE), low, high, n, BLOCK=1024)
    table = noise_table()
    assert torch.equal(low.cpu(), table[((w & 0xFFFF) >> 2) & 2047])
    assert torch.equal(high.cpu(), table[((w >> 16) >> 2) & 2047])


@triton.jit
def _noise_at_kernel(rows_ptr, cols_ptr, out_ptr, seed, table_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + i, mask=i < n, other=0)
    cols = tl.load(cols_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, gcl_noise_at(seed, table_ptr, rows, cols), mask=i < n)


def test_noise_at_one_column_per_row_equals_the_tile_noise():
    """The target logit's noise (one gathered element per row) is the tile's noise at that element, and
    fastlt.noise's, bit for bit."""
    seed, N, C = 2**40 + 9, 9, 203
    tile = gcl_noise_kernel(seed, N, C, DEVICE).cpu()
    assert torch.equal(tile, gcl_noise(seed, N, C))
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, N, (64,), generator=gen)
    cols = torch.randint(0, C, (64,), generator=gen)
    cols[:8] = torch.arange(8)  # every position inside a Philox group
    out = torch.empty(64, device=DEVICE)
    _noise_at_kernel[(1,)](rows.to(DEVICE), cols.to(DEVICE), out, seed, noise_table(DEVICE), 64, BLOCK=64)
    assert torch.equal(out.cpu(), tile[rows, cols])


@triton.jit
def _tile_kernel(out_ptr, seed, table_ptr, row0, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SHIFT: tl.constexpr):
    i = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(out_ptr + i, gcl_noise_tile(seed, load_noise_table(table_ptr), row0 + tl.arange(0, BLOCK_M), col_start,
                                         BLOCK_M, BLOCK_N, SHIFT))


@pytest.mark.parametrize("shift", range(8))
def test_a_tile_starting_off_a_multiple_of_8_draws_the_same_noise(shift):
    """A class shard's tile that starts ``shift`` columns past a multiple of 8 (two Philox calls per 8 columns)
    draws fastlt.noise's numbers there, bit for bit: every column position against every shift, the calls of
    both groups (their last column and the next's first); with the next shift instead, most numbers differ."""
    seed, row0, BM, BN = 2**40 + 9, 5, 2, 32
    col_start = 48 + shift
    want = gcl_noise(seed, row0 + BM, col_start + BN)[row0:, col_start:]
    out = torch.empty((BM, BN), device=DEVICE)
    _tile_kernel[(1,)](out, seed, noise_table(DEVICE), row0, col_start, BLOCK_M=BM, BLOCK_N=BN, SHIFT=shift)
    assert torch.equal(out.cpu(), want)
    _tile_kernel[(1,)](out, seed, noise_table(DEVICE), row0, col_start, BLOCK_M=BM, BLOCK_N=BN, SHIFT=(shift + 1) % 8)
    assert (out.cpu() == want).float().mean() < 0.5


def test_first_gpu_use_inside_graph_capture_is_refused(monkeypatch):
    """The table's first copy to a GPU cannot be captured in a CUDA graph: a clear error, not a capture failure."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 7)
    monkeypatch.delitem(NZ._TABLES, torch.device("cuda", 7), raising=False)
    with pytest.raises(RuntimeError, match="run one step"):
        NZ.noise_table("cuda")
    assert NZ.noise_table("cpu") is NZ.noise_table(torch.device("cpu"))  # one table per device


def test_table_is_made_on_the_cpu_whatever_the_default_device():
    """The table is computed on the CPU even when a default device is set before fastlt is imported (it was made on
    that device: the CPU table lived on 'meta' and gcl_noise(..., 'cpu') returned a meta tensor)."""
    code = ("import torch; torch.set_default_device('meta'); import fastlt.noise as NZ; "
            "t = NZ.noise_table('cpu'); e = NZ.gcl_noise(3, 2, 8, 'cpu'); "
            "assert t.device.type == 'cpu' and e.device.type == 'cpu', (t.device, e.device); "
            "assert 0.0 < float(t[0]) < float(t[-7]) < 1.0 == float(t[-1])")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reference_noise_is_captured_in_a_cuda_graph_after_a_first_call():
    """After one call on the GPU (the table's copy), fastlt.noise.gcl_noise makes no host copy: it can be captured
    in a CUDA graph, whose replays draw the seed tensor's noise."""
    seed = torch.tensor(5, dtype=torch.int64, device="cuda")
    want = gcl_noise(5, 3, 21, "cuda", col_offset=3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gcl_noise(seed, 3, 21, "cuda", col_offset=3)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gcl_noise(seed, 3, 21, "cuda", col_offset=3)
    seed.fill_(6)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), gcl_noise(6, 3, 21, col_offset=3)) and not torch.equal(out, want)
