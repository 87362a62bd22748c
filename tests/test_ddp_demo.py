"""The README's data-parallel example, ``torchrun --standalone --nproc_per_node 2 -m fastlt.ddp_demo`` on the CPU
(gloo): it prints the demo's table, and every method trained on the batch split over 2 ranks with ``dp_group``
scores as the single-process run (GCL aside: its stage-2 sampler slices one stream per rank, which gives rows other
noise rows)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

from fastlt.demo import METHODS, run_demo  # noqa: E402

pytestmark = pytest.mark.distributed


def _table(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Method")) + 2
    rows = {}
    for line in lines[start:start + len(METHODS)]:
        name = next(m for m in METHODS if line.startswith(m + " "))
        rows[name] = line[len(name):].split()[:5]  # the five accuracies; not the time
    return rows


def test_torchrun_ddp_demo_matches_one_process():
    """A negative seed too: GCL's stage-2 sampler on several ranks took ``seed + 4``, outside its seed range."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun (installed with torch) is not on the path"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fastlt.ddp_demo",
                          "--quick", "--no-progress", "--seed", "-10"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "2 data-parallel ranks" in run.stdout
    got = _table(run.stdout)
    want = run_demo(seed=-10, quick=True, progress=False)
    assert list(got) == list(METHODS)
    for name in METHODS:
        if name != "GCL":
            expected = [f"{100 * want[name][k]:.1f}" for k in ("overall", "balanced", "many", "medium", "few")]
            assert got[name] == expected, (name, got[name], expected)
