"""fastlt.noise: the counter-based Philox normals and GCL's clipped half-normal noise."""

from __future__ import annotations

import math
import os
import shutil

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


def normal_py(seed: int, i: int, j: int) -> float:
    """Element (i, j): Philox4x32-7 of counter (j // 8, i, 0, 0); word k = (j % 8) // 2 gives Box-Muller's radius
    from the uniform (h_lo + 1/2) / 2^16 and its angle x = -51471 / 2^14 + h_hi fl32(2 pi) / 2^16; cos for even
    j % 8, sin for odd."""
    words = philox_py(seed, j // 8, i, rounds=7)
    q = j % 8
    w = words[q // 2]
    u1 = ((w & 0xFFFF) + 0.5) / 65536.0
    x = -51471 / 16384 + (w >> 16) * 6.2831854820251465 / 65536.0
    r = math.sqrt(-2.0 * math.log(u1))
    return r * math.cos(x) if q % 2 == 0 else r * math.sin(x)


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


def test_standard_normal_elements_match_python_implementation():
    seeds = [0, 7, 2**33 + 5]
    for seed in seeds:
        z = NZ.standard_normal(seed, 6, 11)
        for i in range(6):
            for j in range(11):
                assert abs(float(z[i, j]) - normal_py(seed, i, j)) < 1e-5, (seed, i, j)


def many(fn, seed0: int) -> torch.Tensor:
    """2^18 draws as four (256, 256) blocks (small blocks: fast on a loaded 2-core machine)."""
    return torch.cat([fn(seed0 + k, 256, 256).flatten() for k in range(4)])


def test_standard_normal_moments_and_cdf():
    z = many(NZ.standard_normal, 2024).double()
    n = z.numel()
    assert n == 4 * 256 * 256
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1.0) < 5 / math.sqrt(2 * n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)
    for t in (-2.0, -1.0, -0.3, 0.0, 0.5, 1.5, 2.5):
        phi = 0.5 * (1 + math.erf(t / math.sqrt(2)))
        emp = (z <= t).double().mean().item()
        assert abs(emp - phi) < 5 * math.sqrt(phi * (1 - phi) / n) + 1e-9, t


def test_standard_normal_neighbours_uncorrelated():
    z = NZ.standard_normal(99, 256, 256).double()
    tol = 5 / math.sqrt(256 * 255)
    for a, b in ((z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z[:, 0::4], z[:, 2::4]), (z[:, 0::4], z[:, 1::4])):
        corr = torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1].item()
        assert abs(corr) < tol
    # squares too: Box-Muller pairs share r but must be independent
    corr_sq = torch.corrcoef(torch.stack(((z[:, 0::4] ** 2).flatten(), (z[:, 1::4] ** 2).flatten())))[0, 1]
    assert abs(corr_sq.item()) < 5 / math.sqrt(256 * 64)


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
    p_clip = 1 - math.erf(3 / math.sqrt(2))  # P(|X| > 1), X ~ N(0, 1/9)
    rate = (e == 1.0).double().mean().item()
    assert abs(rate - p_clip) < 5 * math.sqrt(p_clip / n)
    # the unclipped part is |N(0, 1/9)|: median of |X| is 0.6745 / 3
    assert abs(e.median().item() - 0.67449 / 3) < 0.005


def test_gcl_noise_is_clipped_scaled_abs_of_standard_normal():
    g = NZ.standard_normal(11, 40, 37)
    e = NZ.gcl_noise(11, 40, 37)
    torch.testing.assert_close(e, torch.clamp(g.abs() / 3, max=1.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [NZ.standard_normal, NZ.gcl_noise])
def test_element_depends_only_on_seed_row_col(fn):
    small = fn(31, 5, 9)
    big = fn(31, 7, 13)
    assert small.shape == (5, 9) and big.shape == (7, 13)
    assert torch.equal(small, big[:5, :9])
    wide = fn(31, 2, 1001)
    assert torch.equal(wide[:, :13], big[:2])
    assert torch.equal(fn(31, 7, 13), big)  # deterministic


@pytest.mark.parametrize("fn", [NZ.standard_normal, NZ.gcl_noise])
def test_different_seeds_differ(fn):
    seeds = [0, 1, 2, 2**32, 2**32 + 1, 2**61 + 3]
    draws = [fn(s, 16, 16) for s in seeds]
    for a in range(len(seeds)):
        for b in range(a + 1, len(seeds)):
            assert (draws[a] == draws[b]).double().mean().item() < 0.05, (seeds[a], seeds[b])
    # and rows / column groups are not copies of each other
    z = NZ.standard_normal(3, 8, 16)
    assert not torch.equal(z[0], z[1])
    assert not torch.equal(z[:, :4], z[:, 4:8])


def test_degenerate_shapes():
    assert NZ.gcl_noise(1, 0, 5).shape == (0, 5)
    assert NZ.gcl_noise(1, 3, 1).shape == (3, 1)
    assert NZ.standard_normal(1, 3, 0).shape == (3, 0)


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
    from fastlt.noise import gcl_noise, standard_normal

    whole = gcl_noise(77, 9, 13)
    assert torch.equal(gcl_noise(77, 4, 13, row_offset=5), whole[5:])
    assert torch.equal(standard_normal(77, 2, 13, row_offset=3), standard_normal(77, 5, 13)[3:])


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
