"""A/B of the kernel policy switches that no GPU has timed yet (issue 17), each off and on in the same run:

- ``DEFAULT_STAGES`` 1 / 3: the column loops unpipelined (the loop form before issue 17) / pipelined
  (``tl.range(..., num_stages=3)``, async copies), forward + backward of LA, GCL and LADE;
- ``HALF_WIDTH_ROWS`` 1 / 2: bf16 rows one per tile / two per tile (the class vectors' tiles loaded once for both),
  forward + backward of LA and GCL;
- ``WHOLE_ROW_GRAD_IN_FORWARD`` False / True: with the gradient in the forward, 2048-wide tiles in two passes / the
  whole row as one tile (rows up to ``tiles.WHOLE_ROW_BYTES``), LA and GCL at 8142 classes;
- ``WHOLE_ROW_MAX_REGISTERS`` None / 64: that whole-row tile's registers as ptxas chooses (one block of 16 warps an
  SM above 64) / capped at 64 (two blocks an SM, a few spilled registers), LA and GCL at 4096 x 8142;
- ``COLUMN_STATS_ROWS`` 16 / 64: LADE's column partials per 16 rows (16 x 512 tiles) / per 64 (64 x 128), a quarter
  of the partials' traffic, forward + backward of LADE;
- ``GROUPED_STATS`` False / True: the statistics pass over rows of several tiles reduces across threads twice per
  tile / keeps per-thread statistics per vector of columns and reduces once per row, forward + backward of LA and
  GCL past the whole-row width.

``python benchmarks/ab_switches.py`` prints one markdown table: median ms (``triton.testing.do_bench``) per shape
both ways and the ratio on/off. Each switch goes through ``fastlt.kernels.tiles.reconfigure``, which also retires the
launch plans the loss modules keep, and is restored after.
"""

from __future__ import annotations

import sys

import torch


def _step(crit, name, z, y) -> None:
    """One forward + backward; GradSink: a layer's output (not a leaf, as grad_in_forward needs), its gradient
    dropped."""
    from fastlt._bench_harness import GradSink

    loss = crit(GradSink.apply(z), y, seed=1) if name == "gcl" else crit(GradSink.apply(z), y)
    loss.backward()


def _time(crit, name, z, y) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: _step(crit, name, z, y), warmup=10, rep=50, return_mode="median")


def _module(name: str, counts, grad_in_forward: bool) -> torch.nn.Module:
    import fastlt

    if name == "lade":
        return fastlt.LADELoss(counts, backend="triton")
    cls = {"la": fastlt.LogitAdjustedLoss, "gcl": fastlt.GCLLoss}[name]
    return cls(counts, backend="triton", grad_in_forward=grad_in_forward)


def cases() -> list[tuple]:
    """``(switch, (off, on), shapes, losses, grad_in_forward)`` of every A/B (shapes: ``(N, C, dtype)``)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    return [
        ("DEFAULT_STAGES", (1, 3), [(4096, 8142, fp32), (4096, 131072, bf16), (1024, 1_000_000, bf16)],
         ("la", "gcl", "lade"), False),
        ("HALF_WIDTH_ROWS", (1, 2), [(4096, 131072, bf16), (4096, 8142, bf16), (512, 8142, bf16)], ("la", "gcl"),
         False),
        ("WHOLE_ROW_GRAD_IN_FORWARD", (False, True), [(4096, 8142, fp32), (4096, 8142, bf16), (512, 8142, bf16)],
         ("la", "gcl"), True),
        ("WHOLE_ROW_MAX_REGISTERS", (None, 64), [(4096, 8142, bf16), (4096, 8142, fp32)], ("la", "gcl"), True),
        ("COLUMN_STATS_ROWS", (16, 64), [(4096, 8142, fp32), (4096, 131072, fp32), (4096, 131072, bf16)], ("lade",),
         False),
        ("GROUPED_STATS", (False, True), [(4096, 131072, bf16), (4096, 131072, fp32), (1024, 1_000_000, bf16)],
         ("la", "gcl"), False),
    ]


def run_once(switch: str, value, N: int, C: int, dtype: torch.dtype, name: str, grad_in_forward: bool,
             device: str = "cuda") -> None:
    """One forward + backward of ``name`` at (N, C) with ``switch`` set to ``value`` (restored after): every kernel
    that case's timed steps launch, compiled (benchmarks/warm_kernels.py warms the A/B this way)."""
    from fastlt._bench_harness import long_tail_counts
    from fastlt.kernels.tiles import reconfigured

    y = torch.randint(0, C, (N,), device=device)
    z = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
    crit = _module(name, long_tail_counts(C), grad_in_forward).to(device)
    with reconfigured(**{switch: value}):
        _step(crit, name, z, y)


def main() -> int:
    if not torch.cuda.is_available():
        print("ab_switches: no CUDA GPU visible; nothing measured")
        return 0
    from fastlt._bench_harness import long_tail_counts
    from fastlt.kernels.tiles import reconfigured

    print(f"# {torch.cuda.get_device_name(0)}: median ms, forward + backward")
    print("| switch | loss | N x C | dtype | off | on | on / off |\n|---|---|---|---|---|---|---|")
    for switch, (off, on), shapes, names, gif in cases():
        for N, C, dtype in shapes:
            counts = long_tail_counts(C)
            y = torch.randint(0, C, (N,), device="cuda")
            z = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
            for name in names:
                crit = _module(name, counts, gif).cuda()
                times = {}
                for value in (off, on):
                    with reconfigured(**{switch: value}):
                        times[value] = _time(crit, name, z, y)
                print(f"| {switch} | {name} | {N} x {C} | {str(dtype)[6:]} | {times[off]:.3f} | {times[on]:.3f} | "
                      f"{times[on] / times[off]:.2f} |", flush=True)
            del z
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
