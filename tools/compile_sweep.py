"""Compile, for an sm_``arch`` GPU and without one, every distinct kernel specialisation that a broad grid of public
calls launches: losses (logit adjustment, GCL, LDAM, LADE) x dtype x reduction x class indices / probabilities x
label smoothing x class weights x gradient in the forward x focal gamma, and the fused heads (row and class
chunks, 'none', the cosine and LADE heads). A wider net than ``tools/kernel_report.py``'s cases for what only a
compiler shows: a Triton front end that refuses a form another version takes (triton 3.6, the device image's,
refused a tuple holding None that 3.9 took), a constexpr branch that does not compile. Counting nothing: it
reports only what fails.

``python tools/compile_sweep.py [--arch 90]``; with another Triton first on ``PYTHONPATH``
(``pip install --target DIR triton==3.6.0``) it checks that version. ~300 compiles (minutes). Exit 1 when any
fails. A developer tool, not installed with fastlt, not run by CI (too long; CI compiles kernel_report's cases with
triton 3.6).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _calls() -> list:
    """The recorded launches ``[(fn, args, kwargs)]`` of the grid (nothing runs: the kernels are recorders)."""
    import fastlt._backend as backend
    import fastlt.functional as LF
    import fastlt.heads.functional as HF
    from fastlt import heads as H
    from fastlt.priors import gcl_cloud, log_prior, prior
    from tools import kernel_report as kr

    anywhere = lambda name, t: name != "torch"  # noqa: E731 - the kernels' path for CPU stand-ins
    backend.use_triton = LF.use_triton = HF.use_triton = anywhere
    C = 67  # odd: masked tiles
    counts = torch.arange(C, 0, -1).double()
    lp, cloud, pi = log_prior(counts).float(), gcl_cloud(counts).float(), prior(counts).float()
    weight = torch.rand(C) + 0.5
    calls: list = []
    for dtype, red, soft, smooth, weighted, gif, gamma in itertools.product(
            (torch.float32, torch.bfloat16), ("mean", "sum", "none"), (False, True), (0.0, 0.1), (False, True),
            (False, True), (0.0, 2.0)):
        def inputs(dtype=dtype, soft=soft):
            z = torch.randn(5, C, dtype=dtype) + torch.zeros(1, requires_grad=True)  # a non-leaf
            y = torch.softmax(torch.randn(5, C), 1).to(dtype) if soft else torch.randint(0, C, (5,))
            return z, y

        kw = dict(reduction=red, label_smoothing=smooth, weight=weight if weighted else None, backend="triton",
                  grad_in_forward=gif)
        terms = [dict(log_prior=lp, gamma=gamma), dict(margin=torch.rand(C), scale=8.0),
                 dict(cloud=cloud, noise_mul=0.5, margin=0.3, scale=8.0, seed=3, gamma=gamma)]
        for term in terms:
            calls += kr.record(lambda t=term, k=kw: LF.adjusted_cross_entropy(*inputs(), **t, **k).sum().backward())
        if red != "none" and not gif:
            calls += kr.record(lambda k=kw: LF.lade_loss(*inputs(), pi, reduction=k["reduction"],
                                                         label_smoothing=k["label_smoothing"], weight=k["weight"],
                                                         backend="triton").backward())
    for dtype in (torch.float32, torch.bfloat16):
        def heads(dtype=dtype):
            x = torch.randn(6, 16, dtype=dtype, requires_grad=True)
            w = torch.randn(C, 16, dtype=dtype, requires_grad=True)
            y = torch.randint(0, C, (6,))
            for kw in (dict(), dict(chunk_rows=2), dict(chunk_classes=32)):
                H.linear_cross_entropy(x, w, y, log_prior=lp, backend="triton", **kw).backward()
                H.linear_cross_entropy(x, w, y, log_prior=lp, backend="triton", reduction="none", **kw).sum().backward()
                H.cosine_cross_entropy(x, w, y, cloud=cloud, noise_mul=0.5, margin=0.2, scale=8.0, seed=1,
                                       backend="triton", **kw).backward()
                H.lade_linear_loss(x, w, y, pi, backend="triton", **kw).backward()
        calls += kr.record(heads)
    return calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    a = p.parse_args(argv)
    import triton

    from tools import kernel_report as kr

    calls = _calls()
    seen, failed = set(), []
    for fn, args, kwargs in calls:
        key = (fn.__name__, kr._flags(kwargs))
        if key in seen:
            continue
        seen.add(key)
        try:
            kr.compile_for(fn, args, kwargs, a.arch)
        except kr.UnsupportedTriton as exc:
            print(f"compile_sweep: unsupported Triton ({exc})")
            return 3
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the exit status says so
            lines = str(exc).strip().splitlines() or [""]
            failed.append(key)
            print(f"FAIL {key[0]} ({key[1]}): {type(exc).__name__}: {lines[-1][:300]}", flush=True)
    print(f"triton {triton.__version__}, sm_{a.arch}: {len(calls)} launches recorded, {len(seen)} distinct compiled, "
          f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
