#!/usr/bin/env bash
# How the extensions are built for a GPU machine's Python: the wheels carried in .whl/ go into a
# scratch site on PYTHONPATH, then CMake builds against them. bench/gpu_check.sh sources this file
# on the GPU machine; `make gpu-wheels` runs it here, with the GPU image's Python
# (.venv-gpu-image), to carry a CUDA extension built in advance in .whl/cuda-$CCF_CUDA_ARCH/: its
# nvcc compile takes minutes the lease cannot spare, while the CPU extension builds there in
# seconds. gpu_check.sh uses the carried one only while the extension's sources match .whl/COMMIT, and
# builds its own when the carried one does not load on the image.
#
# Run as a program: PYTHON (default python3), CCF_CUDA_ARCH (default 90a); the build tree stays
# in build/gpu-image-$CCF_CUDA_ARCH so that a later run recompiles only what changed.

# staged_python STATE: what a GPU check's Python imports, from its state directory STATE: the
# copy of jax_ccfuser/ with the built extensions (STATE/pkg), the carried wheels (STATE/site), then
# the repository (bench/, tests/). The repository's own jax_ccfuser/ (no extensions in it) must
# not shadow the staged copy: no Python, nor any it starts (a test's subprocess), puts the working
# directory on its path. Sets SITE, BUILD (CMake's tree) and PKG.
staged_python() {
  SITE=$1/site
  BUILD=$1/build
  PKG=$1/pkg
  export PYTHONSAFEPATH=1
  export PYTHONPATH=$PKG:$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1
}

# install_wheels DIR SITE: DIR's wheels into SITE; fails when they do not install.
install_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$2" "$1"/*.whl
}

# cmake_build BUILD CUDA [TARGET...]: configures BUILD for $PY with CCF_ENABLE_CUDA=CUDA (ON or
# OFF, CUDA for $CCF_CUDA_ARCH) and builds TARGETs (all without any). What the build imports
# (nanobind, CUTLASS's headers, OpenBLAS) comes from PYTHONPATH.
cmake_build() {
  local build=$1 cuda=$2 generator=() targets=() target
  shift 2
  command -v ninja >/dev/null && generator=(-G Ninja)
  for target in "$@"; do targets+=(--target "$target"); done
  cmake -S "$REPO" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCCF_ENABLE_CUDA="$cuda" -DCCF_CUDA_ARCHITECTURES="$CCF_CUDA_ARCH" \
    -DPython_EXECUTABLE="$(command -v "$PY")" || return
  cmake --build "$build" -j "$(nproc)" "${targets[@]}"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  PY=${PYTHON:-python3}
  CCF_CUDA_ARCH=${CCF_CUDA_ARCH:-90a}
  build=$REPO/build/gpu-image-$CCF_CUDA_ARCH
  # Installed again only when other wheels came: fresh copies of CUTLASS's headers would make
  # ninja recompile every kernel.
  wheels=$(cd "$REPO/.whl" && ls ./*.whl)
  if [ "$(cat "$build/site.wheels" 2>/dev/null)" != "$wheels" ]; then
    rm -rf "$build/site"
    install_wheels "$REPO/.whl" "$build/site"
    echo "$wheels" >"$build/site.wheels"
  fi
  PYTHONPATH=$build/site cmake_build "$build" ON _ccfuser_cuda
  out=$REPO/.whl/cuda-$CCF_CUDA_ARCH
  rm -rf "$out"
  mkdir -p "$out"
  cp "$build"/_ccfuser_cuda*.so "$out/"
  echo "carried CUDA extension: $(ls "$out")"
fi
