"""The class-chunked path of the fused heads (large C): pass 1 writes per-row partials of each class chunk,
one combine finishes the rows, pass 2 recomputes each chunk's gradient. Against the float64 oracle, against
the row-chunked path, and the launcher pieces against the single-launch forward."""

from __future__ import annotations

import zlib

import pytest
import test_heads
import torch
from conftest import DEVICE, class_vectors
from test_heads import _flags, _inputs, run_and_compare

from fastlt import heads as H
from fastlt._operator import AdjustedCEArgs
from fastlt.heads import lade as heads_lade
from fastlt.heads import passes, plan
from fastlt.kernels import counters, launch, tiles

FLAGS = ["plain", "la", "ldam", "gcl_focal", "weighted_smooth", "all"]


def _fused_with(monkeypatch, **extra) -> None:
    """Make test_heads.run_and_compare call the fused head with ``extra`` (its oracles do not take them)."""
    fused = test_heads._fused
    monkeypatch.setattr(test_heads, "_fused", lambda cosine, *a, **k: fused(cosine, *a, **k, **extra))


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("flags", FLAGS)
def test_class_chunks_match_the_oracle(flags, reduction, dtype, head, monkeypatch):
    gen = _gen(flags, reduction, str(dtype), head)
    N, D, C = 6, 8, 37  # chunks of 8 classes: 5 chunks, the last one partial, tiles wider than a chunk
    cosine = head == "cosine"
    f, w, b, y = _inputs(N, D, C, gen, cosine=cosine, bias=head == "linear_bias")
    kw = _flags(flags, class_vectors(C, gen), seed=11)
    _fused_with(monkeypatch, chunk_classes=8)
    run_and_compare(f, w, b, y, dtype, kw, cosine=cosine, reduction=reduction)


@pytest.mark.parametrize("N,D,C,cols", [(1, 3, 1, 8), (3, 5, 7, 8), (4, 6, 40, 16), (5, 4, 300, 128)])
def test_class_chunks_odd_sizes(N, D, C, cols, monkeypatch):
    gen = _gen(N, D, C, cols)
    f, w, b, y = _inputs(N, D, C, gen)
    kw = _flags("all", class_vectors(C, gen), seed=3)
    _fused_with(monkeypatch, chunk_classes=cols)
    run_and_compare(f, w, b, y, torch.float32, kw)


def test_class_chunks_equal_row_chunks():
    gen = _gen("equal")
    N, D, C = 7, 8, 45
    f, w, b, y = _inputs(N, D, C, gen)
    kw = _flags("all", class_vectors(C, gen), seed=5)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    results = []
    for extra in (dict(chunk_rows=3), dict(chunk_classes=8), dict(chunk_classes=24), dict(chunk_classes=64)):
        leaves = [t.float().to(DEVICE).requires_grad_() for t in (f, w, b)]
        loss = H.linear_cross_entropy(*leaves[:2], y.to(DEVICE), leaves[2], backend="triton", **kw, **extra)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for other in results[1:]:
        for a, r in zip(other, results[0], strict=True):
            torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-6)


def _logits_and_vectors(gen, N, C, ignored_row):
    """(N, C) logits, targets with one ignored row, and the fp32 class vectors on the device."""
    cv = class_vectors(C, gen)
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    y[ignored_row] = -100
    return z, y, {k: v.float().to(DEVICE) for k, v in cv.items()}


def _class_partials(z, y, args, bounds):
    """The (PARTIAL_PLANES, N, chunks) partials of the class chunks ``[bounds[k], bounds[k + 1])``."""
    part = torch.empty((launch.PARTIAL_PLANES, z.shape[0], len(bounds) - 1), device=DEVICE)
    for k, (c0, c1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        launch.chunk_partials(z[:, c0:c1].contiguous(), y, args, part, k, col_base=c0, num_classes=z.shape[1])
    return part


def test_chunk_partials_and_combine_equal_the_single_launch_forward():
    N, C = 7, 37
    z, y, f32 = _logits_and_vectors(_gen("launch"), N, C, 3)
    args = AdjustedCEArgs(log_prior=f32["log_prior"], cloud=f32["cloud"], margin=f32["margins"],
                          weight=f32["weight"], tau=0.7, noise_mul=0.8, scale=3.0, gamma=1.5, label_smoothing=0.1,
                          seed=5)
    loss, lse, factor, _ = launch.forward(z, y, args)
    full_grad = launch.grad(z, y, args, lse, factor, None)
    bounds = [0, 8, 16, 24, 32, 37]
    part = _class_partials(z, y, args, bounds)
    loss2, lse2, factor2 = launch.combine_partials(part, y, args, C)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse2[0] + lse2[1], lse[0] + lse[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(factor2, factor)
    grad = torch.cat([launch.grad(z[:, c0:c1].contiguous(), y, args, lse2, factor2, None, col_base=c0, num_classes=C)
                      for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True)], 1)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-6)
    # chunks starting off a multiple of 8 (a torch.chunk class shard): GCL's tiles shifted (NOISE_SHIFT), same numbers
    bounds = [0, 5, 18, 30, 37]
    part = _class_partials(z, y, args, bounds)
    loss3, lse3, factor3 = launch.combine_partials(part, y, args, C)
    torch.testing.assert_close(loss3, loss, rtol=1e-5, atol=1e-5)
    grad = torch.cat([launch.grad(z[:, c0:c1].contiguous(), y, args, lse3, factor3, None, col_base=c0, num_classes=C)
                      for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True)], 1)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["last-program", "own-launch", "denominator-launch", "unscaled",
                                  "unscaled-own-launch"])
def test_combine_reduces_the_batch_in_its_launch(reduction, mode, monkeypatch):
    """``combine_partials(out=)``: the combine's last program reduces the rows (summing 'mean''s denominator in its
    programs), or one launch after it when that cannot be, or with the factors left to the reduction; each gives
    the loss and factors of the single-launch forward + reduce."""
    C = 37
    z, y, f32 = _logits_and_vectors(_gen("combine", reduction, mode), 9, C, 4)
    args = AdjustedCEArgs(log_prior=f32["log_prior"], weight=f32["weight"], tau=0.7, label_smoothing=0.1,
                          reduction=reduction)
    loss_rows, _, factor, _ = launch.forward(z, y, args)
    want = launch.reduce(loss_rows, y, args)
    part = _class_partials(z, y, args, [0, 16, 32, C])
    if mode.endswith("own-launch"):
        monkeypatch.setattr(tiles, "FUSED_REDUCE_STEPS", 0)
    if mode == "denominator-launch":
        monkeypatch.setattr(tiles, "OWN_DENOM_READS", 0)
    out = torch.full((), float("nan"), device=DEVICE)
    rows2, _, factor2 = launch.combine_partials(part, y, args, C, out=out, scale_mean=not mode.startswith("unscaled"))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows2, loss_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factor2, factor, rtol=1e-5, atol=1e-7)
    if not mode.endswith("own-launch"):
        assert counters.reduce_counter(torch.device(DEVICE)).item() == 0
    none = AdjustedCEArgs(reduction="none")
    with pytest.raises(ValueError, match="out="):
        launch.combine_partials(part, y, none, C, out=out)


def test_chunk_classes_validation():
    f = torch.randn(3, 4, device=DEVICE)
    w = torch.randn(5, 4, device=DEVICE)
    y = torch.tensor([0, 1, 2], device=DEVICE)
    for bad in (0, 12, True, 8.0):
        with pytest.raises(ValueError, match="chunk_classes"):
            H.linear_cross_entropy(f, w, y, backend="triton", chunk_classes=bad)
    with pytest.raises(ValueError, match="not both"):
        H.cosine_cross_entropy(f, w, y, backend="triton", chunk_classes=8, chunk_rows=2)
    counts = torch.arange(1, 6)
    with pytest.raises(ValueError, match="chunk_classes"):
        H.LinearLossHead(4, 5, counts, chunk_classes=12)
    with pytest.raises(ValueError, match="not both"):
        H.CosineGCLHead(4, 5, counts, chunk_classes=8, chunk_rows=2)


@pytest.mark.parametrize("loss", ["la", "lade"])
def test_modules_take_chunk_classes(loss, monkeypatch):
    """A module's ``chunk_classes`` reaches the fused path: the same loss and gradients as its row-chunked run."""
    seen = []
    class_pass = passes.class_row_stats
    monkeypatch.setattr(passes, "class_row_stats", lambda *a, **k: seen.append(1) or class_pass(*a, **k))
    monkeypatch.setattr(heads_lade, "class_row_stats", passes.class_row_stats)
    gen = _gen("modules", loss)
    N, D, C = 6, 5, 40
    x = torch.randn(N, D, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    counts = torch.randint(1, 50, (C,), generator=gen)
    results = []
    for extra in (dict(chunk_rows=4), dict(chunk_classes=16)):
        torch.manual_seed(0)
        head = H.LinearLossHead(D, C, counts, loss=loss, backend="triton", **extra).to(DEVICE)
        xi = x.clone().requires_grad_()
        out = head(xi, y)
        out.backward()
        results.append((out.detach(), xi.grad, head.weight.grad, head.bias.grad))
    assert len(seen) == 1
    for a, r in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-6)


def test_the_path_choice_by_count():
    bf16 = torch.bfloat16
    # the benchmark shapes take one chunk of the whole batch: its logits fit in a chunk plus the fp32 dW accumulator
    # that row chunks would need (1024 x 1M bf16: 2 GiB <= 0.5 + 4 GiB; 4096 x 131072: 1 GiB <= 0.5 + 0.5 GiB)
    for N, D, C in ((1024, 1024, 1_000_000), (4096, 1024, 131072), (4096, 2048, 8142), (0, 4, 5)):
        assert H.head_chunk_rows(N, D, C, bf16) == max(N, 1)
    # no accumulator to trade (no weight gradient; fp32, whose dW is its own accumulator): 512 MiB chunks
    assert H.head_chunk_rows(4096, 1024, 131072, bf16, need_weight_grad=False) == 2048
    assert H.head_chunk_rows(4096, 1024, 131072, torch.float32) == 1024
    assert H.head_chunk_rows(4097, 1024, 131072, bf16) == 2048  # one row past the bound
    assert H.head_chunk_rows(10, 4, 8, torch.float16, chunk_bytes=64) == 10  # 160 B <= 64 + 4 * 8 * 4
    assert H.head_chunk_rows(40, 4, 8, torch.float16, chunk_bytes=64) == 4

    # several row chunks: their fp32 dW re-reads against the logits that class chunks recompute
    def prefer(N, D, C):
        rows = H.head_chunk_rows(N, D, C, bf16)
        return plan.prefer_class_chunks(N, D, C, rows, plan.default_chunk_classes(N, bf16))

    assert prefer(16384, 1024, 1_000_000)  # 64 row chunks of 256 rows, or 62 class chunks
    assert not prefer(8192, 1024, 131072)  # 4 row chunks, or 4 class chunks (3 recomputed)
    assert not prefer(4096, 2048, 8142)  # one chunk
    # the last class chunk is not recomputed: one class chunk costs no extra matmul, so any row chunking loses
    assert plan.prefer_class_chunks(64, 8, 1000, 32, 1000)
    assert not plan.prefer_class_chunks(64, 8, 1000, 64, 1000)
    assert H.default_chunk_classes(1024, bf16) == (512 << 20) // 2048 // 128 * 128
    assert H.default_chunk_classes(10**9, bf16) == 128


def test_chunk_buffers_have_aligned_rows():
    x = torch.empty(2, 3, dtype=torch.bfloat16)
    buf = passes.logits_buffer(5, 8142, x)
    assert buf.shape == (5, 8142) and buf.stride() == (8192, 1)  # 16 KiB rows: every cuBLAS ld 128-B aligned
    flat = torch.empty(4 * passes.padded(100))
    z = passes.class_logits(flat, torch.randn(4, 3), torch.randn(300, 3), None, 128, 228)
    assert z.shape == (4, 100) and z.stride() == (128, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gradient_accumulation_keeps_fp32_partials(dtype):
    """``passes.acc_mm`` (dW and dF summed over chunks) adds each chunk's 16-bit product in fp32: the products of
    16-bit values are exact in fp32. On the CPU it rounded each chunk's product to the 16-bit dtype first, so the
    error grew with the number of chunks (a chunking test reached 1.85 of its tolerance on other seeds)."""
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(4, 64, 48, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(4, 48, 40, generator=gen).to(dtype).to(DEVICE)
    acc = torch.empty(64, 40, dtype=torch.float32, device=DEVICE)
    for k in range(4):
        passes.acc_mm(acc, a[k], b[k], first=k == 0)
    want = sum(a[k].double() @ b[k].double() for k in range(4))
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)
