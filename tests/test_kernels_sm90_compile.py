"""The kernels compile for an H100 (sm_90) with the real Triton compiler, no GPU needed, spill nothing inside their
loops, and software-pipeline the loads of the row kernels' column loops (async copies in the main loop's SASS).

The rest of the suite runs the kernels in the interpreter, which never compiles them: a constexpr branch that
the compiler rejects, or a tile that spills registers in its column loop, would only show on a GPU. This runs
``tools/kernel_report.py --check`` in a fresh process without ``TRITON_INTERPRET`` (triton compiles to
cubin with its bundled ptxas), over the default launches of every path (logit adjustment, GCL, LADE, split
rows, gradient in forward, a whole-row tile, the cosine head, the heads' one-launch rescale)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import kernel_report as K

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_without_spills_in_loops():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_report.py"), "--check"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:  # a Triton whose private compile API tools/kernel_report.py does not know
        pytest.skip(proc.stdout.strip()[-300:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    kernels = {ln.split("|")[2].strip() for ln in table[1:]}
    assert {"row_loss_forward", "row_loss_grad", "row_loss_combine", "reduce_rows", "lade_columns",
            "_normalize_fwd", "scale_rows"} <= kernels, kernels
    header = table[0].split("|")
    main = header.index(" main loop pipelined ")
    piped = [ln.split("|")[main].strip() for ln in table[2:] if "STAGES=3" in ln and "SINGLE_TILE" not in ln]
    assert piped, table
    if K.performance_gated():  # (triton 3.4-3.5, the declared floor, pipeline fewer loops: slower, not wrong)
        assert set(piped) == {"yes"}, piped  # --check fails on a "no" too: this says the column is read


_PHILOX_DEBUG_COMPILE = '''
import re
import torch
import triton
import triton.language as tl
from fastlt.kernels.philox_noise import philox4x32
from tools.kernel_report import UnsupportedTriton, compile_for


@triton.jit
def words(c_ptr, out_ptr, seed, WIDE: tl.constexpr):
    i = tl.arange(0, 64)
    c = tl.load(c_ptr + i).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = philox4x32(seed, c, c, 7, WIDE)
    tl.store(out_ptr + i, (w0 ^ w1 ^ w2 ^ w3).to(tl.int32, bitcast=True))


for wide in (False, True):
    args = (torch.zeros(64, dtype=torch.int32), torch.empty(64, dtype=torch.int32), 2**40 + 3)
    try:
        ttir = compile_for(words, args, dict(WIDE=wide, debug=True), 90).asm["ttir"]
    except UnsupportedTriton as exc:
        print("unsupported", exc)
        raise SystemExit(3)
    found = re.findall(r"overflow detected for operation [a-z]+", ttir)
    print("WIDE", wide, "debug asserts", "tt.assert" in ttir, found)
    assert not found, found
'''


def test_philox_adds_no_overflow_asserts_to_a_debug_build(tmp_path):
    """Philox's products wrap by design: with ``TRITON_DEBUG=1`` (``debug=True``) a 32-bit multiply that Triton may
    check gets an assert that fails for nearly every counter (a debug run of any GCL step would stop there). Both
    forms of the products compile with ``debug=True`` and no overflow check (the interpreter adds none, so only a
    compile shows it)."""
    script = tmp_path / "philox_debug.py"
    script.write_text(_PHILOX_DEBUG_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip()[-300:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("debug asserts") == 2, proc.stdout
