"""GCL on the CPU (the reference path, ``backend='torch'``) beside the official-style GCL (``torch.randn``, abs, clamp,
cross-entropy), and fastlt's counter-based noise beside ``torch.randn``: ``python benchmarks/cpu_gcl.py [N C]``
(default 512 x 8142, the iNaturalist width; torch's threads as set, e.g. ``OMP_NUM_THREADS=2``). Best of 9, ms,
the two sides of each ratio timed in turns.

fastlt's noise is a function of (seed, row, class) (Philox4x32-7 and a table of levels, the kernels' numbers), so
it costs more than ``randn``'s stream; the goal is GCLLoss forward + backward within 1.2x of the official style.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlt
from fastlt._bench_harness import best_in_turns
from fastlt.noise import gcl_noise


def _best_ms(*fns, repeat: int = 9) -> list[float]:
    """The best of ``repeat`` timings of each of ``fns``, in ms, taken in turns."""
    return [t * 1e3 for t in best_in_turns(*fns, repeat=repeat)]


def _official(z, y, cloud, m=0.5, s=30.0, noise_mul=1.0):
    """The official GCL loss's arithmetic: half-normal noise from randn, clipped, then CE of the scaled logits."""
    noise = torch.randn(z.shape).abs().div(3.0).clamp(max=1.0)
    a = z - noise_mul * noise * cloud[None, :]
    a = a - m * F.one_hot(y, z.shape[1]).to(a.dtype)
    return F.cross_entropy(s * a, y)


def main(N: int = 512, C: int = 8142) -> None:
    torch.manual_seed(0)
    counts = torch.randint(1, 1000, (C,))
    z = torch.randn(N, C, requires_grad=True)
    y = torch.randint(0, C, (N,))
    cloud = fastlt.priors.gcl_cloud(counts)
    crit = fastlt.GCLLoss(counts, backend="torch")
    noise, randn = _best_ms(lambda: gcl_noise(3, N, C), lambda: torch.randn(N, C))
    ours, theirs = _best_ms(lambda: crit(z, y).backward(), lambda: _official(z, y, cloud).backward())
    print(f"CPU, {N} x {C}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"  fastlt.noise.gcl_noise      {noise:8.1f} ms   ({noise / randn:.2f}x torch.randn {randn:.1f} ms)")
    print(f"  GCLLoss fwd+bwd (reference) {ours:8.1f} ms   ({ours / theirs:.2f}x official-style {theirs:.1f} ms)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("N", type=int, nargs="?", default=512, help="rows (default %(default)s)")
    parser.add_argument("C", type=int, nargs="?", default=8142, help="classes (default %(default)s)")
    a = parser.parse_args()
    main(a.N, a.C)
