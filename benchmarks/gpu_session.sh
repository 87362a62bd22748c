#!/usr/bin/env bash
# One device-machine session: install, run the test suite natively on the GPU, then the benchmark.
# Usage (device tool, repo root): bash benchmarks/gpu_session.sh [tests|bench ARGS...]
# Optional peers travel as wheels in .whl/ (git-ignored; see README "Benchmarks").
set -uo pipefail
OUT=${OUT:-/tmp/fastlt-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . || exit 1
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
if [ "$what" = tests ] || [ "$what" = all ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
  python3 -m pytest tests -q -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -c "import sys; from fastlt.bench import main; sys.exit(main(sys.argv[1:]))" "$@" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
