"""GCL's Gaussian-cloud noise as a counter-based function of (seed, row, column).

Element (i, j) of the noise follows the official ``|clamp(Normal(0, 1/3), -1, 1)|``, the clipped half-normal
``min(|g| / 3, 1)``, drawn by inverse CDF from a table of :data:`NOISE_LEVELS` = 2048 equally likely levels,
eight elements per Philox call:

1. Philox4x32-7 (:data:`NOISE_ROUNDS` rounds) of counter ``(c0, c1, c2, c3) = (j // 8, i, 0, 0)`` under the
   64-bit seed split in (low, high) 32-bit key words: exactly Triton's
   ``tl.randint4x(seed, (i << 32) | (j // 8), 7)``.
2. Column ``j`` takes the 16-bit half ``h`` of word ``(j % 8) // 2`` (the low half for even ``j``, the high half
   for odd ``j``) and its bits 2 to 12, the level ``k = (h >> 2) & 2047``.
3. ``e_ij = T[k]``, where ``T[k] = min(sqrt(2) erfinv((k + 1/2) / 2048) / 3, 1)``: the clipped half-normal's
   quantile at the middle of the k-th of 2048 equal slices of probability, computed in float64 and rounded to
   float32 (:func:`noise_table`).

The law is the clipped half-normal made discrete: 2048 atoms of mass 1/2048, each at its slice's middle quantile,
so its distribution function is never more than 1/4096 from the continuous one (a Kolmogorov-Smirnov test over
10^6 draws, tests/test_noise_law.py, cannot tell them apart: its critical value is 1.95e-3). The 6 top levels are
the clip's 1. Every path reads the same float32 table, so the kernels (on the GPU and under
``TRITON_INTERPRET=1``) and this module give bit for bit the same numbers.

Why a table (changed on 2026-12-07; until then each word gave a Box-Muller pair, ``r = sqrt(-2 log u)`` times
``cos`` and ``sin`` of an angle, from its two halves). Box-Muller costs a log, a square root, a sine and a cosine
per pair: on the GPU special-function-unit instructions plus ~10 FP32 and integer instructions an element, which
left GCL's bf16 statistics loop at 26.3 SASS instructions an element against LA's 11.1 and a bandwidth budget of
~20 (tools/kernel_report.py). A level is at most three (a shift, a mask, a shared-memory load: the kernels keep
the table in registers and ``tl.gather`` it through shared memory): 20.0 an element (triton 3.9; 20.8 with 3.6).
On the CPU the gather replaces four transcendental passes over the output. 2048 levels, not more: the kernels
hold the table in registers (16 per thread at 128 threads) and shared memory (8 KB); 1024 would move the law by
1/2048, within sampling error of 10^6 draws only just. A seed draws other numbers than before, of the same law.

Seven rounds, not Random123's default ten: Salmon et al. ("Parallel random numbers: as easy as 1, 2, 3", SC11)
found Philox4x32 free of failures in TestU01's Crush and BigCrush from 7 rounds and ship 10 as a safety margin.
This noise's own tests (tests/test_noise_law.py: Kolmogorov-Smirnov against the clipped half-normal over 10^6
draws, the levels' frequencies, correlations of neighbouring rows, columns, counters and seeds) fail at 5 rounds
(neighbouring rows correlate at ~0.05) and pass at 6 and 7; 7 saves 30% of the generator's integer work. Changed
on 2026-12-06: up to then the noise was Philox4x32-10.

The seed is drawn from torch's default CPU generator (``draw_seed``), so ``torch.manual_seed`` makes
the noise repeatable, on every device.
"""

from __future__ import annotations

import threading

import torch

from ._validation import check_seed, is_int

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_ROUNDS = 10  # Random123's Philox4x32-10 (its known-answer vectors); philox4x32's default
NOISE_ROUNDS = 7  # the GCL noise's Philox4x32-7 (see the module docstring); the kernels read it from here
SEED_BITS = 62
_SEED_MASK = 2**SEED_BITS - 1
NOISE_LEVELS = 2048  # the table's levels (see the module docstring); a level is 11 bits of a 16-bit half
LEVEL_SHIFT = 2  # a half's level is its bits 2 .. 12: (h >> LEVEL_SHIFT) & (NOISE_LEVELS - 1)


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
    ``p & 0xFFFFFFFF`` (the same numbers as the kernels' products: ``umulhi`` and a 32-bit multiply for fp32 rows,
    one 64-bit multiply for 16-bit rows; tests/test_noise.py and tests/test_kernels_philox_noise.py compare them).
    In-place ops where the shapes allow. Under ``torch.compile`` the products are taken by 16-bit halves instead
    (:func:`_mul_hi_lo`: the same bits, no product past 2^63).

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


ELEMENTS_PER_CALL = 8  # noise elements per Philox call: four words, two 16-bit halves each


NOISE_ROWS = 2**32  # noise rows: one 32-bit word of Philox's counter (the kernels' too)


def check_noise_rows(first: int, n_rows: int, whose: str = "") -> None:
    """ValueError unless noise rows ``first .. first + n_rows - 1`` lie in [0, 2^32): one word of Philox's counter,
    which the kernels keep (they would wrap beyond it, the reference path would not). ``whose``: added to the
    message (where the rows come from)."""
    if first < 0 or first + n_rows > NOISE_ROWS:
        raise ValueError(f"noise rows {first} .. {first + n_rows - 1}{whose} leave [0, 2^32): GCL's noise rows are "
                         "one 32-bit word of Philox's counter")


def _table_values() -> torch.Tensor:
    """The :data:`NOISE_LEVELS` levels ``min(sqrt(2) erfinv((k + 1/2) / K) / 3, 1)``, float64 rounded to float32."""
    u = (torch.arange(NOISE_LEVELS, dtype=torch.float64, device="cpu") + 0.5) / NOISE_LEVELS  # whatever the default
    return (torch.erfinv(u) * (2.0 ** 0.5 / 3.0)).clamp_(max=1.0).to(torch.float32)


_TABLES = {torch.device("cpu"): _table_values()}


def noise_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The noise's (NOISE_LEVELS,) float32 table of levels (the module docstring's step 3) on ``device``: one
    tensor per device, made on first use by copying the CPU table (never computed on the device, whose erfinv
    could round differently). Not to be written to.

    Raises:
        RuntimeError: the first use on a CUDA device is inside CUDA graph capture (the copy cannot be captured):
            run one step before capturing.
    """
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    table = _TABLES.get(dev)
    if table is None:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("GCL's noise table is copied to a GPU on its first use there, which cannot happen "
                               "during CUDA graph capture: run one step (or fastlt.noise.noise_table(device)) before "
                               "capturing")
        table = _TABLES[dev] = _TABLES[torch.device("cpu")].to(dev)
    return table


def _check_noise_args(seed, n_rows, n_cols, row_offset, col_offset) -> None:
    """:func:`gcl_noise`'s arguments, named: a seed as the losses take it (:func:`fastlt._validation.check_seed`: an
    int32 tensor gave another stream, a negative int wrapped to a key near 2^64), non-negative int sizes and column
    offset (the rows' range is :func:`check_noise_rows`')."""
    check_seed("seed", seed)
    for name, value in (("n_rows", n_rows), ("n_cols", n_cols), ("row_offset", row_offset),
                        ("col_offset", col_offset)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < 0 and name != "row_offset":  # (the rows' range: check_noise_rows)
            raise ValueError(f"{name} must be non-negative, got {value}")


def gcl_noise(seed: int | torch.Tensor, n_rows: int, n_cols: int, device: torch.device | str | None = None, *,
              row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """GCL noise ``e_ij`` (float32, (n_rows, n_cols)), element (i, j) a function of (seed, row_offset + i,
    col_offset + j) only: the half-normal of sigma 1/3 clipped at 1, from :func:`noise_table` (module docstring).

    Args:
        seed: the 64-bit Philox key (e.g. from ``draw_seed``), or a 0-dim int64 tensor (:func:`call_seed`).
        n_rows, n_cols: the output shape (rows i, columns j).
        device: where to generate; None = torch's default device.
        row_offset: the global index of row 0 (rows ``row_offset .. row_offset + n_rows - 1`` of the noise: a
            data-parallel rank's rows, a chunk of rows).
        col_offset: the global index of column 0 (a class shard's columns).

    Returns:
        (n_rows, n_cols) contiguous float32 tensor on ``device``, values in [0, 1].
    """
    # (the losses' seed rules; compiled, the seed is a tensor of the graph, and under torch.jit.trace the sizes are
    # tensors)
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        _check_noise_args(seed, n_rows, n_cols, row_offset, col_offset)
    check_noise_rows(row_offset, n_rows)
    first = col_offset // ELEMENTS_PER_CALL  # whole Philox groups of 8 columns, sliced below
    skip = col_offset - first * ELEMENTS_PER_CALL
    groups = (skip + n_cols + ELEMENTS_PER_CALL - 1) // ELEMENTS_PER_CALL
    c0 = torch.arange(first, first + groups, dtype=torch.int64, device=device)[None, :]  # broadcast: see philox4x32
    c1 = torch.arange(row_offset, row_offset + n_rows, dtype=torch.int64, device=device)[:, None]
    seed = graph_seed(seed, device) if torch.compiler.is_compiling() else seed
    seed = seed if isinstance(seed, torch.Tensor) else int(seed)
    words = philox4x32(seed, c0, c1, NOISE_ROUNDS)  # word k: columns 2k (its low half) and 2k + 1 (its high half)
    # (word k, half h): column 2k + h; the shifts made on the device (a copy from the host would synchronise, and
    # could not be captured in a CUDA graph)
    shifts = torch.arange(2, dtype=torch.int64, device=c0.device).mul_(16).add_(LEVEL_SHIFT)
    levels = (torch.stack(words, dim=-1)[..., None] >> shifts).bitwise_and_(NOISE_LEVELS - 1)
    levels = levels.reshape(n_rows, groups * ELEMENTS_PER_CALL)[:, skip:skip + n_cols]
    return torch.take(noise_table(levels.device), levels)
