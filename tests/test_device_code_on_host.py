"""The CUDA path's device code checked on the host, where no GPU runs its kernels but the CUDA
toolkit's and CUTLASS's headers compile it: expert_gemm's configurations (tests/gemm_layouts.cu:
every copy moves each element where its kernel expects it, ldmatrix's exchange between lanes
simulated as PTX defines it, and its loads, from pair rows and experts' weights with partial tiles,
put each operand element where its layout says) and its kernel whole (tests/expert_gemm_tiles.cu:
every configuration's products over a work list, pair rows times an expert's weights (in source
phases too), GEMM1's activation, the backward's u GEMM and weight gradients in chunks, exact, with
host stand-ins for cp.async, ldmatrix and mma.sync), the activation passes' row functions
(tests/pair_rows.cu: four columns a lane give the bytes one column a lane and the formula give) and
the passes themselves (tests/row_passes.cu: their one-wave walk visits each row of the pass once and
writes no other, the grouped GEMMs' problems, as their kernel writes them and a model of CUTLASS's
GEMM runs them, give the rows the passes read, expert_gemm's source phases compute each tile once,
and its epilogues, on the product its loads index, write what the passes write), the work list the
kernels build from every source's ids (tests/work_list.cu: the CPU handler's list of the same call,
however the blocks run, with plans of any content, bad ids and an aborted barrier), the dispatch's
fetch of the rows (tests/fetch_rows.cu: each pair's scratch row holds its source's row, on every
grid the launcher gives, each needed source row is read once and no other row read or written), the
weight gradients' sums over a work list in chunks (tests/weight_gradient_chunks.cu: expert_gemm's
units, carry loads and epilogue stores, and the grouped GEMMs' problems as their kernel writes them,
the modelled GEMM over them and the carries' final stores, each element written once with its exact
sum), the combine's kernels (tests/slot_sums.cu: the staging's slots summed in the promised order
bitwise however the list runs, no slot read that the call never wrote), the device barrier's
protocol between GPUs (tests/barrier_protocol.cu: its steps run by host threads, with members late,
dead, out of step or giving up), the handler's launch sequence (tests/launch_order.cu:
xla_ffi/cuda/cuda_launch.cc against stubs of the CUDA runtime and of the launchers, its two streams
and the peers ordered by events and barriers, its scratch inside its regions and each region read,
and its barriers kept in step through a failure at each of its calls) and the handler above it
(tests/handler_paths.cu: MoeForwardImpl and MoeBackwardImpl with XLA's scratch allocator, the device
state and its fault record, the peers met on host threads, in this process and across processes,
each GPU either enqueueing both its barriers or stopped for good through a failure at each of its
calls, and a fault an earlier call found reported once). Kernels with warp collectives or block
barriers run a warp's 32 lanes or a block's threads as fibers (tests/warp_lanes.h).

The checks are host code only, so the host compiler builds them from the toolkit's headers: nvcc
would add a device pass over every CuTe template they instantiate (155 s against 65 s on 2
cores for the layouts, for the same verdicts)."""

import concurrent.futures
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _cuda_includes():
  """The include folders nvcc passes its host compiler (CUDA 13 keeps libcu++, which CUTLASS
  includes, in a folder of its own), as its dry run prints them."""
  nvcc = next((c for c in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                           "/usr/local/cuda/bin/nvcc") if c and pathlib.Path(c).is_file()), None)
  if nvcc is None:
    return []
  dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                       capture_output=True, text=True, check=True)
  folders = []
  for line in (dry.stdout + dry.stderr).splitlines():
    name, _, value = line.removeprefix("#$ ").partition("=")
    if name.strip() in ("INCLUDES", "SYSTEM_INCLUDES"):
      words = [w.removeprefix("-I") for w in shlex.split(value) if w != "-isystem"]
      folders += [pathlib.Path(w) for w in words if w]
  return [folder for folder in folders if folder.is_dir()]


def _cutlass_include():
  try:
    import cutlass_library
  except ImportError:
    return None
  include = pathlib.Path(cutlass_library.__file__).parent / "source" / "include"
  return include if (include / "cute" / "tensor.hpp").is_file() else None


def host_check(name, optimize="-O0", xla_ffi=False, first_includes=()):
  """Marks a test as one of tests/<name>.cu, built as host C++ at `optimize` (with `xla_ffi`,
  against XLA's FFI headers too, as the handler's files are; `first_includes`, folders of the
  repository searched before the toolkit's); the test's `output` is what the program printed,
  which ends in its count of errors."""
  def mark(test):
    test.host_check = (name, optimize, xla_ffi, first_includes)
    return test
  return mark


def _build(name, optimize, xla_ffi, first_includes, folder):
  cuda, include, cxx = _cuda_includes(), _cutlass_include(), shutil.which("c++")
  if not cuda or include is None or cxx is None:
    pytest.skip("needs a C++ compiler, the CUDA toolkit's and the nvidia-cutlass headers, as "
                "the CUDA build does")
  xla = []
  if xla_ffi:
    import jax
    xla = [f"-I{jax.ffi.include_dir()}"]
  binary = folder / name
  subprocess.run([cxx, "-std=c++17", optimize, "-x", "c++", f"-I{REPO}",
                  *(f"-I{REPO / path}" for path in first_includes), f"-I{include}",
                  *(f"-I{path}" for path in cuda), *xla, "-o", str(binary),
                  str(REPO / "tests" / f"{name}.cu")], check=True, capture_output=True)
  return binary


@pytest.fixture(scope="module")
def _binaries(request, tmp_path_factory):
  """The programs of this run's selected tests, built two at a time from the first test on: the
  compiler takes one core, and the programs take a minute or more in all."""
  folder = tmp_path_factory.mktemp("host_checks")
  checks = dict.fromkeys(item.function.host_check for item in request.session.items
                         if item.module is request.module)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    yield {name: pool.submit(_build, name, optimize, xla_ffi, first_includes, folder)
           for name, optimize, xla_ffi, first_includes in checks}


@pytest.fixture
def output(request, _binaries):
  """What the test's program printed (it ran to the end and counted no errors)."""
  binary = _binaries[request.function.host_check[0]].result()
  run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  assert run.stdout.splitlines()[-1] == "errors: 0"
  return run.stdout


@pytest.mark.slow
# -O1: CuTe's templates compile faster than at -O0 (33 s against 54 s on 2 cores).
@host_check("gemm_layouts", optimize="-O1")
def test_every_configuration_moves_each_element_where_its_mma_reads_it(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # bfloat16, float16, float32 as TF32 and float32, each for its three operand layouts.
  assert len(verdicts) == 12, output


@pytest.mark.slow
# -O1: CuTe's templates compile faster than at -O0, as for the layouts.
@host_check("expert_gemm_tiles", optimize="-O1")
def test_expert_gemm_computes_every_configurations_products_whole(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # bfloat16, float16, float32 as TF32 and float32: pair rows times weights as stored and
  # transposed (each in one launch and in source phases), GEMM1's activation and the backward's
  # u GEMM (swiglu, relu), and the weight gradients (in one chunk and in chunks of one tile).
  assert len(verdicts) == 4 * 5, output


@host_check("pair_rows")
def test_activation_rows_in_vectors_match_one_column_a_lane_and_the_formula(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # Every activation at F = 768, 200 and 1032.
  assert len(verdicts) == 5 * 3, output


@host_check("row_passes")
def test_activation_passes_visit_each_row_of_the_pass_once_and_write_no_other(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # The walk at three M tiles, its stop at the list's end (lowered, and in a chunk of 2^30
  # tiles), the grouped GEMMs' problems (weights as stored and transposed), expert_gemm's tiles
  # across the source phases, and the two kernels with expert_gemm's epilogues in six cases
  # (every activation, bfloat16, float16).
  assert len(verdicts) == 3 + 2 + 2 + 1 + 6, output


@host_check("fetch_rows")
def test_fetch_reads_each_needed_row_once_into_its_pairs_scratch_rows_and_no_other(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # 16-byte vectors (K = 8 and K = 1) and 4-byte words.
  assert len(verdicts) == 3, output


# cub's block scans as tests/host_cub's (cub's own are PTX); -O1: 5 s a run against 7 s at -O0.
@host_check("work_list", optimize="-O1", xla_ffi=True, first_includes=("tests/host_cub",))
def test_work_list_lists_each_pair_as_the_cpu_handler_does_however_the_blocks_run(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # One device and emulated, K of 1 to 8, 1024 experts, more chunks than threads, bad ids
  # (three ways), an aborted barrier; plans for three devices, emulated, with bad ids, aborted,
  # and plans of any content.
  assert len(verdicts) == 16, output


# Optimised: its float sums over random lists take a minute unoptimised, 4 s optimised.
@host_check("weight_gradient_chunks", optimize="-O2")
def test_weight_gradients_in_chunks_sum_each_group_once_exactly(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # expert_gemm alone (and under plans, into the owners' partials), the grouped GEMMs beside it,
  # and NaN stored once after an aborted barrier.
  assert len(verdicts) == 3, output


@host_check("slot_sums")
def test_scatter_and_combine_sum_each_slot_in_list_order_however_they_run(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # Eight routings forward and backward, a source that gave up, an aborted call, sum_partials.
  assert len(verdicts) == 8 * 2 + 3, output


@host_check("barrier_protocol")
def test_device_barrier_protocol_keeps_members_in_step_and_reports_each_fault(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # In step (two ways of counting), a dead member, out of step, a changed rank, other shapes,
  # and the end barrier after a failed launch or another member's failure (two timings).
  assert len(verdicts) == 9, output


@pytest.mark.slow
# Optimised: it replays each configuration once for every call it makes, that call failing.
@host_check("launch_order", optimize="-O2", xla_ffi=True)
def test_launch_sequence_orders_its_streams_and_keeps_its_barriers_through_each_failure(output):
  verdicts = [line for line in output.splitlines() if line.endswith(": ok")]
  # Forward and backward: for each of seven ways of meeting the peers, and for the phases the
  # shape decides and a work list of many experts; a backward of frozen experts.
  assert len(verdicts) == 2 * 7 + 2 * 2 + 1, output
  configurations, injected = map(int, re.search(
      r"^configurations: (\d+), failures injected: (\d+)$", output, flags=re.M).groups())
  # The matrix (no plans across processes), then the shapes past it: four and two a direction,
  # and frozen experts' backward (each way of meeting, 2 kernels, plan or not, 2 budgets).
  assert configurations == 2 * (5 * 54 + 2 * 36) + 2 * 4 + 2 * 2 + (5 * 8 + 2 * 4), output
  # Each configuration makes dozens of calls, each made to fail in a run of its own.
  assert injected > 20 * configurations, output


@pytest.mark.slow
@host_check("handler_paths", xla_ffi=True)
def test_handler_enqueues_both_barriers_or_stops_the_gpu_through_each_failure(output):
  counts = {name: int(n) for name, n in
            re.findall(r"^(.+): (\d+) failures injected: ok$", output, flags=re.M)}
  # Each way of meeting the peers, forward and backward: a failure at each call of a first call,
  # of a later one, and of the call that reports a bad id.
  groups = [f"{g}, {d}" for g in ("one device", "D=2 emulated", "D=2 in one process",
                                  "D=4 in one process", "D=2 across processes")
            for d in ("forward", "backward")]
  assert len(counts) == 3 * len(groups), output
  for g in groups:
    # The first call also sets the GPU up and takes its place at the site.
    assert counts[f"{g}, the first call"] > counts[f"{g}, a later call"] > 0, output
    assert counts[f"{g}, the fault record"] > 0, output
  # Each member's calls fail in turn, and in a larger group each checks more peers.
  for d in ("forward", "backward"):
    assert (counts[f"D=4 in one process, {d}, a later call"]
            > 2 * counts[f"D=2 in one process, {d}, a later call"]), output
  total = re.search(r"^failures injected: (\d+)$", output, flags=re.M)
  assert int(total[1]) == sum(counts.values()), output
