"""Compile the kernels the device session's benchmarks launch, in parallel processes, before the timed runs.

Triton compiles a kernel the first time a launch needs it, in the launching process, one after another (~1-3 s
each); ``fastlt bench``'s default table needs ~100 of them, which would eat most of its time bound. Triton keeps
what it compiles in its on-disk cache, shared by every process of the machine, so workers that run each fastlt
case's step once leave the timed runs only cache loads. The peers (eager PyTorch, torch.compile, Liger, Cut
Cross-Entropy) are not run: nothing of theirs is timed with a cold cache here either way.

Usage (device machine, repo root): ``python benchmarks/warm_kernels.py [--jobs 4] [--what logits heads ab]``;
``benchmarks/gpu_session.sh`` runs it beside the test suite. Prints one line per task (its seconds, or what
failed); a task that fails (out of memory beside the other workers, say) only leaves its kernels to the timed run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

# (loss, "heads" or "ab", shape, dtype name, and for "ab" (switch, value, loss, grad_in_forward))
TaskT = tuple[str, tuple[int, ...], str] | tuple[str, tuple[int, ...], str, tuple]
WHAT = ("logits", "heads", "ab")


def tasks(what=WHAT) -> list[TaskT]:
    """The fastlt cases of ``fastlt bench``'s default tables (``--heads`` too), largest first, so that the longest
    tasks start first and no two of the largest run at the end together; then (``"ab"``) each case of
    benchmarks/ab_switches.py both ways (its switches compile other kernels), which the device script times after
    the logits table."""
    from fastlt._bench_harness import DTYPES
    from fastlt.bench import SHAPES
    from fastlt.bench_heads import HEAD_SHAPES

    out: list[TaskT] = []
    if "logits" in what:
        out += [(loss, shape, dname) for loss in ("la", "gcl", "lade") for shape in SHAPES
                for dname in ("fp32", "bf16")]
    if "heads" in what:
        out += [("heads", shape, "bf16") for shape in HEAD_SHAPES]
    out.sort(key=lambda t: -_elements(t[1]))
    if "ab" in what:
        import ab_switches

        names = {dtype: name for name, dtype in DTYPES.items()}
        ab = [("ab", (N, C), names[dtype], (switch, value, loss, gif))
              for switch, values, shapes, losses, gif in ab_switches.cases() for N, C, dtype in shapes
              for loss in losses for value in values]
        out += sorted(ab, key=lambda t: -_elements(t[1]))
    return out


def _elements(shape: tuple[int, ...]) -> int:
    return shape[0] * shape[-1]


def warm_task(task: TaskT, device: str = "cuda") -> tuple[TaskT, float, list[str]]:
    """Run each fastlt case of ``task`` once (forward + backward: every kernel its timed steps launch, compiled):
    ``(task, seconds, failures)``."""
    import torch

    from fastlt import bench, bench_heads
    from fastlt._bench_harness import DTYPES, one_line

    kind, shape, dname = task[:3]
    dtype = DTYPES[dname]
    if kind == "ab":
        import ab_switches

        switch, value, loss, gif = task[3]
        runs = [(f"{switch}={value} {loss}",
                 lambda: ab_switches.run_once(switch, value, *shape, dtype, loss, gif, device=device))]
    else:
        if kind == "heads":
            methods = [m for m in bench_heads.HEAD_METHODS if m.startswith("fastlt")]
            cases = bench_heads.build_head_cases(*shape, dtype, methods, device=device)
        else:
            cases = bench.build_cases(*shape, dtype, loss=kind, with_compile=False, with_official=False,
                                      device=device)
        runs = [(method, lambda make=make: make()()) for method, make in cases if method.startswith("fastlt")]
    start, failures = time.perf_counter(), []
    for label, run in runs:  # (each step freed with its call: only one case's tensors at a time)
        try:
            run()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a case left cold is timed cold, not lost
            failures.append(f"{label}: {one_line(f'{type(exc).__name__}: {exc}')}")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    return task, time.perf_counter() - start, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=4, help="worker processes (each holds one case's tensors at a time)")
    p.add_argument("--what", nargs="+", default=list(WHAT), choices=list(WHAT))
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs takes a positive int")
    todo = tasks(a.what)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:  # (CUDA in children needs spawn)
        for task, seconds, failures in pool.imap_unordered(warm_task, todo):
            kind, shape, dname = task[:3]
            name = f"{kind} {'x'.join(map(str, shape))} {dname}" + (f" {task[3]}" if len(task) > 3 else "")
            print(f"warm {name}: {seconds:.1f} s" + "".join(f"; {f}" for f in failures), flush=True)
    print(f"warmed {len(todo)} tasks in {time.perf_counter() - start:.0f} s with {a.jobs} workers", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
