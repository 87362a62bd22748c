"""A seeded differential fuzz of the fused heads (linear, biased, cosine): random combinations of the operator's
terms, dtype, reduction, ignored rows, row chunks or class chunks, against the float64 oracle
(:func:`test_heads.run_and_compare`). The heads' grid tests cover each term on its own; this covers their
combinations. Cosine heads take D >= 2 (at D = 1 a normalised feature is +-1 and its gradient 0 up to rounding)."""

from __future__ import annotations

import random

import pytest
import test_heads
import torch
from conftest import class_vectors, random_operator


def _case(rng: random.Random):
    """``(f, w, b, y, dtype, kw, cosine, reduction, chunk_rows, chunk_classes)`` of one random case."""
    N, C = rng.choice([1, 2, 5, 9, 17]), rng.choice([1, 2, 7, 37, 130])
    head = rng.choice(test_heads.HEADS)
    cosine = head == "cosine"
    D = rng.choice([3, 8, 20] if cosine else [1, 3, 8, 20])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    cv = class_vectors(C, gen)
    ignored = tuple(rng.sample(range(N), k=rng.choice([0, 0, 1, N])))
    f, w, b, y = test_heads._inputs(N, D, C, gen, cosine=cosine, bias=head == "linear_bias", ignore_rows=ignored)
    if rng.random() < 0.3:  # a strided view (labels[:, 0]): once read as other rows' targets
        y = torch.stack([y, (y + 1) % C], 1)[:, 0]
    kw = random_operator(rng, cv, scales=(30.0, 16.0, 0.5), weight_key="weight_classes")
    chunk_classes = rng.choice([None, None, 8, 16, 64])
    chunk_rows = None if chunk_classes else rng.choice([None, 1, 2, 4])
    return f, w, b, y, dtype, kw, cosine, rng.choice(["mean", "sum", "none"]), chunk_rows, chunk_classes


@pytest.mark.parametrize("seed", range(64))  # (600 pass: 121 s in the interpreter)
def test_random_head_matches_the_oracle(seed, monkeypatch):
    f, w, b, y, dtype, kw, cosine, reduction, chunk_rows, chunk_classes = _case(random.Random(seed))
    if chunk_classes:
        fused = test_heads._fused
        monkeypatch.setattr(test_heads, "_fused",
                            lambda cos, *a, **k: fused(cos, *a, **k, chunk_classes=chunk_classes))
    test_heads.run_and_compare(f, w, b, y, dtype, kw, cosine=cosine, reduction=reduction, chunk_rows=chunk_rows,
                               seed=seed)
