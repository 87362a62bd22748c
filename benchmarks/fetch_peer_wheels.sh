#!/usr/bin/env bash
# The optional benchmark peers, as wheels for the device machine (Python 3.12, x86-64; nothing can be downloaded
# there): run here, in the repo root, before a device session, then name .whl in the device call's `carry`.
# benchmarks/gpu_session.sh installs whatever lies in .whl/. Both are pure Python and need only torch and triton,
# which the device image has. .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls .whl
