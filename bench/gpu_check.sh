#!/usr/bin/env bash
# One command that checks a GPU machine end to end, in under 8 minutes, for the lent H200 as it
# is (Python 3.12 with jax 0.11 and its CUDA plugin, nvcc, CMake, ninja, compute-sanitizer; no
# package registry: what else the build needs travels in .whl/). Stages, each under its own
# time limit inside one budget, each recorded whether it passes or not:
#
#   0 env        device, driver, jax, packages, nvcc, commit (.whl/COMMIT where .git did not travel)
#   1 build      the carried wheels into a scratch site, the extensions with CMake (CUDA for
#                $CCF_CUDA_ARCH, default 90a), staged beside a copy of the package; the CUDA
#                extension that `make gpu-wheels` built is used instead of nvcc's minutes here
#                while its sources match .whl/COMMIT and it loads (bench/gpu_build.sh)
#   2 tests      pytest tests/test_cuda.py (junit XML, -v log; a per-test limit where
#                pytest-timeout is installed)
#   2b triage    only where tests failed: the failed ones again with each switch that turns off
#                a path the host checks cannot run (JAX_CCFUSER_GROUPED_GEMMS=0: the SM80
#                kernels instead of CUTLASS's grouped GEMMs; JAX_CCFUSER_SOURCE_PHASES=0: the
#                GEMMs after every source's rows are in), so one run says where a failure lies
#   3 sanitizer  compute-sanitizer memcheck, racecheck, synccheck and initcheck on a small
#                emulated forward+backward (`python -m bench.gpu_check workload`; initcheck on
#                its float32 calls, one of them in one-tile chunks); the four run beside stage 2
#                (nothing there is timed)
#   4 kernels    python -m bench.kernels: the fused layer's (and the roof's) GPU time kernel by
#                kernel, from jax's profiler, at the benchmark's shapes
#   5 benchmark  python -m bench.gpu: fused_moe_emulated (D=8) vs ragged_dot (jax's; tokamax's
#                is recorded as not run: its wheels travel alone, bench/gpu_tokamax.sh) vs
#                all_to_all_moe on the one GPU vs the dense roof, bfloat16, forward and
#                forward+backward
#   6 report     bench/results/gpu-<date>-<commit>.json and its .log, copied into $OUT when
#                set; a summary table printed last. Written whatever failed before.
#
# From the dev machine (the device tool's `run`; nothing else to install there):
#   make gpu-wheels      # here first: wheels, the CUDA extension and the commit stamp into .whl/
#   run  command: bash bench/gpu_check.sh
#        carry:   [".whl"]
#        timeout_s: 540
#        kind:    nvidia-h200 (the earlier results' card; an H100's 60 GiB XLA pool cannot hold
#                 the ragged_dot baseline's 64 GiB float32 expansion at Qwen3-30B-A3B, which is
#                 then recorded as not compiled)
# then copy the returned gpu-*.json and gpu-*.log from files_at into bench/results/.
#
# Environment: CCF_GPU_CHECK_DRY=1 rehearses on a machine without a GPU (the tests run on the
# CPU backend via CCF_CUDA_TESTS_PLATFORM=cpu, no sanitizer, a tiny CPU benchmark; results go to
# the state directory, never bench/results); CCF_GPU_BENCH_IMPLS (comma-separated) times only
# those of the benchmark's programs; CCF_GPU_BENCH_CONFIGS (comma-separated) profiles and times
# only those shapes, in that order; CCF_GPU_CHECK_BUDGET_S (default 470) is the total
# time; CCF_ENABLE_CUDA (default ON; in a dry run the carried extension or none),
# CCF_CUDA_ARCH (default 90a); PYTHON (default python3), with no jax_ccfuser installed.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
DRY=${CCF_GPU_CHECK_DRY:-0}
BUDGET=${CCF_GPU_CHECK_BUDGET_S:-470}
export CCF_CUDA_ARCH=${CCF_CUDA_ARCH:-90a}
# A dry run builds no CUDA code of its own (a machine without a GPU may have no nvcc): it takes
# the carried extension where that fits the tree, else none.
CUDA_BUILD=${CCF_ENABLE_CUDA:-$([ "$DRY" = 1 ] && echo CARRIED || echo ON)}
CARRY=$REPO/.whl
STATE=$(mktemp -d /tmp/ccf-gpu-check.XXXXXX)
# install_wheels and cmake_build, shared with `make gpu-wheels`; staged_python, shared with
# bench/gpu_tokamax.sh.
source "$REPO/bench/gpu_build.sh"
staged_python "$STATE"  # SITE, BUILD, PKG: the tree stays untouched
if [ "$DRY" = 1 ]; then
  RESULTS=${CCF_GPU_CHECK_RESULTS:-$STATE/results}
else
  RESULTS=${CCF_GPU_CHECK_RESULTS:-$REPO/bench/results}
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))

export CCF_GPU_CHECK_DRY=$DRY
# Images often keep the CUDA tools outside PATH, and pip's cmake and ninja beside the Python.
for dir in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer \
  "$(dirname "$(command -v "$PY")")"; do
  [ -d "$dir" ] && PATH=$PATH:$dir
done
export PATH

echo "gpu_check: state in $STATE, budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', dry run')"

# Seconds a stage may take: its own maximum, cut so that `reserve` seconds stay for the stages
# after it; under 10 means it cannot run.
limit_for() {
  local max=$1 reserve=$2 left
  left=$((DEADLINE - $(date +%s) - reserve))
  echo $((left < max ? left : max))
}

record() {  # name status rc seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STATE/stages.tsv"
}

skip() {  # name note
  record "$1" skipped "" "" "" "$2"
  echo "-- $1: skipped ($2)"
}

# run_stage NAME MAX_S RESERVE_S COMMAND...: runs COMMAND under its limit, output into
# $STATE/NAME.log, and records the outcome.
run_stage() {
  local name=$1 max=$2 reserve=$3 limit start rc status ms seconds
  shift 3
  limit=$(limit_for "$max" "$reserve")
  if [ "$limit" -lt 10 ]; then
    skip "$name" "out of time (budget ${BUDGET}s)"
    return 1
  fi
  echo "-- $name (limit ${limit}s)"
  start=$(date +%s%N)
  # timeout signals its whole process group: a stage's children stop with it.
  timeout --kill-after=10 "$limit" "$@" >"$STATE/${name//:/-}.log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - start) / 1000000))
  seconds=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  case $rc in
    0) status=passed ;;
    124 | 137) status="timed out" ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$seconds" "$limit" ""
  echo "-- $name: $status after ${seconds%.*}s"
  [ "$rc" = 0 ] || tail -n 15 "$STATE/${name//:/-}.log" | sed 's/^/   | /'
  return "$rc"
}

# The staged package: a copy of jax_ccfuser/ with the built extensions, and the CUDA one carried
# in .whl/ when it fits this tree; where that one does not load here, it is built after all.
build() {
  if ls "$CARRY"/*.whl >/dev/null 2>&1; then
    install_wheels "$CARRY" "$SITE" || return
  else
    echo "no wheels in $CARRY: building with what the machine has"
  fi
  local carried="" cuda=$CUDA_BUILD
  if [ "$CUDA_BUILD" != OFF ] &&
    carried=$("$PY" -m bench.gpu_check carried "$CARRY" --arch "$CCF_CUDA_ARCH"); then
    cuda=OFF  # only the CPU extension to build
  elif [ "$CUDA_BUILD" = CARRIED ]; then
    cuda=OFF
  fi
  cmake_build "$BUILD" "$cuda" || return
  mkdir -p "$PKG"
  cp -r "$REPO/jax_ccfuser" "$PKG/"
  find "$PKG" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
  cp "$BUILD"/_ccfuser_*.so ${carried:+"$carried"} "$PKG/jax_ccfuser/"
  if [ -n "$carried" ] && ! check_extensions; then
    echo "cuda extension: the carried one does not load here; building it"
    cmake_build "$BUILD" ON || return
    cp "$BUILD"/_ccfuser_*.so "$PKG/jax_ccfuser/"
  elif [ "$cuda" = ON ]; then
    echo "cuda extension: built here"
  fi
  check_extensions
}

check_extensions() {
  "$PY" -c "
import jax_ccfuser as ccf
cuda = ccf._extension.cuda is not None
print('jax_ccfuser from', ccf.__file__, '| CUDA extension:', cuda)
assert ccf.__file__.startswith('$PKG/'), ('jax_ccfuser is imported from elsewhere than the staged '
    'build (an installed copy shadows it): run the check with a Python that has none installed')
assert cuda or '$CUDA_BUILD' != 'ON', 'built with CCF_ENABLE_CUDA=ON but no CUDA extension loads'"
}

tests() {
  local per_test=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120 --timeout-method=thread)
  "$PY" -m pytest tests/test_cuda.py -v -rA -p no:cacheprovider \
    --junitxml="$STATE/junit.xml" "${per_test[@]}"
}

# The switches stage 2b tries, one at a time.
TRIAGE_SWITCHES="JAX_CCFUSER_GROUPED_GEMMS=0 JAX_CCFUSER_SOURCE_PHASES=0"

triage() {  # VAR=VALUE: the tests stage's failed tests again with that switch set
  local ids=()
  mapfile -t ids < <(grep . "$STATE/failed.txt")
  # No ids would make pytest collect the whole suite.
  [ "${#ids[@]}" -gt 0 ] || { echo "triage: no failed tests to run again"; return 1; }
  if [ "$DRY" = 1 ]; then
    export CCF_CUDA_TESTS_PLATFORM=cpu JAX_PLATFORMS=cpu
  fi
  # A test that hung in stage 2 may hang again: stopped after 60 s, not the stage's whole limit.
  local per_test=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=60 --timeout-method=thread)
  env "$1" XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -v -rA -p no:cacheprovider \
    --junitxml="$STATE/junit-triage-$1.xml" "${per_test[@]}" "${ids[@]}"
}

sanitize() {  # tool
  # Exact buffer bounds (no pooled allocator) and no preallocation, so the four runs and the
  # tests share the GPU. memcheck watches every kernel, CUTLASS's grouped GEMMs too (they are
  # not in namespace ccf, and their TMA reads the bounds our problem tables give them);
  # racecheck and synccheck our kernels only (mangled "3ccf"). initcheck must see every write
  # of what it checks: kept to our kernels, it reported 316888 uninitialised reads on an H200
  # (those it printed in scatter_slots<float>, whose rows our expert_gemm writes), so it watches
  # every kernel of the float32 calls alone (which run none of CUTLASS's), without XLA's
  # autotuning (over every kernel of the whole workload it ran past 260 s, its findings in the
  # autotuner's), and leaves host copies unchecked where this compute-sanitizer offers that.
  local filter=() api=() calls=() print_limit=20
  case $1 in
    racecheck | synccheck) filter=(--kernel-name kns=3ccf) ;;
    initcheck)
      calls=(--dtypes float32)
      print_limit=200
      export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0"
      if compute-sanitizer --help 2>&1 | grep -q -- --check-api-memory-access; then
        api=(--check-api-memory-access no)
      fi
      ;;
  esac
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    compute-sanitizer --tool "$1" "${filter[@]}" "${api[@]}" --print-limit "$print_limit" \
    --error-exitcode 3 --target-processes application-only \
    --log-file "$STATE/compute-sanitizer-$1.log" "$PY" -m bench.gpu_check workload "${calls[@]}"
}

# The stages' shell functions run under `timeout` in a child bash.
export REPO PY STATE SITE BUILD PKG CARRY CUDA_BUILD DRY
export -f install_wheels cmake_build build check_extensions tests triage sanitize

# 0 env
run_stage env 120 0 "$PY" -m bench.gpu_check env "$STATE/env.json" --stamp "$CARRY/COMMIT"

# 1 build
# The build takes what it needs, leaving 150 s for the stages after it.
run_stage build "$BUDGET" 150 bash -c build
built=$?

# 2 tests and 3 sanitizer, side by side: up to 260 s each (they took 63-82 s on an H200). The
# benchmark then takes what is left, up to 300 s.
if [ "$built" != 0 ]; then
  skip tests "no build"
  for tool in memcheck racecheck synccheck initcheck; do skip "sanitizer:$tool" "no build"; done
else
  if [ "$DRY" = 1 ]; then
    CCF_CUDA_TESTS_PLATFORM=cpu JAX_PLATFORMS=cpu run_stage tests 260 100 bash -c tests &
  else
    XLA_PYTHON_CLIENT_PREALLOCATE=false run_stage tests 260 100 bash -c tests &
  fi
  for tool in memcheck racecheck synccheck initcheck; do
    if [ "$DRY" = 1 ]; then
      skip "sanitizer:$tool" "dry run"
    elif ! command -v compute-sanitizer >/dev/null; then
      skip "sanitizer:$tool" "compute-sanitizer not found"
    else
      run_stage "sanitizer:$tool" 260 100 bash -c "sanitize $tool" &
    fi
  done
  wait
  # 2b triage: up to 90 s a switch, where tests failed (after the sanitizers, which share the GPU)
  if "$PY" -m bench.gpu_check failed "$STATE" >"$STATE/failed.txt" && grep -q . "$STATE/failed.txt"
  then
    for switch in $TRIAGE_SWITCHES; do
      run_stage "triage:$switch" 90 130 bash -c "triage $switch"
    done
  fi
fi

# 4 kernels: up to 150 s (each shape compiles only the fused and roof programs; what a shape
# finished is kept when the limit stops it)
if [ "$built" != 0 ]; then
  skip kernels "no build"
elif [ "$DRY" = 1 ]; then
  JAX_PLATFORMS=cpu run_stage kernels 90 60 "$PY" -m bench.kernels --quick \
    --out "$STATE/kernels.json"
else
  run_stage kernels 150 120 "$PY" -m bench.kernels --out "$STATE/kernels.json" \
    ${CCF_GPU_BENCH_CONFIGS:+--configs "$CCF_GPU_BENCH_CONFIGS"}
fi

# 5 benchmark
if [ "$built" != 0 ]; then
  skip benchmark "no build"
elif [ "$DRY" = 1 ]; then
  JAX_PLATFORMS=cpu run_stage benchmark 150 15 "$PY" -m bench.gpu --quick \
    --out "$STATE/bench.json"
else
  run_stage benchmark 300 15 "$PY" -m bench.gpu --out "$STATE/bench.json" \
    ${CCF_GPU_BENCH_IMPLS:+--impls "$CCF_GPU_BENCH_IMPLS"} \
    ${CCF_GPU_BENCH_CONFIGS:+--configs "$CCF_GPU_BENCH_CONFIGS"}
fi

# 6 report
echo "-- report"
if ! "$PY" -m bench.gpu_check report "$STATE" --results "$RESULTS" ${OUT:+--out "$OUT"}; then
  # The report itself broke: hand back the raw outcomes and logs instead.
  [ -n "${OUT:-}" ] && tar --exclude=./site --exclude=./build --exclude=./pkg -C "$STATE" \
    -czf "$OUT/gpu-check-state.tgz" .
  cat "$STATE/stages.tsv"
  exit 2
fi
echo "total $(($(date +%s) - START))s"
# Exit status: 0 when every stage that ran passed.
awk -F'\t' '$2 != "passed" && $2 != "skipped" { bad = 1 } END { exit bad }' "$STATE/stages.tsv"
