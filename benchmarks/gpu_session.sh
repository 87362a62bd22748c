#!/usr/bin/env bash
# One device-machine session: install, then the GPU tests and the benchmarks, each step bounded so a short lease
# still brings back what finished. Everything is logged to $OUT/session.log; the benchmark tables land in
# $OUT/<device>/ (results.* and heads.*).
# Usage (device tool, repo root): bash benchmarks/gpu_session.sh [all|more|shards|lade|tests|bench|heads]
#   [extra bench args]
# A session has 15 minutes of device time, a machine's start (a minute or more) included, and one call runs at most
# 600 s: one call is all a lease holds. So every mode runs against one deadline, FASTLT_SESSION_S seconds (default
# 575) from the script's start: each step's bound is cut to the time left, and a step with under 20 s left is
# skipped (logged), so the last steps give way, never the call's limit (which would lose $OUT's tail).
# `all` (the default; run it with timeout_s 600) takes issue 17's measurements in order of worth:
#   1. the whole test suite natively, spread over the machine's cores with pytest-xdist (the image has it; the time
#      goes to compiling kernels), while benchmarks/warm_kernels.py compiles the benchmarks' kernels beside it;
#   2. both benchmark tables' logits losses, each case eager and replayed from a CUDA graph;
#   3. the A/B of issue 17's six switches (benchmarks/ab_switches.py: pipelined loops, two-row bf16 tiles, whole-row
#      tiles and their 64-register cap, LADE's 64-row column partials, per-thread statistics);
#   4. the heads' table (1M classes included; saved row by row);
#   5. the host path on that host's CPU (kernels stubbed) beside F.cross_entropy;
#   6. what time is left: Triton's launch cost in a logits step's profile, the heads' CUDA time kernel by kernel.
# `more`, for a second lease: the profiles, the gradient-in-forward grids (STORE_P on and off) and the mixup table.
# `shards` (class parallel, ~400 s), `lade` (LADE's tile sweep) and the row kernel's tile sweep
# (benchmarks/tune_tiles.py without flags, ~90 s) each need a lease of their own.
# Optional peers travel as wheels in .whl/ (git-ignored; benchmarks/fetch_peer_wheels.sh fills it; carry [".whl"]).
set -uo pipefail
OUT=${OUT:-/tmp/fastlt-out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . >/dev/null || exit 1
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
# SIGINT at the bound (then SIGKILL 3 s later): pytest still prints its summary of failures, a Python script stops
# with KeyboardInterrupt after what it saved (SIGTERM left pytest's dots only)
SESSION_S=${FASTLT_SESSION_S:-575}
left() { echo $((SESSION_S - SECONDS)); }
step() {
  local limit=$1 left; shift; left=$(left)
  if (( left < 20 )); then echo "## [$(date +%T)] skipped (${left} s left): $*" | tee -a "$LOG"; return 0; fi
  (( limit > left )) && limit=$left
  echo "## [$(date +%T)] (bound ${limit} s of ${left} s left) $*" | tee -a "$LOG"
  timeout -s INT -k 3 "$limit" "$@" 2>&1 | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"
# pytest-xdist spreads the kernels' compiles over the cores; without it the suite runs in one process
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 11")
all() {
  # beside the tests, 4 processes compile the benchmarks' kernels into Triton's on-disk cache (~100 kernels, ~1-3 s
  # each, one after another in a timed run: most of its bound), ab_switches.py's too; the timed runs then load them
  local warm_s=150
  timeout -s INT -k 3 "$warm_s" python3 benchmarks/warm_kernels.py --jobs 4 > "$OUT/warm.log" 2>&1 &
  local warm=$!
  # shellcheck disable=SC2086
  # -v: under xdist a failure prints as it happens (the summary at the end is lost when the bound stops the run)
  step "$warm_s" python3 -m pytest tests -v -p no:cacheprovider -rf $XDIST --ignore=tests/test_kernels_sm90_compile.py
  wait "$warm"; tee -a "$LOG" < "$OUT/warm.log" | tail -n 3
  # every case eager and replayed from a CUDA graph (the graph column: kernel time without host time)
  step 165 python3 -m fastlt bench --no-compile --no-official --out "$OUT" "$@"
  # issue 17's untimed switches, each off and on (rows print as they come)
  step 120 python3 benchmarks/ab_switches.py
  step 110 python3 -m fastlt bench --heads --out "$OUT"  # (the extra args are the logits table's)
  # the host path on that host's CPU (kernels stubbed) beside F.cross_entropy; profile_step has the real launches
  step 20 python3 benchmarks/host_overhead.py
  step 40 python3 benchmarks/profile_step.py 4096 8142 fp32
  step 45 python3 benchmarks/profile_heads.py
}
more() {
  step 60 python3 benchmarks/profile_step.py 4096 8142 fp32
  step 45 python3 benchmarks/profile_heads.py
  step 70 python3 benchmarks/tune_tiles.py --fused --out "$OUT"
  # class-probability targets (mixup; floor 3 N C bytes) beside the pair form (issue 21); a folder of its own
  step 100 python3 -m fastlt bench --loss la_soft --shapes 4096x8142 4096x131072 --no-official --out "$OUT/soft"
}
lade() {
  step 105 python3 benchmarks/tune_tiles.py --lade --out "$OUT"
}
shards() {
  # class parallel (issue 19): each rank's local phase at its shard for W = 1..64 (bounded; a lease of its own)
  step 400 python3 -m fastlt bench --shards 1 2 4 8 16 32 64 --out "$OUT" "$@"
}
case "$what" in
  all) all "$@" ;;
  more) more ;;
  shards) shards "$@" ;;
  lade) lade ;;
  tests) step 560 python3 -m pytest tests -q -p no:cacheprovider -rf --durations=5 ;;
  heads) step 560 python3 -m fastlt bench --heads --out "$OUT" "$@" ;;
  bench) step 560 python3 -m fastlt bench --out "$OUT" "$@" ;;
  *) echo "unknown mode '$what': all, more, shards, lade, tests, heads or bench" | tee -a "$LOG"; exit 2 ;;
esac
echo "## [$(date +%T)] done" | tee -a "$LOG"
