"""fastlt.noise: the counter-based Philox generator and GCL's clipped half-normal noise, read from a table of 2048
equally likely levels."""

from __future__ import annotations

import math
import os
import shutil
import struct

import pytest
import torch
import torch.nn.functional as F

from fastlt import noise as NZ
from fastlt import reference as R

M32 = 0xFFFFFFFF


def philox_py(seed: int, c0: int, c1: int, c2: int = 0, c3: int = 0, rounds: int = 10):
    """Philox4x32-R written from the Random123 paper with Python ints (independent of fastlt)."""
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def erfinv_py(u: float) -> float:
    """erfinv(u) for u in (0, 1) by bisection on math.erf in float64 (independent of torch.erfinv)."""
    lo, hi = 0.0, 8.0
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            return lo if abs(math.erf(lo) - u) <= abs(math.erf(hi) - u) else hi
        if math.erf(mid) < u:
            lo = mid
        else:
            hi = mid


def float32_py(x: float) -> float:
    """``x`` rounded to the nearest float32 (C's double -> float conversion), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# T[k] = min(sqrt(2) erfinv((k + 1/2) / 2048) / 3, 1), float64 rounded to float32: the module docstring's step 3
TABLE_PY = [float32_py(min(math.sqrt(2.0) * erfinv_py((k + 0.5) / 2048) / 3, 1.0)) for k in range(2048)]


def noise_py(seed: int, i: int, j: int) -> float:
    """Element (i, j) of GCL's noise from the module docstring's steps, with Python ints: Philox4x32-7 of counter
    (j // 8, i, 0, 0); word (j % 8) // 2, its low 16-bit half for even j and its high half for odd j; the level
    k = (h >> 2) & 2047 of that half h; the element TABLE_PY[k]."""
    w = philox_py(seed, j // 8, i, rounds=7)[(j % 8) // 2]
    h = (w >> 16) if j % 2 else (w & 0xFFFF)
    return TABLE_PY[(h >> 2) & 2047]


def test_philox_known_answer():
    """Random123 known-answer vector: philox4x32-10, counter 0, key 0."""
    assert philox_py(0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    out = NZ.philox4x32(0, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    assert tuple(int(o[0]) for o in out) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


def test_philox_matches_python_implementation():
    g = torch.Generator().manual_seed(0)
    seeds = [0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 17, 2**62 - 1, 2**64 - 1]
    c0 = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64)
    c1 = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64)
    c0[:3] = torch.tensor([0, M32, 2**31])
    c1[:3] = torch.tensor([M32, 0, 2**31 - 1])
    for seed in seeds:
        got = NZ.philox4x32(seed, c0, c1)
        for k in range(64):
            exp = philox_py(seed, int(c0[k]), int(c1[k]))
            assert tuple(int(w[k]) for w in got) == exp, (seed, k)


def test_noise_constants():
    assert (NZ.NOISE_LEVELS, NZ.LEVEL_SHIFT, NZ.ELEMENTS_PER_CALL, NZ.NOISE_ROUNDS) == (2048, 2, 8, 7)


@pytest.mark.parametrize("seed, n_rows, n_cols, row_offset, col_offset", [
    (0, 6, 11, 0, 0),
    (7, 3, 19, 0, 5),  # a column offset off the groups of 8: the first group sliced
    (2**33 + 5, 5, 13, 3, 8 * 1000 + 3),
    (2**62 - 1, 2, 17, 2**32 - 2, 2**31 + 7),  # the last noise rows, a far column
])
def test_gcl_noise_elements_match_python_implementation(seed, n_rows, n_cols, row_offset, col_offset):
    """Every element, bit for bit, against the module docstring's steps written with Python ints (noise_py)."""
    e = NZ.gcl_noise(seed, n_rows, n_cols, row_offset=row_offset, col_offset=col_offset)
    assert e.shape == (n_rows, n_cols) and e.dtype == torch.float32
    want = torch.tensor([[noise_py(seed, row_offset + i, col_offset + j) for j in range(n_cols)]
                         for i in range(n_rows)], dtype=torch.float32)
    assert torch.equal(e, want), (e - want).abs().max()
    # a 0-dim int64 tensor seed (a seed drawn in a compiled graph) gives the same noise
    assert torch.equal(NZ.gcl_noise(torch.tensor(seed, dtype=torch.int64), n_rows, n_cols, row_offset=row_offset,
                                    col_offset=col_offset), e)


def test_gcl_noise_levels_from_philox_words():
    """A larger draw (48 x 200, offsets) against the levels taken from philox4x32's words with torch ops: column j
    reads half j % 2 of word (j % 8) // 2 of call j // 8, its bits 2 .. 12 index the table."""
    rows, cols, r0, c0 = 48, 200, 12345, 8 * 77 + 6
    e = NZ.gcl_noise(424242, rows, cols, row_offset=r0, col_offset=c0)
    j = torch.arange(c0, c0 + cols, dtype=torch.int64)
    i = torch.arange(r0, r0 + rows, dtype=torch.int64)[:, None]
    words = torch.stack(NZ.philox4x32(424242, (j // 8)[None, :], i, rounds=7))  # (4, rows, cols)
    w = words.gather(0, ((j % 8) // 2).expand(1, rows, cols))[0]
    h = torch.where(j % 2 == 1, w >> 16, w & 0xFFFF)
    k = (h >> 2) & 2047
    assert torch.equal(e, torch.tensor(TABLE_PY, dtype=torch.float32)[k])
    assert torch.isin(e, NZ.noise_table()).all()


def test_noise_table_values():
    """T[k] = min(sqrt(2) erfinv((k + 1/2) / 2048) / 3, 1) in float64 rounded to float32, against erfinv by bisection
    on math.erf (exactly) and torch.special.ndtri (Phi^-1((1 + u) / 2) / 3 = sqrt(2) erfinv(u) / 3, to 1e-12
    before rounding); strictly increasing below the clip, the 6 top levels exactly 1."""
    t = NZ.noise_table()
    assert t.dtype == torch.float32 and t.shape == (2048,) and t.device.type == "cpu"
    assert t.tolist() == TABLE_PY
    u = (torch.arange(2048, dtype=torch.float64) + 0.5) / 2048
    ndtri = torch.special.ndtri((1 + u) / 2) / 3
    body = ndtri < 1
    torch.testing.assert_close(t.double()[body], ndtri[body], rtol=2**-24, atol=0)  # float32 rounding only
    assert torch.equal(t, ndtri.clamp(max=1.0).to(torch.float32))
    assert int((t == 1.0).sum()) == 6 and torch.equal(t[-6:], torch.ones(6))
    below = t[:-6]
    assert (below[1:] > below[:-1]).all() and below[-1].item() < 1.0 and below[0].item() > 0.0
    # the clip's levels: the slices whose middle lies beyond P(|X| <= 1) = erf(3 / sqrt 2), X ~ N(0, 1/9)
    assert sum((k + 0.5) / 2048 >= math.erf(3 / math.sqrt(2)) for k in range(2048)) == 6


def test_noise_table_is_one_tensor_per_device():
    a = NZ.noise_table("cpu")
    assert a is NZ.noise_table("cpu") is NZ.noise_table(torch.device("cpu"))
    assert a.dtype == torch.float32 and a.device == torch.device("cpu") and a.shape == (2048,)
    with torch.device("cpu"):
        assert NZ.noise_table() is a  # None: torch's default device
    assert NZ.gcl_noise(5, 3, 4).dtype == torch.float32 and NZ.noise_table("cpu") is a


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_noise_table_on_the_gpu_is_the_cpu_table():
    dev = torch.device("cuda", torch.cuda.current_device())
    t = NZ.noise_table(dev)
    assert t is NZ.noise_table("cuda") is NZ.noise_table(dev)
    assert t.device == dev and torch.equal(t.cpu(), NZ.noise_table("cpu"))
    assert torch.equal(NZ.gcl_noise(9, 5, 21, dev, col_offset=3).cpu(), NZ.gcl_noise(9, 5, 21, col_offset=3))


def many(fn, seed0: int) -> torch.Tensor:
    """2^18 draws as four (256, 256) blocks (small blocks: fast on a loaded 2-core machine)."""
    return torch.cat([fn(seed0 + k, 256, 256).flatten() for k in range(4)])


def clipped_half_normal_mean(sigma: float = 1 / 3) -> float:
    """E[min(|X|, 1)], X ~ N(0, sigma^2)."""
    p_clip = 1 - math.erf(1 / (sigma * math.sqrt(2)))
    body = 2 * sigma / math.sqrt(2 * math.pi) * (1 - math.exp(-1 / (2 * sigma**2)))
    return body + p_clip


def test_gcl_noise_distribution():
    e = many(NZ.gcl_noise, 7)
    assert e.dtype == torch.float32
    assert e.min().item() >= 0.0 and e.max().item() <= 1.0
    e = e.double()
    n = e.numel()
    assert abs(e.mean().item() - clipped_half_normal_mean()) < 5 * e.std().item() / math.sqrt(n)
    p_clip = 6 / 2048  # the table's 6 levels at the clip (the continuous P(|X| > 1) = 1 - erf(3 / sqrt 2) = 0.0027)
    rate = (e == 1.0).double().mean().item()
    assert abs(rate - p_clip) < 5 * math.sqrt(p_clip / n)
    # the unclipped part is |N(0, 1/9)|: median of |X| is 0.6745 / 3
    assert abs(e.median().item() - 0.67449 / 3) < 0.005


def test_element_depends_only_on_seed_row_col():
    fn = NZ.gcl_noise
    small = fn(31, 5, 9)
    big = fn(31, 7, 13)
    assert small.shape == (5, 9) and big.shape == (7, 13)
    assert torch.equal(small, big[:5, :9])
    wide = fn(31, 2, 1001)
    assert torch.equal(wide[:, :13], big[:2])
    assert torch.equal(fn(31, 7, 13), big)  # deterministic
    for c0 in (1, 3, 7, 8, 9):  # column windows, on and off the groups of 8
        assert torch.equal(fn(31, 7, 13 - c0, col_offset=c0), big[:, c0:])


def test_different_seeds_differ():
    seeds = [0, 1, 2, 2**32, 2**32 + 1, 2**61 + 3]
    draws = [NZ.gcl_noise(s, 16, 16) for s in seeds]
    for a in range(len(seeds)):
        for b in range(a + 1, len(seeds)):
            # independent draws agree with probability sum_k P(level k)^2 ~ 1/2048
            assert (draws[a] == draws[b]).double().mean().item() < 0.05, (seeds[a], seeds[b])
    # and rows / column groups / the two halves of a word are not copies of each other
    z = NZ.gcl_noise(3, 8, 16)
    assert not torch.equal(z[0], z[1])
    assert not torch.equal(z[:, :4], z[:, 4:8])
    assert not torch.equal(z[:, :8], z[:, 8:16])
    assert not torch.equal(z[:, 0::2], z[:, 1::2])


def test_degenerate_shapes():
    assert NZ.gcl_noise(1, 0, 5).shape == (0, 5)
    assert NZ.gcl_noise(1, 3, 1).shape == (3, 1)
    assert NZ.gcl_noise(1, 3, 0).shape == (3, 0)
    assert NZ.gcl_noise(1, 3, 0, col_offset=5).shape == (3, 0)
    assert NZ.gcl_noise(1, 2, 1, col_offset=13).shape == (2, 1)


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(123)
    a = [NZ.draw_seed() for _ in range(3)]
    torch.manual_seed(123)
    b = [NZ.draw_seed() for _ in range(3)]
    assert a == b
    assert len(set(a)) == 3
    assert all(isinstance(s, int) and 0 <= s < 2**62 for s in a)
    torch.manual_seed(124)
    assert NZ.draw_seed() != a[0]


def test_draw_seed_is_torch_randint_of_62_bits():
    """The definition the seeds keep: torch.randint(0, 2**62, ()) from the same generator state (the draw masks an
    argument-free random_() to 62 bits instead, for host time)."""
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    drawn = [NZ.draw_seed(g1) for _ in range(2000)]
    want = [int(torch.randint(0, 2**62, (), generator=g2)) for _ in range(2000)]
    assert drawn == want
    assert max(drawn) >= 2**61  # the top bit of the 62 is used


def test_draw_seed_with_generator():
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    s1 = NZ.draw_seed(g1)
    torch.manual_seed(1)  # the global generator must not matter
    s2 = NZ.draw_seed(g2)
    assert s1 == s2
    assert NZ.draw_seed(g1) != s1


def gcl_dense(cos, y, counts, noise, m, s, noise_mul):
    n = counts.double()
    delta = n.log().max() - n.log()
    c = cos - noise_mul * noise.double() * delta / delta.max()
    c = c.clone()
    c[torch.arange(cos.shape[0]), y] -= m
    return F.cross_entropy(s * c, y, reduction="none")


def test_reference_gcl_seed_uses_gcl_noise():
    g = torch.Generator().manual_seed(8)
    N, C = 21, 14
    cos = torch.rand(N, C, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, C, (N,), generator=g)
    counts = torch.randint(1, 1000, (C,), generator=g)
    n = counts.double()
    cloud = (n.log().max() - n.log()) / (n.log().max() - n.log()).max()
    for seed in (0, 42, 2**45 + 1):
        got = R.gcl_cross_entropy(cos, y, cloud, 0.5, 30.0, 1.0, seed=seed, reduction="none")
        explicit = R.gcl_cross_entropy(cos, y, cloud, 0.5, 30.0, 1.0, noise=NZ.gcl_noise(seed, N, C),
                                       reduction="none")
        assert torch.equal(got, explicit)
        dense = gcl_dense(cos, y, counts, NZ.gcl_noise(seed, N, C), 0.5, 30.0, 1.0)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    a = R.gcl_cross_entropy(cos, y, cloud, seed=1, reduction="none")
    b = R.gcl_cross_entropy(cos, y, cloud, seed=2, reduction="none")
    assert not torch.allclose(a, b)


def test_row_offset_selects_the_rows_of_a_larger_draw():
    """``row_offset``: rows ``row_offset ..`` of the noise (a data-parallel rank's rows, a chunk's)."""
    from fastlt.noise import gcl_noise

    whole = gcl_noise(77, 9, 13)
    assert torch.equal(gcl_noise(77, 4, 13, row_offset=5), whole[5:])
    assert torch.equal(gcl_noise(77, 2, 5, row_offset=3, col_offset=6), whole[3:5, 6:11])


def test_draw_seed_first_called_under_inference_mode():
    """The first seed a thread draws under inference_mode (a GCL evaluation before any training step): its reused
    draw tensor was made an inference tensor, and every later draw outside inference_mode raised 'Inplace update to
    inference tensor outside InferenceMode'. Run in a fresh thread (its own draw tensor)."""
    import threading

    out = {}

    def run():
        try:
            with torch.inference_mode():
                first = NZ.draw_seed()
            torch.manual_seed(5)
            out["seeds"] = (first, NZ.draw_seed())
        except Exception as exc:  # (reported to the test's thread)
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert "error" not in out, out.get("error")
    torch.manual_seed(5)
    assert out["seeds"][1] == NZ.draw_seed()


def test_noise_rows_stay_within_the_32_bit_row_word():
    """Noise rows are one 32-bit word of Philox's counter, which the kernels keep: rows at 2^32 and beyond wrapped
    there and not on the reference path (the backends' losses 0.8 apart at rows_per_rank = 2^32 - 2). Both refuse
    them now; the last row is fine."""
    from fastlt.distributed import noise_row_offset

    assert NZ.gcl_noise(3, 2, 8, row_offset=2**32 - 2).shape == (2, 8)
    with pytest.raises(ValueError, match="2\\^32"):
        NZ.gcl_noise(3, 2, 8, row_offset=2**32 - 1)
    with pytest.raises(ValueError, match="2\\^32"):
        NZ.gcl_noise(3, 2, 8, row_offset=-1)
    assert noise_row_offset(1, 4, 2**31) == 2**31
    with pytest.raises(ValueError, match="rows_per_rank.*2\\^32|2\\^32.*rows_per_rank"):
        noise_row_offset(1, 4, 2**32 - 2)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_the_reference_noise_under_inductor():
    """``torch.compile`` (inductor, CPU) of the reference GCL loss. With a seed: inductor miscompiled the noise's
    writes into strided views for one column group (other noise, the loss 32.3 for 36.5, silently); it is stacked
    there now. Without one: the drawn Python int made Dynamo trace numpy, and inductor's C++ did not build (XOR
    of floats); the seed is now ``torch.randint`` in the graph: fresh noise on every call. A seed that changes
    (``seed=step``) Dynamo traces as a symbol at its first change, which built no C++ either: it is a tensor of
    the graph now."""
    import torch._dynamo

    from fastlt.priors import gcl_cloud

    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 5, generator=gen).tanh(), torch.tensor([0, 1, 4])
    cloud = gcl_cloud([40, 20, 10, 5, 2])
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, seed: R.gcl_cross_entropy(a, y, cloud, seed=seed))
    for seed in (5, 6, None):
        got = compiled(z, seed)
        if seed is not None:
            torch.testing.assert_close(got, R.gcl_cross_entropy(z, y, cloud, seed=seed), rtol=1e-5, atol=1e-5)
        else:
            again = compiled(z, seed)
            assert torch.isfinite(got) and torch.isfinite(again) and got != again


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((-1, 1, 8), {}, ValueError, r"seed must be in \[0, 2\^63\)"),  # wrapped to a key near 2^64 before
    ((2**64, 1, 8), {}, ValueError, r"seed must be in \[0, 2\^63\)"),  # wrapped to 0 before
    ((1.9, 1, 8), {}, TypeError, "seed must be a non-negative int"),  # truncated to 1 before
    (("7", 1, 8), {}, TypeError, "seed must be a non-negative int"),
    ((torch.tensor(5, dtype=torch.int32), 1, 8), {}, TypeError, "one int64 value"),  # another stream before
    ((torch.tensor(5.0), 1, 8), {}, TypeError, "one int64 value"),
    ((1, -1, 5), {}, ValueError, "n_rows must be non-negative"),
    ((1, 2, -3), {}, ValueError, "n_cols must be non-negative"),  # an empty (2, 0) before
    ((1, 2.0, 3), {}, TypeError, "n_rows must be an int"),
    ((1, 2, 3), dict(col_offset=-1), ValueError, "col_offset must be non-negative"),
])
def test_gcl_noise_names_its_bad_arguments(args, kwargs, error, match):
    """The public noise function takes seeds as the losses do, and names a bad size or offset (it accepted several
    silently, or failed inside torch without naming one)."""
    with pytest.raises(error, match=match):
        NZ.gcl_noise(*args, **kwargs)
