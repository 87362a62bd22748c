"""A seeded differential fuzz of the row operator: random combinations of every operator term, dtype, reduction,
tile path (one tile, tiles, split rows, two-row persistent tiles), gradient in the forward (GCL's stored tiles
on and off) and inputs (normal, a large common offset, peaked, classes masked with ``finfo.min`` or -inf, ignored
rows masked whole), each against the float64 reference (:func:`test_kernels_adjusted_ce.run_and_compare`).
The grid of the other tests covers each term on its own; this covers their combinations. Inputs whose result
overflows the same way in torch's own float32 (a scale > 1 times ``finfo.min``, label smoothing over -inf or
several ``finfo.min`` classes) are not drawn: the README says what they give."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import class_vectors, random_operator
from test_kernels_adjusted_ce import run_and_compare
from test_kernels_soft_targets import _soft

from fastlt.kernels import launch

CONFIGS = [None, dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3),
           dict(block_n=32, num_splits=1, block_m=2, row_programs=2), dict(block_n=64, num_splits=1, block_m=2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(rng: random.Random):
    """One random case: ``(z, target, operator kwargs, reduction, grad_in_forward, tile config, STORE_PROBS)``."""
    N, C = rng.choice([1, 2, 5, 8]), rng.choice([1, 2, 7, 33, 70, 129])
    dtype = rng.choice(DTYPES)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    cv = class_vectors(C, gen)
    regime = rng.choice(["normal", "offset", "peaked", "finfo_min", "minus_inf", "ignored_masked"])
    soft = regime in ("normal", "offset", "peaked") and rng.random() < 0.25
    masked = regime in ("finfo_min", "minus_inf")
    # (a scale > 1 times finfo.min overflows, smoothing over masked classes is inf: as torch's, README)
    kw = random_operator(rng, cv, scales=(1.0,) if regime == "finfo_min" else (30.0, 0.25, 8.0), smoothing=not masked)
    z = torch.randn(N, C, generator=gen, dtype=torch.float64)
    if regime == "offset":
        z = z + rng.choice([100.0, -300.0])
    elif regime == "peaked":
        z = z * 8
    z = z.to(dtype)
    y = torch.randint(0, C, (N,), generator=gen)
    if N > 1 and rng.random() < 0.5:
        y[rng.randrange(N)] = -100
    if regime in ("finfo_min", "minus_inf") and C > 2:
        low = torch.finfo(dtype).min if regime == "finfo_min" else float("-inf")
        for i in range(N):
            cols = torch.randperm(C, generator=gen)[:rng.randrange(1, C)]
            z[i, cols[cols != y[i]]] = low
    if regime == "ignored_masked" and N > 1:
        i = rng.randrange(N)
        y[i], z[i] = -100, rng.choice([float("-inf"), torch.finfo(dtype).min])
    if not soft and rng.random() < 0.3:  # a strided view (labels[:, 0]): once read as other rows' targets
        y = torch.stack([y, (y + 1) % C], 1)[:, 0]
    target = _soft(N, C, gen, rng.choice(["mixup", "dense"])) if soft else y
    reductions = ["sum", "none"] if soft else ["mean", "sum", "none"]
    return (z, target, kw, rng.choice(reductions), rng.random() < 0.4, rng.choice(CONFIGS),
            rng.choice(["noise", "always", "never"]))


@pytest.mark.parametrize("seed", range(160))  # (1000 pass: 83 s in the interpreter)
def test_random_combination_matches_the_reference(seed, monkeypatch):
    z, target, kw, reduction, grad_in_forward, config, store = _case(random.Random(seed))
    monkeypatch.setattr(launch, "STORE_PROBS", store)
    run_and_compare(z, target, kw, reduction=reduction, grad_in_forward=grad_in_forward, config=config)
