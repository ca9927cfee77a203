"""Build files: BUILD (Bazel) and CMakeLists.txt build every native file on disk, the x86-64 flag
stays behind its processor check, and the installed distribution carries the package's version.

Bazel's C++ rules cannot be fetched here, so this is the check that keeps BUILD honest.
"""

import importlib.metadata
import pathlib
import re
import shutil
import subprocess

import pytest

import jax_ccfuser

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = (".cc", ".cu")
HEADER_SUFFIXES = (".h", ".cuh")
# Build outputs, environments and caches: nothing in them is the project's own source.
NOT_SOURCE = {"build", "demo_out"}
# Host programs that a test compiles itself (test_device_code_on_host), not parts of the extension.
TEST_PROGRAMS = {"tests/gemm_layouts.cu", "tests/pair_rows.cu", "tests/barrier_protocol.cu",
                 "tests/weight_gradient_chunks.cu", "tests/slot_sums.cu", "tests/row_passes.cu",
                 "tests/launch_order.cu", "tests/handler_paths.cu", "tests/activation_values.cc",
                 "tests/work_list.cu", "tests/fetch_rows.cu", "tests/expert_gemm_tiles.cu"}
NATIVE_FILE = re.compile(r'"([\w./-]+\.(?:cc|cu|h|cuh))"')


def _on_disk(suffixes):
  """Every file under the repository with one of `suffixes`, wherever a directory holds one."""
  return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
          if p.suffix in suffixes and p.is_file()
          and not any(part.startswith(".") or part in NOT_SOURCE
                      for part in p.relative_to(ROOT).parts[:-1])}


def _cmake_sources():
  text = (ROOT / "CMakeLists.txt").read_text()
  lists = re.findall(r"set\((CCF_\w+_SOURCES)(.*?)\)", text, flags=re.S)
  assert {name for name, _ in lists} == {"CCF_CPU_SOURCES", "CCF_CUDA_SOURCES"}
  return {name: set(re.findall(r"[\w./-]+\.(?:cc|cu)\b", body)) for name, body in lists}


def _bazel_files():
  """The native files BUILD names, its `glob([...])` patterns expanded as Bazel would."""
  text = (ROOT / "BUILD").read_text()
  named = set(NATIVE_FILE.findall(re.sub(r"glob\(\[.*?\]\)", "", text, flags=re.S)))
  for patterns in re.findall(r"glob\(\[(.*?)\]\)", text, flags=re.S):
    for pattern in re.findall(r'"([^"]+)"', patterns):
      named |= {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}
  return named


def test_bazel_and_cmake_name_the_same_sources():
  cmake = _cmake_sources()
  bazel = {f for f in _bazel_files() if f.endswith(SOURCE_SUFFIXES)}
  assert bazel == cmake["CCF_CPU_SOURCES"] | cmake["CCF_CUDA_SOURCES"]


def test_every_native_source_is_built():
  cmake = _cmake_sources()
  assert (_on_disk(SOURCE_SUFFIXES) - TEST_PROGRAMS
          == cmake["CCF_CPU_SOURCES"] | cmake["CCF_CUDA_SOURCES"])


def test_bazel_names_every_header_on_disk():
  bazel = {f for f in _bazel_files() if f.endswith(HEADER_SUFFIXES)}
  assert bazel == _on_disk(HEADER_SUFFIXES)


def _march_block():
  """CMakeLists.txt's one `if(CMAKE_SYSTEM_PROCESSOR ...)` block that adds a `-march` flag."""
  text = (ROOT / "CMakeLists.txt").read_text()
  blocks = re.findall(r"^if\(CMAKE_SYSTEM_PROCESSOR .*?^endif\(\)\n", text, flags=re.S | re.M)
  guarded = [b for b in blocks if "-march" in b]
  assert len(guarded) == 1, blocks
  return guarded[0]


def test_march_appears_only_in_its_processor_check():
  text = (ROOT / "CMakeLists.txt").read_text()
  assert text.replace(_march_block(), "").count("-march") == 0


def _cxx_flags_on(tmp_path, processor):
  """The compile options CMakeLists.txt's `-march` block leaves on `_ccfuser_cpu` for `processor`.

  Configures a project of one empty target with the block copied verbatim (no Python or XLA
  needed; a second or two).
  """
  (tmp_path / "empty.cc").write_text("")
  (tmp_path / "CMakeLists.txt").write_text(
      "cmake_minimum_required(VERSION 3.24)\n"
      "project(march_check LANGUAGES CXX)\n"
      "add_library(_ccfuser_cpu STATIC empty.cc)\n"
      f'set(CMAKE_SYSTEM_PROCESSOR "{processor}")\n'
      + _march_block() +
      "get_target_property(options _ccfuser_cpu COMPILE_OPTIONS)\n"
      'message(STATUS "options=[${options}]")\n')
  run = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build")],
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  return re.search(r"options=\[(.*?)\]", run.stdout).group(1)


# An isolated build may take CMake from PyPI into its build environment: then none is left here.
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake on PATH")
@pytest.mark.parametrize("processor, march", [
    ("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False), ("ppc64le", False),
])
def test_march_only_on_x86_64(tmp_path, processor, march):
  assert ("-march=x86-64-v2" in _cxx_flags_on(tmp_path, processor)) == march


def test_version_is_the_distributions():
  assert jax_ccfuser.__version__ == importlib.metadata.version("jax_ccfuser")
