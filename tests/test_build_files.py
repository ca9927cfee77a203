"""BUILD (Bazel) and CMakeLists.txt must build the same sources.

Bazel's C++ rules cannot be fetched here, so this is the check that keeps BUILD honest.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = re.compile(r"\b((?:xla_ffi|cuda)/[\w./]+\.(?:cc|cu))\b")


def _cmake_sources():
  text = (ROOT / "CMakeLists.txt").read_text()
  lists = re.findall(r"set\((CCF_\w+_SOURCES)(.*?)\)", text, flags=re.S)
  assert {name for name, _ in lists} == {"CCF_CPU_SOURCES", "CCF_CUDA_SOURCES"}
  return {name: set(SOURCE.findall(body)) for name, body in lists}


def test_bazel_and_cmake_name_the_same_sources():
  cmake = _cmake_sources()
  bazel = set(SOURCE.findall((ROOT / "BUILD").read_text()))
  assert bazel == cmake["CCF_CPU_SOURCES"] | cmake["CCF_CUDA_SOURCES"]


def test_every_native_source_is_built():
  cmake = _cmake_sources()
  on_disk = {str(p.relative_to(ROOT)) for d in ("xla_ffi", "cuda") for p in (ROOT / d).glob("*")
             if p.suffix in (".cc", ".cu")}
  assert on_disk == cmake["CCF_CPU_SOURCES"] | cmake["CCF_CUDA_SOURCES"]


def test_headers_exist():
  for header in re.findall(r'"((?:xla_ffi|cuda)/[\w./]+\.cuh?|(?:xla_ffi)/[\w./]+\.h)"',
                           (ROOT / "BUILD").read_text()):
    assert (ROOT / header).exists(), header
