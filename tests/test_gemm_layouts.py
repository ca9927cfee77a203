"""expert_gemm's configurations checked on the host (tests/gemm_layouts.cu): every copy moves each
element where its kernel expects it, ldmatrix's exchange between lanes simulated as PTX defines
it. The kernels cannot run without a GPU; their layouts can be evaluated anywhere nvcc and the
CUTLASS headers are."""

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _nvcc():
  for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
    if candidate and pathlib.Path(candidate).is_file():
      return candidate
  return None


def _cutlass_include():
  try:
    import cutlass_library
  except ImportError:
    return None
  include = pathlib.Path(cutlass_library.__file__).parent / "source" / "include"
  return include if (include / "cute" / "tensor.hpp").is_file() else None


@pytest.mark.slow
def test_every_configuration_moves_each_element_where_its_mma_reads_it(tmp_path):
  nvcc, include = _nvcc(), _cutlass_include()
  if nvcc is None or include is None:
    pytest.skip("needs nvcc and the nvidia-cutlass headers, as the CUDA build does")
  binary = tmp_path / "gemm_layouts"
  subprocess.run([nvcc, "-std=c++17", "-O0", f"-I{REPO}", f"-I{include}", "-o", str(binary),
                  str(REPO / "tests" / "gemm_layouts.cu")], check=True, capture_output=True)
  run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  verdicts = [line for line in run.stdout.splitlines() if line.endswith(": ok")]
  # bfloat16, float16, float32 as TF32 and float32, each for its three operand layouts.
  assert len(verdicts) == 12, run.stdout
  assert run.stdout.splitlines()[-1] == "errors: 0"
