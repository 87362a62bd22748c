"""Sweep the row-operator tile configurations on a GPU and print the best per shape and mode.

``python benchmarks/tune_tiles.py [--out DIR]``: for each (N, C, dtype), times the forward kernel
(recompute mode), the gradient kernel, and the fused forward+gradient (gradient-in-forward), over
tile shape (1, 2 or 4 rows) x num_warps x num_stages (x num_splits for short batches), and for long rows the
persistent gradient-in-forward grids (1, 2 or 4 programs per SM, each walking whole rows, the second pass
from the row's end back so that it re-reads from L2), plus GCL's noise cost (the same kernels with the cloud on).
The default row times the gradient-in-forward with the tiles ``launch.forward`` picks for it. Kernel times only
(CUDA events via do_bench), no autograd.

``--lade``: instead, sweep the LADE forward's column-statistics tiles (block_m x block_n x warps) and time
forward (row stats + column partials + merge) plus the gradient pass, against the default; then the gradient
pass's own tiles.

``--fused``: instead, only the gradient-in-forward of long rows (a few configs, ~1 minute): the default grid of one
program per row against the persistent grids, LA and GCL, at the shapes of ``FUSED_SHAPES``; the first two grids
with and without ``launch.STORE_PROBS`` (the second pass from the stored exp(a - max) or recomputing each tile).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import torch
import triton.testing

from fastlt._bench_harness import floor_ms, long_tail_counts, measure_bandwidth
from fastlt._operator import AdjustedCEArgs
from fastlt.kernels import launch, tiles
from fastlt.priors import gcl_cloud, log_prior

SHAPES = [(4096, 8142, "fp32"), (4096, 8142, "bf16"), (4096, 131072, "fp32"), (4096, 131072, "bf16"),
          (128, 1_000_000, "bf16"), (512, 8142, "bf16")]


def candidates(N, C, sm_count):
    # (rows, columns) per tile: one-row tiles, and 2- or 4-row tiles of the same size, whose (C,) prior/cloud
    # loads are shared by the rows (4 B of L2 reads per element with one row: as much as fp32 z, twice bf16 z)
    shapes = [(1, 2048), (1, 4096), (1, 8192), (2, 1024), (4, 512)] if C > 8192 else \
        [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (2, 1024), (4, 512)]
    splits = [None] if N >= 1024 else [None, 8, 16, 32]
    for (bm, bn), w, st, sp in itertools.product(shapes, [4, 8, 16], [1, 3], splits):
        if (C <= 8192 and sp is not None) or (bm > 1 and (w == 16 or N < 1024)):
            continue
        yield dict(block_n=bn, num_warps=w, num_stages=st, num_splits=sp, block_m=bm)
    if C > 8192 and N >= 1024:  # persistent grids: p programs of 16 / p warps per SM (registers allow 16 warps)
        for p, st in itertools.product([1, 2, 4], [2, 3, 4]):
            yield dict(block_n=8192 // p, num_warps=16 // p, num_stages=st, num_splits=1, block_m=1,
                       row_programs=p * sm_count)


def _try_bench(fn, what, rep=30):
    """Median ms of ``fn``, or None for a config that does not compile (printed and skipped)."""
    try:
        return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
        print(f"skip {what}: {type(exc).__name__}")
        return None


def time_config(z, y, args, cfg, out, fused_cfg=None):
    """(forward, gradient, gradient-in-forward) kernel ms; ``fused_cfg``: another config for the last."""
    fused_cfg = fused_cfg or cfg
    lse_factor = launch.forward(z, y, args, config=cfg)
    lse, factor = lse_factor[1], lse_factor[2]
    go = torch.ones((), device="cuda")
    f = triton.testing.do_bench(lambda: launch.forward(z, y, args, config=cfg), warmup=10, rep=40,
                                return_mode="median")
    b = triton.testing.do_bench(lambda: launch.grad(z, y, args, lse, factor, go, config=cfg, out=out), warmup=10,
                                rep=40, return_mode="median")
    fused = triton.testing.do_bench(lambda: launch.forward(z, y, args, grad_out=out, config=fused_cfg), warmup=10,
                                    rep=40, return_mode="median")
    return f, b, fused


LADE_SHAPES = [(4096, 131072, "fp32"), (4096, 131072, "bf16"), (1024, 1_000_000, "bf16"), (4096, 8142, "fp32")]


def _lade_step(lade, z, y, pi, args, out, cfg):
    _, lse, factor, terms = lade.forward(z, y, pi, 0.1, 0.1, args, config=cfg)
    launch.grad(z, y, args, lse, factor, None, column_term=terms.column_term, out=out)


def tune_lade(bw, out_dir):
    from fastlt.kernels import lade
    from fastlt.priors import prior

    rows = []
    for N, C, dname in LADE_SHAPES:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        pi = prior(long_tail_counts(C)).cuda()
        args = AdjustedCEArgs(log_prior=torch.log(pi))
        z = torch.randn(N, C, device="cuda", dtype=dt)
        y = torch.randint(0, C, (N,), device="cuda")
        out = torch.empty_like(z)
        fl = floor_ms(N, C, dt, bw)
        results = []
        # a short sweep (each config compiles in a few seconds; the device session gives this ~100 s)
        # taller tiles write fewer (2, N / BLOCK_M, C) partials (16 rows: 12.5% of fp32 logits' bytes, 25% of
        # bf16's): 32 x 256 and 64 x 128 of 16 warps halve and quarter them at 16 elements a thread (issue 17, item
        # 3; static count, kernel_report, 4096 x 131072 fp32: 115 and 122 registers, no spills, 28.4 and 28.3 SASS an
        # element against 27.8 for 16 x 512)
        configs = [None] + [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=3) for bm, bn, w in
                            [*itertools.product([16, 32], [512, 1024], [8, 16]), (32, 256, 16), (64, 128, 16)]]
        for kw in configs:
            cfg = launch.pick_tiles(N, C, z.device, column_stats=True, **(kw or {}))
            ms = _try_bench(functools.partial(_lade_step, lade, z, y, pi, args, out, cfg), cfg)
            if ms is None:
                continue
            results.append((ms, cfg, kw is None))
            rows.append(dict(N=N, C=C, dtype=dname, config=cfg.__dict__, default=kw is None, ms=ms, x_floor=ms / fl))
        default = [r for r in results if r[2]][0]
        best = min(results, key=lambda r: r[0])
        print(f"LADE {N}x{C} {dname} floor {fl:.3f} ms | default {default[0]:.3f} ({default[0] / fl:.2f}x) "
              f"{default[1]} | best {best[0]:.3f} ({best[0] / fl:.2f}x) {best[1]}")
        # the gradient pass alone (its three (C,) column vectors are shared by the block_m rows of a tile)
        _, lse, factor, terms = lade.forward(z, y, pi, 0.1, 0.1, args)
        grads = []
        for kw in [None] + [dict(block_m=bm, block_n=bn, num_warps=w) for bm, bn, w in
                            [(1, 2048, 4), (2, 1024, 4), (4, 1024, 8), (8, 512, 8), (8, 256, 4)]]:
            cfg = launch.pick_tiles(N, C, z.device, column_term=True, **(kw or {}))
            ms = _try_bench(functools.partial(launch.grad, z, y, args, lse, factor, None,
                                              column_term=terms.column_term, out=out, config=cfg),
                            f"grad {cfg}")
            if ms is None:
                continue
            grads.append((ms, cfg, kw is None))
            rows.append(dict(N=N, C=C, dtype=dname, grad_config=cfg.__dict__, default=kw is None, grad_ms=ms))
        if grads:
            gd = [g for g in grads if g[2]] or grads[:1]
            gb = min(grads, key=lambda g: g[0])
            print(f"   LADE gradient pass: default {gd[0][0]:.3f} ms {gd[0][1]} | best {gb[0]:.3f} ms {gb[1]}")
        del z, out
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "tune_lade.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


# (N, C, dtype, sweep the persistent grids): 8142 classes fit one persistent tile, so only its two default grids
# run there (STORE_P on and off: GCL's rows there are 4 tiles of 2048)
FUSED_SHAPES = [(4096, 131072, "bf16", True), (4096, 131072, "fp32", True), (4096, 32768, "bf16", True),
                (4096, 8142, "bf16", False), (4096, 8142, "fp32", False), (512, 8142, "bf16", False)]


def tune_fused(bw, out_dir):
    rows = []
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    for N, C, dname, sweep in FUSED_SHAPES:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        counts = long_tail_counts(C)
        z = torch.randn(N, C, device="cuda", dtype=dt)
        out = torch.empty_like(z)  # the same traffic as writing over z, and z stays the same between repeats
        y = torch.randint(0, C, (N,), device="cuda")
        fl = floor_ms(N, C, dt, bw)
        ops = {"la": AdjustedCEArgs(log_prior=log_prior(counts).cuda()),
               "gcl": AdjustedCEArgs(cloud=gcl_cloud(counts).cuda(), noise_mul=1.0, margin=0.5, scale=30.0,
                                     seed=3)}
        # up to tiles.WHOLE_ROW_BYTES the default holds the row as one tile; "one per row" is then the 2048-wide
        # tiles' two passes (the A/B of issue 17 item 2), and a whole row of 8 warps a third point
        configs = [("default", launch.pick_tiles(N, C, z.device, grad_in_forward=True, elem_bytes=z.element_size())),
                   ("one per row", launch.pick_tiles(N, C, z.device, row_programs=0))]
        if C <= tiles.whole_row_elements(z.element_size()):
            configs.append(("whole row, 8 warps", launch.pick_tiles(N, C, z.device, block_m=1,
                                                                     block_n=tiles.next_pow2(C), num_warps=8)))
        for p, st in itertools.product([1, 2, 4], [2, 3, 4]) if sweep else ():
            configs.append((f"persistent {p}/SM stages {st}",
                            launch.pick_tiles(N, C, z.device, block_m=1, block_n=8192 // p, num_warps=16 // p,
                                              num_stages=st, num_splits=1, row_programs=p * sm)))
        for k, (name, cfg) in enumerate(configs):
            # the default grid and one program per row, each with the second pass recomputing every tile (never) and
            # scaling the exp(a - max) the first pass stored (always: launch.STORE_PROBS); the rest with the default
            for op, args in ops.items():
                for store in ("never", "always") if k < 2 else (launch.STORE_PROBS,):
                    launch.STORE_PROBS, default = store, launch.STORE_PROBS
                    try:
                        ms = _try_bench(functools.partial(launch.forward, z, y, args, grad_out=out, config=cfg),
                                        f"{name} {cfg}")
                    finally:
                        launch.STORE_PROBS = default
                    if ms is None:
                        continue
                    print(f"fused {op} {N}x{C} {dname}: {name:28s} store={store:6s} {ms:.3f} ms "
                          f"({ms / fl:.2f}x floor) {cfg}")
                    rows.append(dict(N=N, C=C, dtype=dname, op=op, name=name, store_probs=store,
                                     config=cfg.__dict__, ms=ms, x_floor=ms / fl))
        del z, out
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "tune_fused.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--lade", action="store_true", help="sweep the LADE column-statistics tiles instead")
    p.add_argument("--fused", action="store_true", help="sweep the long-row gradient-in-forward grids instead")
    a = p.parse_args()
    if a.lade and a.fused:
        p.error("--lade and --fused are two sweeps: run them one at a time")
    if not torch.cuda.is_available():
        raise SystemExit("tune_tiles: no CUDA GPU visible (the sweep times GPU kernels)")
    os.makedirs(a.out, exist_ok=True)  # before the sweep, so a bad --out fails at once
    bw = measure_bandwidth()
    if a.lade:
        tune_lade(bw, a.out)
        return
    if a.fused:
        tune_fused(bw, a.out)
        return
    rows = []
    for N, C, dname in SHAPES:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        counts = long_tail_counts(C)
        z = torch.randn(N, C, device="cuda", dtype=dt)
        y = torch.randint(0, C, (N,), device="cuda")
        out = torch.empty_like(z)
        fl = floor_ms(N, C, dt, bw)
        la = AdjustedCEArgs(log_prior=log_prior(counts).cuda())
        gcl = AdjustedCEArgs(cloud=gcl_cloud(counts).cuda(), noise_mul=1.0, margin=0.5, scale=30.0, seed=3)
        default = launch.pick_tiles(N, C, z.device)
        default_fused = launch.pick_tiles(N, C, z.device, grad_in_forward=True, elem_bytes=z.element_size())
        sm_count = torch.cuda.get_device_properties(z.device).multi_processor_count
        best = {}
        for kw in [None, *candidates(N, C, sm_count)]:
            cfg = default if kw is None else launch.pick_tiles(N, C, z.device, **kw)
            fused_cfg = default_fused if kw is None else cfg  # the default row: what launch.forward picks for it
            try:
                f, b, fused = time_config(z, y, la, cfg, out, fused_cfg)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"skip {cfg}: {type(exc).__name__}")
                continue
            rec = dict(N=N, C=C, dtype=dname, config=cfg.__dict__, default=kw is None, fwd=f, bwd=b, fused=fused,
                       recompute_x=(f + b) / fl, fused_x=fused / fl)
            rows.append(rec)
            for mode, v, c in (("recompute", f + b, cfg), ("fused", fused, fused_cfg)):
                if mode not in best or v < best[mode][0]:
                    best[mode] = (v, c)
        d = [r for r in rows if r["N"] == N and r["C"] == C and r["dtype"] == dname and r["default"]][0]
        print(f"{N}x{C} {dname} floor {fl:.3f} ms | default {default}: recompute {d['fwd'] + d['bwd']:.3f} "
              f"({d['recompute_x']:.2f}x) | default fused {default_fused}: {d['fused']:.3f} ({d['fused_x']:.2f}x)")
        for mode, (v, cfg) in best.items():
            print(f"   best {mode}: {v:.3f} ms ({v / fl:.2f}x) with {cfg}")
        cfg = best["recompute"][1]
        f2, b2, fused2 = time_config(z, y, gcl, cfg, out)
        f1, b1, fused1 = time_config(z, y, la, cfg, out)
        print(f"   GCL vs LA at that config: fwd {f2:.3f} vs {f1:.3f}, bwd {b2:.3f} vs {b1:.3f}, "
              f"fused {fused2:.3f} vs {fused1:.3f} ms")
        rows.append(dict(N=N, C=C, dtype=dname, gcl=dict(fwd=f2, bwd=b2, fused=fused2),
                         la=dict(fwd=f1, bwd=b1, fused=fused1), config=cfg.__dict__))
        # GCL's own best gradient-in-forward tile: a whole-row tile draws the noise once, a column loop twice
        gcl_best = None
        for bn, w in itertools.product(sorted({2048, 8192, min(16384, tiles.next_pow2(C))}), [4, 8, 16]):
            gcfg = launch.pick_tiles(N, C, z.device, block_m=1, block_n=bn, num_warps=w, num_stages=3)
            g_fused = _try_bench(functools.partial(launch.forward, z, y, gcl, grad_out=out, config=gcfg),
                                 f"GCL {gcfg}", rep=20)
            if g_fused is None:
                continue
            if gcl_best is None or g_fused < gcl_best[0]:
                gcl_best = (g_fused, gcfg)
        if gcl_best is not None:
            print(f"   GCL best fused: {gcl_best[0]:.3f} ms ({gcl_best[0] / fl:.2f}x) with {gcl_best[1]}")
            rows.append(dict(N=N, C=C, dtype=dname, gcl_best_fused=gcl_best[0], config=gcl_best[1].__dict__))
        del z, out
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "tune_tiles.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
