#!/usr/bin/env bash
# tokamax's ragged_dot beside the fused layer, on a GPU machine that bench/gpu_check.sh has just
# checked: the check's state directory in /tmp holds the staged package and the wheels its build
# took. tokamax's releases for the image's jax 0.11 import xprof, a 32 MB wheel that does not fit
# beside .whl/ in what one call carries, so its wheels travel alone:
#
#   make gpu-tokamax-wheels     # here first: requirements-gpu-tokamax.lock into .whl-tokamax/
#   run  command: bash bench/gpu_tokamax.sh
#        carry:   [".whl-tokamax"]
#        timeout_s: 300
#
# writes $OUT/gpu-tokamax.json (else in the state directory): bench.gpu's document for
# CCF_GPU_BENCH_IMPLS (default fused,tokamax,tokamax_triton,roof) at CCF_GPU_BENCH_CONFIGS
# (default Qwen3-30B-A3B). Its configurations go into the check's results file as a rerun.
# Further arguments go to bench.gpu (`--quick` with CCF_GPU_BENCH_CONFIGS=quick rehearses it on
# a CPU after `make gpu-check-dry`).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
# `|| true`: with no check's state here (a fresh machine), ls fails, and pipefail would end the
# script before it says why.
STATE=$(ls -dt /tmp/ccf-gpu-check.* 2>/dev/null | head -1 || true)
if [ -z "$STATE" ] || [ ! -d "$STATE/pkg" ]; then
  echo "no package staged by bench/gpu_check.sh on this machine: run the check first, in the" \
    "same warm lease (a machine started afresh has none)" >&2
  exit 1
fi
source "$REPO/bench/gpu_build.sh"  # staged_python, install_wheels
staged_python "$STATE"
install_wheels "$REPO/.whl-tokamax" "$STATE/tokamax"
export PYTHONPATH=$PYTHONPATH:$STATE/tokamax
"$PY" -m bench.gpu --impls "${CCF_GPU_BENCH_IMPLS:-fused,tokamax,tokamax_triton,roof}" \
  --configs "${CCF_GPU_BENCH_CONFIGS:-Qwen3-30B-A3B}" --out "${OUT:-$STATE}/gpu-tokamax.json" "$@"
