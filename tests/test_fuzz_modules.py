"""A stateful fuzz of the loss modules and the fused heads: the same module on the kernels and on the float64
reference, four steps each, with what users do between steps drawn at random: a hyperparameter scheduled, a class
buffer edited in place or assigned, ``ignore_index``, ``label_smoothing``, the reduction or the heads' chunking
changed, an evaluation step under ``torch.no_grad``, a deepcopy of the module. Inputs are strided or transposed,
targets strided or ignored, fp32 or bf16. Each step's loss and input gradient must equal the reference's: a module
that kept arguments it should have made again (its held fields, its arguments cache, its launch plans) fails here.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import DEVICE

import fastlt

KINDS = ["la", "balanced_softmax", "ldam", "gcl", "lade", "head la", "head ldam", "head lade", "head cosine"]


def _builder(rng: random.Random, kind: str, C: int, D: int):
    """``build(backend)`` of a module of ``kind`` (the same hyperparameters for both backends)."""
    counts = torch.tensor([rng.randint(1, 200) for _ in range(C)])
    options = {}
    if rng.random() < 0.3:
        options["weight"] = torch.rand(C, generator=torch.Generator().manual_seed(rng.randrange(1000))) + 0.2
    if rng.random() < 0.3:
        options["label_smoothing"] = rng.choice([0.05, 0.2])
    if rng.random() < 0.3:
        options["ignore_index"] = 1
    reduction = rng.choice(["mean", "sum", "none"])
    if kind in ("lade", "head lade"):
        reduction = "sum" if reduction == "sum" else "mean"
    tau, gamma = rng.uniform(0.5, 1.5), rng.choice([0.0, 1.0])
    if kind.startswith("head"):
        if "weight" in options:
            options["weight_classes"] = options.pop("weight")
        if kind == "head cosine":
            return lambda backend: fastlt.CosineGCLHead(D, C, counts, m=0.2, s=8.0, noise_mul=0.5, gamma=gamma,
                                                        reduction=reduction, backend=backend, **options)
        loss = kind.split()[1]
        return lambda backend: fastlt.LinearLossHead(D, C, counts, loss=loss, tau=tau if loss == "la" else 1.0,
                                                     reduction=reduction, backend=backend, **options)
    cls, kw = {"la": (fastlt.LogitAdjustedLoss, dict(tau=tau)),
               "balanced_softmax": (fastlt.BalancedSoftmaxLoss, {}),
               "ldam": (fastlt.LDAMLoss, dict(max_margin=0.5, s=8.0)),
               "gcl": (fastlt.GCLLoss, dict(m=0.2, s=8.0, noise_mul=0.5, gamma=gamma)),
               "lade": (fastlt.LADELoss, dict(alpha=0.3))}[kind]
    return lambda backend: cls(counts, reduction=reduction, backend=backend, **kw, **options)


def _changes(kind: str) -> list:
    """What a user may change between steps, each ``change(module, float64)`` applied to both modules."""
    weight = "weight_classes" if kind.startswith("head") else "weight"

    def assign(name, value):
        return lambda m, f64: setattr(m, name, value)

    def weight_in_place(m, f64):
        if getattr(m, weight) is not None:
            getattr(m, weight).mul_(1.7)

    def weight_assigned(m, f64):
        setattr(m, weight, torch.linspace(0.5, 2.0, m.num_classes, dtype=torch.float64 if f64 else torch.float32))

    out = [assign("label_smoothing", 0.1), assign("ignore_index", 2), weight_in_place, weight_assigned]
    out += {"la": [assign("tau", 0.3)], "head la": [assign("tau", 0.3)],
            "ldam": [assign("max_margin", 0.9), assign("s", 4.0)], "head ldam": [assign("max_margin", 0.9)],
            "gcl": [assign("noise_mul", 0.25), assign("m", 0.4)], "head cosine": [assign("noise_mul", 0.25)],
            "lade": [assign("alpha", 0.7)], "head lade": [assign("alpha", 0.7), assign("remine_lambda", 0.4)],
            }.get(kind, [])
    if kind in ("la", "balanced_softmax", "head la"):
        out.append(lambda m, f64: m.log_prior.mul_(0.5))
    if kind in ("lade", "head lade"):
        out.append(lambda m, f64: m.prior.copy_(torch.full_like(m.prior, 1.0 / m.prior.numel())))
    if kind.startswith("head"):
        out.append(assign("chunk_rows", 2))
    return out


def _inputs(rng: random.Random, N: int, width: int, C: int, ignore_index: int, dtype, cosine_logits: bool):
    """(N, width) inputs, contiguous, a strided slice or transposed, and (N,) targets (some ignored, maybe
    strided)."""
    gen = torch.Generator().manual_seed(rng.randrange(10**6))
    base = torch.randn(N + 2, width + 3, generator=gen, dtype=torch.float64)
    x = {"contiguous": base[:N, :width].contiguous(), "slice": base[1:N + 1, 2:width + 2],
         "transposed": base[:N, :width].t().contiguous().t()}[rng.choice(["contiguous", "slice", "transposed"])]
    if cosine_logits:
        x = torch.tanh(x)
    y = torch.tensor([rng.randrange(C) for _ in range(N)])
    if rng.random() < 0.3:
        y[0] = ignore_index
    if rng.random() < 0.3:
        y = torch.stack([y, y], 1)[:, 0]
    return x.to(dtype), y


def _close(got, want, dtype, what):
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    scale = max(1.0, want.abs().max().item()) if dtype == torch.bfloat16 and want.numel() else 1.0
    torch.testing.assert_close(got.detach().cpu().double(), want.detach(), rtol=tol, atol=tol * scale,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("seed", range(24))
def test_modules_across_steps_and_changes(seed):
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    C, N, D = rng.choice([3, 7, 12]), rng.choice([1, 2, 5]), rng.randint(2, 6)
    build = _builder(rng, kind, C, D)
    head = kind.startswith("head")
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    kernels, ref = build("triton"), build("torch")
    if head:
        ref.load_state_dict(kernels.state_dict())
        kernels = kernels.to(dtype)
    kernels, ref = kernels.to(DEVICE), ref.double()
    changes = _changes(kind)
    width = D if head else C
    for step in range(4):
        what = f"seed {seed} {kind} {dtype} step {step}"
        if step == 2:
            change = rng.choice(changes)
            change(kernels, False)
            change(ref, True)
        if step == 3 and rng.random() < 0.4:
            kernels, ref = copy.deepcopy(kernels), copy.deepcopy(ref)
        if step == 1 and rng.random() < 0.4:  # an evaluation step between two training steps
            x, y = _inputs(rng, N, width, C, kernels.ignore_index, dtype, kind == "gcl")
            with torch.no_grad():
                torch.manual_seed(99)
                got = kernels(x.to(DEVICE), y.to(DEVICE))
                torch.manual_seed(99)
                _close(got, ref(x.double(), y), dtype, what + " (no_grad)")
        x, y = _inputs(rng, N, width, C, kernels.ignore_index, dtype, kind == "gcl")
        xr = x.double().requires_grad_()  # (first: on the CPU, x.to(DEVICE) is x itself)
        xk = x.to(DEVICE).requires_grad_()
        torch.manual_seed(step)
        got = kernels(xk, y.to(DEVICE))
        torch.manual_seed(step)
        want = ref(xr, y)
        got.sum().backward()
        want.sum().backward()
        _close(got, want, dtype, what + " loss")
        _close(xk.grad, xr.grad, dtype, what + " input gradient")
