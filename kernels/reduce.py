"""Batch reductions and the gradients' rescale, as Triton kernels and the jit helpers the row kernels call
(docs/design.md, "Kernels").

- ``reduce_rows``: the batch loss (sum or 'mean') and 'mean''s denominator ``1 / sum_i w_{y_i}`` in one
  deterministic program, where a row kernel cannot do them itself;
- :func:`last_program_reduces`: the same sums at the end of a row kernel, by its program that finishes last
  (so a forward is one launch);
- ``scale_rows``: up to three stored gradients multiplied by grad_output in place (skipped on the device when it
  is 1).

No host sync anywhere; every sum walks its values in a fixed order (deterministic).
"""

from typing import Any, NamedTuple

import triton
import triton.language as tl


class Targets(NamedTuple):
    """A batch's targets as the reductions read them: ``ptr`` to the (N,) int targets, the (C,) fp32 class ``weight``
    (read only with HAS_WEIGHT: None without), ``N`` rows, ``C`` classes (the weight's length) and
    ``ignore_index``."""

    ptr: Any
    weight: Any
    N: Any
    C: Any
    ignore_index: Any


class Reduction(NamedTuple):
    """Where a launch's last program writes the batch loss: ``out`` (0-dim, the loss dtype) and ``counter``, an int32
    that is 0 before the launch and after it (:func:`fastlt.kernels.launch.reduce_counter`)."""

    out: Any
    counter: Any


@triton.jit
def sum_of(ptr, n, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """fp32 sum of the ``n`` fp32 values at ``ptr``, in BLOCK-wide steps (a fixed order: deterministic). CACHE: the
    loads' cache modifier (".cg" reads at L2, for values other programs of the same launch wrote)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        acc += tl.load(ptr + start + offs, mask=start + offs < n, other=0.0, cache_modifier=CACHE)
    return tl.sum(acc, 0)


@triton.jit
def batch_sums(loss_ptr, t, HAS_WEIGHT: tl.constexpr, LOSS: tl.constexpr, DENOM: tl.constexpr, BLOCK: tl.constexpr,
               CACHE: tl.constexpr):
    """``(sum_i loss_i, sum_i w_{y_i})`` (fp32; the second over the valid rows of the :class:`Targets` ``t``, a target
    outside [0, C) counting 0; either is 0 when its flag is off) in one BLOCK-wide loop, so the loads of both are in
    flight together; a fixed order: deterministic. CACHE: the loss loads' cache modifier (as :func:`sum_of`)."""
    offs = tl.arange(0, BLOCK)
    acc_loss = tl.zeros((BLOCK,), tl.float32)
    acc_w = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, t.N, BLOCK):
        rows = start + offs
        if LOSS:
            acc_loss += tl.load(loss_ptr + rows, mask=rows < t.N, other=0.0, cache_modifier=CACHE)
        if DENOM:
            y = tl.load(t.ptr + rows, mask=rows < t.N, other=t.ignore_index).to(tl.int64)
            valid = (rows < t.N) & (y != t.ignore_index)
            if HAS_WEIGHT:
                ok = valid & (y >= 0) & (y < t.C)
                acc_w += tl.load(t.weight + tl.where(ok, y, 0), mask=ok, other=0.0).to(tl.float32)
            else:
                acc_w += valid.to(tl.float32)
    return tl.sum(acc_loss, 0), tl.sum(acc_w, 0)


@triton.jit
def own_inverse(t, HAS_WEIGHT: tl.constexpr, OWN: tl.constexpr, BLOCK: tl.constexpr):
    """A row program's own ``1 / sum_i w_{y_i}`` over the valid rows (inf for none) when OWN (summed once, at its
    start), else a placeholder 1.0."""
    inv = 1.0
    if OWN:
        _, denom = batch_sums(t.ptr, t, HAS_WEIGHT, False, True, BLOCK, "")
        inv = 1.0 / denom
    return inv


# The 'mean' denominator's source in a row kernel (its DENOM constexpr): read from a pointer (computed by a launch
# before it, or given), summed by every program itself (cheap when programs x N is small), or summed by the
# launch's first program and published to the others through the launch's counter slot (see publish_inverse).
DENOM_POINTER, DENOM_OWN, DENOM_PUBLISHED = 0, 1, 2
# The int32 words of a counter slot (fastlt.kernels.counters: 4 a slot): the finish ticket (last_program_reduces),
# the start ticket, the published flag and the published 1 / denominator (fp32 bits). All 0 between launches.
_START, _READY, _VALUE = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def publish_inverse(counter, t, HAS_WEIGHT: tl.constexpr, PUBLISH: tl.constexpr, BLOCK: tl.constexpr):
    """DENOM_PUBLISHED, at a program's start: the program that draws the launch's first start ticket sums
    ``1 / sum_i w_{y_i}`` over the valid rows of the :class:`Targets` ``t`` and publishes it (value, then a release
    of the flag) in the counter slot at ``counter``; the others read it where they use it (:func:`mean_inverse`,
    after their statistics pass: by then it is there). No program waits for one that has not started: the
    publisher runs before it takes any wait, so the spin cannot deadlock, whatever the order programs start in.
    The launch's last program (:func:`last_program_reduces`) puts the slot back to 0."""
    if PUBLISH:
        if tl.atomic_add(counter + _START, 1, sem="relaxed", scope="gpu") == 0:
            _, denom = batch_sums(t.ptr, t, HAS_WEIGHT, False, True, BLOCK, "")
            tl.atomic_xchg(counter + _VALUE, (1.0 / denom).to(tl.int32, bitcast=True), sem="relaxed", scope="gpu")
            tl.atomic_xchg(counter + _READY, 1, sem="release", scope="gpu")


@triton.jit
def mean_inverse(inv_denom_ptr, own_inv, DENOM: tl.constexpr):
    """The row kernels' ``1 / sum_i w_{y_i}``: their own (DENOM_OWN), published by the launch's first program
    (DENOM_PUBLISHED: ``inv_denom_ptr`` is the launch's counter slot; spins on its flag, acquire), or read where it
    is used (a load there keeps no register live across the column loops)."""
    if DENOM == 1:
        inv = own_inv
    elif DENOM == 2:
        ready = tl.atomic_add(inv_denom_ptr + _READY, 0, sem="acquire", scope="gpu")
        while ready == 0:
            ready = tl.atomic_add(inv_denom_ptr + _READY, 0, sem="acquire", scope="gpu")
        inv = tl.atomic_add(inv_denom_ptr + _VALUE, 0, sem="relaxed", scope="gpu").to(tl.float32, bitcast=True)
    else:
        inv = tl.load(inv_denom_ptr)
    return inv


@triton.jit
def _scale_coefs(coef_ptr, inv, t, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """``coef_i *= inv`` (fp32, the N rows of ``t``) for the valid rows; an ignored row's coefficient stays 0 even when
    no row is valid (``inv = 1 / 0``), so its gradient is 0 rather than NaN (as torch's)."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, t.N, BLOCK):
        mask = start + offs < t.N
        v = tl.load(coef_ptr + start + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        y = tl.load(t.ptr + start + offs, mask=mask, other=t.ignore_index)
        tl.store(coef_ptr + start + offs, tl.where(y != t.ignore_index, v * inv, 0.0), mask=mask)


@triton.jit
def last_program_reduces(red, loss_ptr, t, coef_ptr, inv_denom_ptr, own_inv, extra_ptr, E, HAS_WEIGHT: tl.constexpr,
                         HAVE_INV: tl.constexpr, DENOM: tl.constexpr, MEAN_LOSS: tl.constexpr,
                         EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    """The batch reduction in the launch that wrote the per-row losses, by its last program to finish.

    Each program, once its rows are stored, takes a ticket from ``red.counter``. The one that draws the last ticket
    sums the N rows of ``t`` in a fixed order (deterministic, whichever program it is) and writes ``red.out``: times
    ``1 / sum_i w_{y_i}`` when MEAN_LOSS, the rows' own when HAVE_INV (:func:`mean_inverse`); without HAVE_INV it
    sums the denominator itself, in the same loop, and scales the row coefficients at ``coef_ptr`` by it too. EXTRA:
    plus the E fp32 values at ``extra_ptr`` that the programs wrote (LADE's LADER parts, one per program). Then it
    puts the counter back to 0 for the next launch on its stream.

    Ordering: the barrier makes this program's stores precede its ticket, the ticket is an acquire-release
    atomic at GPU scope (the others' stores precede the last ticket, which precedes the last program's loads),
    and those loads skip L1 (``.cg``); the pattern of Triton's layer-norm tutorial (stores, barrier, atomic)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(red.counter, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        # the denominator too when the rows did not have it ('mean', recompute mode): one loop for both sums
        total, denom = batch_sums(loss_ptr, t, HAS_WEIGHT, True, MEAN_LOSS and not HAVE_INV, BLOCK, ".cg")
        if MEAN_LOSS:
            if HAVE_INV:
                total = total * mean_inverse(inv_denom_ptr, own_inv, DENOM)
            else:
                batch_inv = 1.0 / denom
                _scale_coefs(coef_ptr, batch_inv, t, BLOCK, ".cg")
                total = total * batch_inv
        if EXTRA:
            total += sum_of(extra_ptr, E, BLOCK, ".cg")
        tl.store(red.out, total.to(red.out.dtype.element_ty))
        if DENOM == 2:  # the published denominator's words too (every program has read it: they hold tickets)
            tl.store(red.counter + _START, 0)
            tl.store(red.counter + _READY, 0)
            tl.store(red.counter + _VALUE, 0)
        tl.store(red.counter, 0)


@triton.jit
def reduce_rows(loss_ptr, t, coef_ptr, inv_denom_ptr, out_ptr, extra_ptr, E, HAS_WEIGHT: tl.constexpr,
                DENOM: tl.constexpr, LOSS: tl.constexpr, MEAN: tl.constexpr, SCALE_COEF: tl.constexpr,
                EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (1,): the batch reductions over the N rows of the :class:`Targets` ``t`` in one deterministic program, no
    host sync.

    DENOM: ``inv = 1 / sum_i w_{y_i}`` over the valid rows (inf for none; a target outside [0, C) counts 0) stored to
    ``inv_denom`` (1,) fp32. LOSS: ``out = sum_i loss_i`` (times ``inv`` when MEAN; ``inv`` read back when not
    DENOM), plus ``sum_e extra_e`` (E fp32 values: LADE's LADER partials) when EXTRA, stored in ``out``'s dtype.
    SCALE_COEF: ``coef_i *= inv`` (a forward that left 'mean' to this launch)."""
    loss, denom = batch_sums(loss_ptr, t, HAS_WEIGHT, LOSS, DENOM, BLOCK, "")
    if DENOM:
        inv = 1.0 / denom
        tl.store(inv_denom_ptr, inv)
    elif MEAN:
        inv = tl.load(inv_denom_ptr)
    if LOSS:
        if MEAN:
            loss = loss * inv
        if EXTRA:
            loss += sum_of(extra_ptr, E, BLOCK, "")
        tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
    if SCALE_COEF:
        _scale_coefs(coef_ptr, inv, t, BLOCK, "")


class Scaled(NamedTuple):
    """One stored gradient for ``scale_rows``: ``ptr`` to an (M, C) matrix with strides ``stride_m``, ``stride_n``
    (``M = 0``: an unused slot)."""

    ptr: Any
    stride_m: Any
    stride_n: Any
    M: Any
    C: Any


@triton.jit
def _scale_tiles(g, go_ptr, go_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``g_ij *= go[i * go_stride]`` over the (M, C) tiles ``pid, pid + programs, ...`` of one :class:`Scaled`."""
    tiles_n = tl.cdiv(g.C, BLOCK_N)
    for t in range(tl.program_id(0), tl.cdiv(g.M, BLOCK_M) * tiles_n, tl.num_programs(0)):
        rows = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < g.M
        go = tl.load(go_ptr + rows.to(tl.int64) * go_stride, mask=row_mask, other=0.0).to(tl.float32)
        mask = row_mask[:, None] & (cols[None, :] < g.C)
        offs = rows.to(tl.int64)[:, None] * g.stride_m + cols.to(tl.int64)[None, :] * g.stride_n
        x = tl.load(g.ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(g.ptr + offs, (x * go[:, None]).to(g.ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_rows(g0, g1, g2, go_ptr, go_stride, NUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Persistent grid: multiply ``NUM`` (1 to 3) stored gradients (:class:`Scaled` ``g0, g1, g2``), each (M_k, C_k)
    with its own strides, in place by grad_output: ``g_ij *= go[i * go_stride]`` (per row: ``go_stride`` > 0, one
    tensor), or by the scalar go (``go_stride`` = 0), which when it is 1 (the usual ``loss.backward()``) returns at
    once, read on the device: no host sync, and a no-op costs the grid's few programs, not one per tile."""
    if go_stride == 0:
        if tl.load(go_ptr).to(tl.float32) == 1.0:
            return
    _scale_tiles(g0, go_ptr, go_stride, BLOCK_M, BLOCK_N)
    if NUM > 1:
        _scale_tiles(g1, go_ptr, go_stride, BLOCK_M, BLOCK_N)
    if NUM > 2:
        _scale_tiles(g2, go_ptr, go_stride, BLOCK_M, BLOCK_N)
