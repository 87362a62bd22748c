"""GCL's Gaussian-cloud noise as a counter-based function of (seed, row, column).

Element (i, j) of the noise is ``e_ij = min(|g| / 3, 1)`` — the official
``|clamp(Normal(0, 1/3), -1, 1)|`` — where ``g`` is a standard normal made as follows, eight per
Philox call:

1. Philox4x32-7 (:data:`NOISE_ROUNDS` rounds) of counter ``(c0, c1, c2, c3) = (j // 8, i, 0, 0)`` under the
   64-bit seed split in (low, high) 32-bit key words: exactly Triton's
   ``tl.randint4x(seed, (i << 32) | (j // 8), 7)``.
2. Each 32-bit word ``w_k`` gives one Box-Muller pair from its 16-bit halves: the radius
   ``r = sqrt(-2 log u)`` of the uniform ``u = (h_lo + 1/2) / 2^16`` in (0, 1) (never 0: no clamp needed), the
   angle ``x = ANGLE_START + h_hi ANGLE_STEP``, a grid of 2^16 angles in (-pi, pi) a step ``fl32(2 pi) / 2^16``
   apart, computed exactly and rounded to float32; normals ``r cos(x)`` and ``r sin(x)``.
3. Column ``j`` takes normal ``q = j % 8`` of ``[c0, s0, c1, s1, c2, s2, c3, s3]``.

The angle's grid starts at ``-51471 / 2^14``, a multiple of 2^-14 within 4.5e-6 of ``-pi + pi / 2^16`` (the
centred grid ``2 pi (h + 1/2) / 2^16 - pi``, which the noise used before 2026-12-06), so that the kernels form
``x`` in one FMA of exact float32 constants (``fastlt.kernels.philox_noise._pair``); a seed's numbers moved by at
most ~7e-6 in ``e`` then (and the normals' signs flipped: ``x`` is the old angle minus pi); the law is the same.

Sixteen-bit uniforms bound |g| by 4.85 (the clip at 3 sigma makes the tail irrelevant) and halve the
Philox work per element, the dominant cost of generating noise on the GPU. The kernels compute the
same numbers on the GPU and under ``TRITON_INTERPRET=1``, to float32 rounding of log/cos/sin in the
interpreter and within ~1.5e-6 on the GPU (whose kernels take them from the special-function unit), not bit for
bit.

Seven rounds, not Random123's default ten: Salmon et al. ("Parallel random numbers: as easy as 1, 2, 3", SC11)
found Philox4x32 free of failures in TestU01's Crush and BigCrush from 7 rounds and ship 10 as a safety margin.
This noise's own tests (tests/test_noise_law.py: Kolmogorov-Smirnov against the clipped half-normal over 10^6
draws, correlations of neighbouring rows, columns, counters and seeds) fail at 5 rounds (neighbouring rows
correlate at ~0.05) and pass at 6 and 7; 7 saves 30% of the generator's integer work (GCL's statistics loop: 726
-> 689 SASS instructions per 16 elements a thread, sm_90). Changed on 2026-12-06: up to then the noise was
Philox4x32-10, so a seed now draws other numbers of the same law.

The seed is drawn from torch's default CPU generator (``draw_seed``), so ``torch.manual_seed`` makes
the noise repeatable, on every device.
"""

from __future__ import annotations

import threading

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_ROUNDS = 10  # Random123's Philox4x32-10 (its known-answer vectors); philox4x32's default
NOISE_ROUNDS = 7  # the GCL noise's Philox4x32-7 (see the module docstring); the kernels read it from here
SEED_BITS = 62
_SEED_MASK = 2**SEED_BITS - 1
ANGLE_STEP = 6.2831854820251465 / 65536.0  # float32's 2 pi over 2^16 (exact): the Box-Muller angle's step
ANGLE_START = -51471.0 / 16384.0  # the first angle, -pi + 5.2e-5 (a multiple of 2^-14: see the module docstring)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed in [0, 2^62) from torch's CPU generator (no GPU synchronisation).

    Args:
        generator: a CPU ``torch.Generator``; None uses torch's default CPU generator (``torch.manual_seed``).

    Returns:
        A Python int in [0, 2^62).
    """
    # torch.randint(0, 2**62, ()) is empty(()).random_(0, 2**62): the same numbers, into a reused 0-dim tensor (one
    # per thread), half the host time (a GCL step draws one). Both that and the argument-free random_() keep the low
    # bits of one 64-bit draw (62 and 63 of them), so the latter masked to 62 bits is again the same number, without
    # parsing two Python ints (~0.2 us of ~0.9; tests/test_noise.py compares them)
    # (read back through a numpy view of its memory: int(t) would be one more torch op, ~1/3 of the draw's host time)
    if not torch.compiler.is_compiling() and _functorch_level() is not None:  # its tensors are a transform's
        # wrappers, and under vmap one seed is not per sample
        raise ValueError("GCL's noise seed is drawn from torch's generator, which cannot be done inside a torch.func "
                         "transform (grad, vmap, ...): pass seed= (an int) to the loss")
    view = getattr(_DRAWS, "view", None)
    if view is None:
        with torch.inference_mode(False):  # a first draw under inference_mode: still a normal tensor, which later
            _DRAWS.t = torch.empty((), dtype=torch.int64)  # draws outside it may update in place
        view = _DRAWS.view = _DRAWS.t.numpy()
    _DRAWS.t.random_(generator=generator)
    return int(view) & _SEED_MASK


def graph_seed(seed, device: torch.device | str | None = None) -> torch.Tensor:
    """A call's noise seed (``seed=``) as a 0-dim int64 tensor of the graph ``torch.compile`` is tracing, on
    ``device``: None drawn there by ``torch.randint`` (no graph break, fresh noise on every call of the compiled
    graph; a drawn Python int made Dynamo trace numpy), an int made a tensor (as an int it is a constant of the
    graph, so a seed that changes every call compiled it again each time, and then a symbol whose bitwise ops
    inductor's C++ mistyped as float ones), a tensor as it is (``int()`` of it is a graph break)."""
    if seed is None:
        return torch.randint(0, 2**SEED_BITS, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(())
    return torch.full((), seed, dtype=torch.int64, device=device)


def call_seed(seed, device: torch.device | str | None = None):
    """The noise seed of a call given ``seed=``: ``int(seed)``; None draws one (:func:`draw_seed`). Under
    ``torch.compile`` :func:`graph_seed`."""
    if torch.compiler.is_compiling():
        return graph_seed(seed, device)
    if seed is not None:
        return int(seed)
    if torch.jit.is_tracing():
        raise RuntimeError("torch.jit.trace would record GCL's drawn noise seed as a constant (the same noise on every "
                           "call of the trace): use torch.compile or torch.export, which draw it in the graph, or "
                           "pass seed=")
    return draw_seed()


_DRAWS = threading.local()
_functorch_level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)


def _xor(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """``a ^ b``, in place in ``a`` (a tensor this module made) when the result keeps ``a``'s shape."""
    if isinstance(b, int) or b.shape == a.shape or torch.broadcast_shapes(a.shape, b.shape) == a.shape:
        return a.bitwise_xor_(b)
    return torch.bitwise_xor(a, b)


def philox4x32(seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor,
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 of counters (c0, c1, 0, 0) under the 64-bit ``seed``; int64 tensors in [0, 2^32).

    Each round's 32 x 32 -> 64-bit products are int64 multiplications, which wrap modulo 2^64 (two's complement):
    their bits are the unsigned product's, so the high word is ``(p >> 32) & 0xFFFFFFFF`` and the low word
    ``p & 0xFFFFFFFF`` (the same numbers as the kernels' ``umulhi``; tests/test_noise.py and
    tests/test_kernels_philox_noise.py compare them). In-place ops where the shapes allow. Under ``torch.compile``
    the products are taken by 16-bit halves instead (:func:`_mul_hi_lo`: the same bits, no product past 2^63).

    The counters broadcast: with ``c0`` a row (1, G) of column groups and ``c1`` a column (N, 1) of rows, the first
    round's words depend on the row alone or on the column alone, the second's on one of them or both, so the
    rounds work on vectors until the words become (N, G) matrices (in the third and fourth round): the same bits
    for ~2.5 fewer rounds of matrix work.

    Args:
        seed: the 64-bit key, split in (low, high) 32-bit key words; an int, or a 0-dim int64 tensor (a seed drawn
            inside a compiled graph: :func:`call_seed`).
        c0, c1: the first two counter words, int64 tensors of broadcastable shapes with values in [0, 2^32).
        rounds: the number of Philox rounds (10 for Philox4x32-10).

    Returns:
        The four output words ``(c0, c1, c2, c3)``, int64 tensors of the counters' broadcast shape (possibly
        expanded views, for fewer than 4 rounds) on their device, with values in [0, 2^32).
    """
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    shape = torch.broadcast_shapes(c0.shape, c1.shape)
    zero = torch.zeros((1,) * len(shape), dtype=torch.int64, device=c0.device)
    c2 = c3 = zero
    compiling = torch.compiler.is_compiling()
    for _ in range(rounds):
        if compiling:  # no int64 product past 2^63: see _mul_hi_lo
            (hi_b, lo_b), (hi_a, lo_a) = _mul_hi_lo(c2, _ROUND_B), _mul_hi_lo(c0, _ROUND_A)
        else:
            p_b = c2 * _ROUND_B
            p_a = c0 * _ROUND_A
            hi_b, lo_b = (p_b >> 32).bitwise_and_(_M32), p_b
            hi_a, lo_a = (p_a >> 32).bitwise_and_(_M32), p_a
        c0 = _xor(_xor(hi_b, c1), k0)
        c1 = lo_b.bitwise_and_(_M32)
        c2 = _xor(_xor(hi_a, c3), k1)
        c3 = lo_a.bitwise_and_(_M32)
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return tuple(w.expand(shape) for w in (c0, c1, c2, c3))


def _mul_hi_lo(c: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of ``c * m`` (``c`` in [0, 2^32), ``m`` a 32-bit constant), by 16-bit halves of
    ``m``, so that no int64 product passes 2^63 (every partial stays below 2^49). The eager path multiplies at once
    and lets int64 wrap, as torch's kernels do; compiled, inductor's C++ for a small (broadcast) tensor computes it
    as a signed overflow, undefined in C++, and its numbers differed (a one-column-group noise, silently)."""
    low = c * (m & 0xFFFF)  # A = c * m_lo < 2^48
    mid = c * (m >> 16) + (low >> 16)  # t = c * m_hi + (A >> 16) < 2^49; c * m = t * 2^16 + (A & 0xFFFF)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def _radius_and_angle(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller's radius and angle of a 32-bit word held in int64 (the module docstring's step 2: the low half's
    uniform ``(h + 1/2) / 2^16`` the radius, the high half the angle); its normals are ``r cos x`` and ``r sin x``."""
    u1 = (w & 0xFFFF).to(torch.float32).add_(0.5).mul_(1.0 / 65536.0)
    # the angle exactly in float64 (h * step has 40 bits), then rounded once: the kernels' float32 number
    x = (w >> 16).to(torch.float64).mul_(ANGLE_STEP).add_(ANGLE_START).to(torch.float32)
    return u1.log_().mul_(-2.0).sqrt_(), x


NORMALS_PER_CALL = 8


NOISE_ROWS = 2**32  # noise rows: one 32-bit word of Philox's counter (the kernels' too)


def check_noise_rows(first: int, n_rows: int, whose: str = "") -> None:
    """ValueError unless noise rows ``first .. first + n_rows - 1`` lie in [0, 2^32): one word of Philox's counter,
    which the kernels keep (they would wrap beyond it, the reference path would not). ``whose``: added to the
    message (where the rows come from)."""
    if first < 0 or first + n_rows > NOISE_ROWS:
        raise ValueError(f"noise rows {first} .. {first + n_rows - 1}{whose} leave [0, 2^32): GCL's noise rows are "
                         "one 32-bit word of Philox's counter")


def standard_normal(seed: int | torch.Tensor, n_rows: int, n_cols: int, device: torch.device | str | None = None, *,
                    row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """(n_rows, n_cols) float32 standard normals, element (i, j) a function of (seed, row_offset + i,
    col_offset + j) only.

    Args:
        seed: the 64-bit Philox key (e.g. from ``draw_seed``), or a 0-dim int64 tensor (:func:`call_seed`).
        n_rows, n_cols: the output shape (rows i, columns j).
        device: where to generate; None = torch's default device.
        row_offset: the global index of row 0 (a data-parallel rank's rows, a chunk of rows).
        col_offset: the global index of column 0 (a class-parallel rank's classes).

    Returns:
        (n_rows, n_cols) contiguous float32 tensor on ``device``.
    """
    check_noise_rows(row_offset, n_rows)
    first = col_offset // NORMALS_PER_CALL  # whole Philox groups of 8 columns, sliced below
    skip = col_offset - first * NORMALS_PER_CALL
    groups = (skip + n_cols + NORMALS_PER_CALL - 1) // NORMALS_PER_CALL
    c0 = torch.arange(first, first + groups, dtype=torch.int64, device=device)[None, :]  # broadcast: see philox4x32
    c1 = torch.arange(row_offset, row_offset + n_rows, dtype=torch.int64, device=device)[:, None]
    seed = graph_seed(seed, device) if torch.compiler.is_compiling() else seed
    seed = seed if isinstance(seed, torch.Tensor) else int(seed)
    words = philox4x32(seed, c0, c1, NOISE_ROUNDS)  # word k: normals 2k (r cos x) and 2k + 1 (r sin x)
    if torch.compiler.is_compiling():  # stacked: Dynamo does not trace out= into a strided view (a graph break)
        normals = [n for w in words for r, x in [_radius_and_angle(w)] for n in (r * torch.cos(x), r * torch.sin(x))]
        out = torch.stack(normals, dim=-1)
    else:
        out = torch.empty((n_rows, groups, NORMALS_PER_CALL), dtype=torch.float32, device=device)
        for k, w in enumerate(words):
            r, x = _radius_and_angle(w)
            torch.mul(r, torch.cos(x), out=out[:, :, 2 * k])
            torch.mul(r, x.sin_(), out=out[:, :, 2 * k + 1])
    return out.reshape(n_rows, groups * NORMALS_PER_CALL)[:, skip:skip + n_cols].contiguous()


def gcl_noise(seed: int | torch.Tensor, n_rows: int, n_cols: int, device: torch.device | str | None = None, *,
              row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """GCL noise ``e_ij = min(|g_ij| / 3, 1)`` (float32, (n_rows, n_cols)); a half-normal, sigma 1/3, clipped at 1.

    Args:
        seed: the 64-bit Philox key (e.g. from ``draw_seed``), or a 0-dim int64 tensor (:func:`call_seed`).
        n_rows, n_cols: the output shape (rows i, columns j).
        device: where to generate; None = torch's default device.
        row_offset: the global index of row 0 (rows ``row_offset .. row_offset + n_rows - 1`` of the noise).
        col_offset: the global index of column 0 (a class shard's columns).

    Returns:
        (n_rows, n_cols) float32 tensor on ``device``, values in [0, 1].
    """
    g = standard_normal(seed, n_rows, n_cols, device, row_offset=row_offset, col_offset=col_offset)
    return g.abs_().mul_(1.0 / 3.0).clamp_(max=1.0)  # in place: g is ours
