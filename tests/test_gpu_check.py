"""bench/gpu_check.py's reporting on fabricated stage outcomes (the reporting code, not GPU
figures: nothing here was measured, and nothing is written outside a temporary directory), the
commit stamp, the sanitizer's workload and bench/gpu.py's document, both run on the CPU."""

import dataclasses
import json
import os
import subprocess
import sysconfig

import jax
import pytest

from bench import gpu, gpu_check, kernels, records
import jax_ccfuser as ccf


def _write_stages(state, rows):
  (state / "stages.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.test_cuda" name="test_a[D1-float32]" time="2.5"/>
<testcase classname="tests.test_cuda" name="test_b" time="9.0"/>
<testcase classname="tests.test_cuda" name="test_c[bf16]" time="1.0">
  <failure message="AssertionError: Not equal to tolerance&#10;second line">trace</failure>
</testcase>
<testcase classname="tests.test_cuda" name="test_d" time="0.0">
  <skipped type="pytest.skip" message="needs 2 devices">skip</skipped>
</testcase>
<testcase classname="tests.test_cuda" name="test_e" time="0.1">
  <error message="failed on setup with &quot;RuntimeError: boom&quot;">trace</error>
</testcase>
</testsuite></testsuites>
"""

# A fabricated benchmark document in bench/gpu.py's shape; its numbers are placeholders.
_BENCH = {"platform": "gpu", "device": "fabricated", "configs": {"E8-K2": {
    "impls": {"fused": {"fwd_ms": 1.0, "fwd_bwd_ms": 4.0, "fwd_bwd_roof_fraction": 0.5},
              "ragged_dot": {"fwd_ms": 2.0, "fwd_bwd_ms": 6.0},
              "all_to_all": {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"}},
    "baseline_ms_over_fused_ms": {"ragged_dot": {"fwd": 2.0, "fwd_bwd": 1.5}}}}}


@pytest.fixture
def failed_run(tmp_path):
  """A state directory as gpu_check.sh leaves it after a run with failures of every kind."""
  state = tmp_path / "state"
  state.mkdir()
  _write_stages(state, [
      ("env", "passed", 0, "2.000", 150, ""),
      ("build", "passed", 0, "95.500", 300, ""),
      # The sanitizer runs finish before the tests: the report restores the stage order.
      ("sanitizer:memcheck", "passed", 0, "40.000", 200, ""),
      ("sanitizer:racecheck", "timed out", 124, "200.000", 200, ""),
      ("sanitizer:initcheck", "failed", 3, "41.000", 200, ""),
      ("sanitizer:synccheck", "skipped", "", "", "", "compute-sanitizer not found"),
      ("tests", "failed", 1, "120.000", 200, ""),
      ("benchmark", "passed", 0, "80.000", 150, ""),
  ])
  (state / "env.json").write_text(json.dumps({
      "date": "2026-12-01T10:00:00+00:00", "dry_run": False, "commit": "abc1234+dirty",
      "commit_source": "stamp of 2026-12-01T09:00:00+00:00", "stamp_matches_tree": True,
      "device": "fabricated GPU", "driver": "0.0", "jax": "0.11.2", "python": "3.12.3"}))
  (state / "junit.xml").write_text(_JUNIT)
  (state / "tests.log").write_text("tests/test_cuda.py::test_a[D1-float32] PASSED\n")
  (state / "build.log").write_text(
      "cuda extension: carried, built from abc1234 on 2026-12-01T09:00:00+00:00\n"
      "jax_ccfuser from /tmp/pkg/jax_ccfuser/__init__.py | CUDA extension: True\n")
  (state / "compute-sanitizer-memcheck.log").write_text(
      "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
  (state / "sanitizer-racecheck.log").write_text("workload float32: relative error ...\n")
  (state / "compute-sanitizer-initcheck.log").write_text(
      "========= COMPUTE-SANITIZER\n"
      "========= Uninitialized __global__ memory read of size 4 bytes\n"
      "=========     at ccf::cuda::combine_slots+0x90\n"
      "========= ERROR SUMMARY: 2 errors\n")
  (state / "bench.json").write_text(json.dumps(_BENCH))
  return state


def test_report_of_a_run_with_failures(failed_run, tmp_path, capsys):
  results, out = tmp_path / "results", tmp_path / "out"
  path = gpu_check.report(failed_run, results, out)
  assert path == results / "gpu-2026-12-01-abc1234.json"
  doc = json.loads(path.read_text())
  assert (doc["commit"], doc["device"], doc["jax"]) == ("abc1234+dirty", "fabricated GPU", "0.11.2")
  assert [s["name"] for s in doc["stages"]] == [
      "env", "build", "tests", "sanitizer:memcheck", "sanitizer:racecheck",
      "sanitizer:synccheck", "sanitizer:initcheck", "benchmark"]
  assert {s["name"]: s["status"] for s in doc["stages"]}["sanitizer:racecheck"] == "timed out"
  tests = doc["tests"]
  assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (2, 1, 1, 1)
  assert tests["failures"] == [
      {"name": "tests/test_cuda.py::test_c[bf16]",
       "message": "AssertionError: Not equal to tolerance"},
      {"name": "tests/test_cuda.py::test_e",
       "message": 'failed on setup with "RuntimeError: boom"'}]
  assert tests["slowest"][0] == {"name": "tests/test_cuda.py::test_b", "seconds": 9.0}
  assert doc["sanitizer"]["memcheck"]["findings"] == 0
  assert doc["sanitizer"]["racecheck"]["findings"] is None  # stopped before its summary
  assert doc["sanitizer"]["initcheck"] == {
      "findings": 2, "errors": 2, "warnings": 0,
      "first": "Uninitialized __global__ memory read of size 4 bytes",
      "printed_in": {"ccf::cuda::combine_slots": 1}}
  assert "synccheck" in doc["sanitizer"] and doc["benchmark"] == _BENCH
  # The log holds every stage's output and the tools' own logs; both files went to $OUT too.
  log = (results / doc["log"]).read_text()
  assert "===== tests =====" in log and "Uninitialized __global__" in log
  assert sorted(p.name for p in out.iterdir()) == [path.name, doc["log"]]
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == ("FAILED tests/test_cuda.py::test_c[bf16]: AssertionError: Not equal to "
                        "tolerance")
  table = printed[printed.index(next(l for l in printed if l.startswith("stage"))):]
  assert [l.split()[0] for l in table[1:-1]] == [s["name"] for s in doc["stages"]]
  row = dict((l.split()[0], l) for l in table[1:-1])
  assert "2 passed, 1 failed, 1 errors, 1 skipped" in row["tests"]
  assert ("2 findings (2 errors, 0 warnings; printed ones in ccf::cuda::combine_slots 1)"
          in row["sanitizer:initcheck"])
  assert "compute-sanitizer not found" in row["sanitizer:synccheck"]
  assert "E8-K2: fused fwd+bwd 4.00 ms (50% of roof); baseline/fused ragged_dot 1.50x" in \
      row["benchmark"]
  assert "fabricated GPU | driver 0.0 | jax 0.11.2 | commit abc1234+dirty" in row["env"]
  assert row["build"].endswith("cuda extension: carried, built from abc1234 on "
                               "2026-12-01T09:00:00+00:00")
  assert table[-1] == f"results: {path} (and in {out})"


def test_report_when_nothing_ran(tmp_path, capsys):
  """No stage left anything (the machine broke at once): the document is still written, and
  names the commit (git here; the stamp where .git did not travel)."""
  state = tmp_path / "state"
  state.mkdir()
  path = gpu_check.report(state, tmp_path / "results")
  doc = json.loads(path.read_text())
  assert doc["commit"] == records.commit()
  assert path.name == f"gpu-{doc['date'][:10]}-{doc['commit'].split('+')[0]}.json"
  assert doc["stages"] == [] and doc["tests"] is None and doc["benchmark"] is None
  assert capsys.readouterr().out.splitlines()[-1] == f"results: {path}"


def test_triage_says_which_switch_makes_each_failed_test_pass(failed_run, tmp_path, capsys):
  """Stage 2b: the failed tests (and errors) are listed for the rerun; each switch's rerun is
  reported after the tests stage, and a failure names the switches under which it passed. A
  rerun stopped before its junit XML counts as no outcome, never as passing."""
  assert gpu_check.failed_tests(failed_run) == ["tests/test_cuda.py::test_c[bf16]",
                                                "tests/test_cuda.py::test_e"]
  gpu_check.main(["failed", str(failed_run)])
  assert capsys.readouterr().out.split() == gpu_check.failed_tests(failed_run)
  with (failed_run / "stages.tsv").open("a") as f:
    f.write("triage:JAX_CCFUSER_GROUPED_GEMMS=0\tfailed\t1\t30.0\t90\t\n"
            "triage:JAX_CCFUSER_SOURCE_PHASES=0\ttimed out\t124\t90.0\t90\t\n")
  (failed_run / "junit-triage-JAX_CCFUSER_GROUPED_GEMMS=0.xml").write_text(
      '<testsuites><testsuite name="pytest">'
      '<testcase classname="tests.test_cuda" name="test_c[bf16]" time="1.0"/>'
      '<testcase classname="tests.test_cuda" name="test_e" time="0.1">'
      '<error message="boom">trace</error></testcase></testsuite></testsuites>')
  (failed_run / "triage-JAX_CCFUSER_SOURCE_PHASES=0.log").write_text(
      "tests/test_cuda.py::test_c[bf16] PASSED\ntests/test_cuda.py::test_e \n")
  path = gpu_check.report(failed_run, tmp_path / "results")
  doc = json.loads(path.read_text())
  assert doc["triage"] == {
      "JAX_CCFUSER_GROUPED_GEMMS=0": {"passed": ["tests/test_cuda.py::test_c[bf16]"],
                                      "failed": ["tests/test_cuda.py::test_e"]},
      "JAX_CCFUSER_SOURCE_PHASES=0": None}
  assert [s["name"] for s in doc["stages"]][2:5] == [
      "tests", "triage:JAX_CCFUSER_GROUPED_GEMMS=0", "triage:JAX_CCFUSER_SOURCE_PHASES=0"]
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].endswith("Not equal to tolerance (passes with JAX_CCFUSER_GROUPED_GEMMS=0)")
  assert printed[1] == 'FAILED tests/test_cuda.py::test_e: failed on setup with "RuntimeError: boom"'
  row = next(l for l in printed if l.startswith("triage:JAX_CCFUSER_GROUPED_GEMMS=0"))
  assert row.endswith("1 of the 2 failed tests pass with JAX_CCFUSER_GROUPED_GEMMS=0")
  assert "===== triage:JAX_CCFUSER_SOURCE_PHASES=0 =====" in (path.parent / doc["log"]).read_text()


def test_a_run_without_failures_lists_none_for_triage(failed_run, capsys):
  """Every test passed: `failed` prints nothing, so gpu_check.sh's `grep -q .` skips stage 2b
  (an empty line would rerun the whole suite under each switch)."""
  (failed_run / "junit.xml").write_text(_JUNIT.replace(
      '<failure message="AssertionError: Not equal to tolerance&#10;second line">trace</failure>',
      "").replace('<error message="failed on setup with &quot;RuntimeError: boom&quot;">trace'
                  '</error>', ""))
  assert gpu_check.failed_tests(failed_run) == []
  gpu_check.main(["failed", str(failed_run)])
  assert capsys.readouterr().out == ""
  script = (gpu_check.REPO / "bench" / "gpu_check.sh").read_text()
  assert 'grep -q . "$STATE/failed.txt"' in script


def test_pytest_log_of_a_run_stopped_midway(tmp_path):
  """No junit XML (the stage's time limit killed pytest): counts from the -v log, and the test
  that was running."""
  log = tmp_path / "tests.log"
  log.write_text(
      "tests/test_cuda.py::test_a[D1-float32] PASSED                 [  2%]\n"
      "tests/test_cuda.py::test_b FAILED                             [  4%]\n"
      "tests/test_cuda.py::test_c SKIPPED (needs 2 devices)          [  7%]\n"
      "FAILED tests/test_cuda.py::test_b - AssertionError: arrays differ\n"
      "tests/test_cuda.py::test_d[every-device] \n")
  tests = gpu_check.parse_pytest(tmp_path / "junit.xml", log)
  assert (tests["source"], tests["passed"], tests["failed"], tests["skipped"]) == ("log", 1, 1, 1)
  assert tests["failures"] == [{"name": "tests/test_cuda.py::test_b",
                                "message": "AssertionError: arrays differ"}]
  assert tests["running_when_stopped"] == "tests/test_cuda.py::test_d[every-device]"
  assert tests["not_run"] is None  # the log names no collection
  assert gpu_check.parse_pytest(tmp_path / "junit.xml", tmp_path / "absent.log") is None


_TIMEOUT_LOGS = {
    # In a test's call: no outcome, no summary, no XML; the rest of the collected tests never ran.
    "call": ("collecting ... collected 5 items\n\n"
             "tests/test_cuda.py::test_a PASSED                                       [ 20%]\n"
             "tests/test_cuda.py::test_b +++++++++++++++ Timeout +++++++++++++++\n"
             "~~~~~~~~~~~~~~~~~~~~ Stack of MainThread (139768706874240) ~~~~~~~~~~~~~~~~~~~~~\n"
             '  File "/x/tests/test_cuda.py", line 3, in test_b\n'
             "+++++++++++++++ Timeout +++++++++++++++\n",
             {"passed": 1, "failed": 1, "errors": 0, "not_run": 3}, "timed out"),
    # In its teardown, after its outcome: that test errs, it is not "passed" alone.
    "teardown": ("collecting ... collected 3 items\n\n"
                 "tests/test_cuda.py::test_a PASSED                                       [ 33%]\n"
                 "tests/test_cuda.py::test_b PASSED                [ 66%]+++++++ Timeout +++++++\n"
                 "+++++++ Timeout +++++++\n",
                 {"passed": 2, "failed": 0, "errors": 1, "not_run": 1}, "timed out in teardown"),
}


@pytest.mark.parametrize("where", _TIMEOUT_LOGS)
def test_pytest_log_of_a_run_that_pytest_timeout_stopped(tmp_path, where):
  """pytest-timeout's thread method ends the process in the test it stops. That test counts as
  failed (or as its teardown's error) and is triaged once; the tests after it count as not run."""
  text, counts, message = _TIMEOUT_LOGS[where]
  log = tmp_path / gpu_check._log_name("tests")
  log.write_text(text)
  tests = gpu_check.parse_pytest(tmp_path / "junit.xml", log)
  assert {name: tests[name] for name in counts} == counts
  assert tests["failures"] == [{"name": "tests/test_cuda.py::test_b",
                                "message": f"{message} (pytest-timeout stopped the run here)"}]
  assert tests["running_when_stopped"] == "tests/test_cuda.py::test_b"
  assert gpu_check.failed_tests(tmp_path) == ["tests/test_cuda.py::test_b"]


def test_racecheck_summary(tmp_path):
  log = tmp_path / "compute-sanitizer-racecheck.log"
  log.write_text("========= COMPUTE-SANITIZER\n"
                 "========= Error: Race reported between Write access at expert_gemm+0x10\n"
                 "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n")
  assert gpu_check.parse_sanitizer(log) == {
      "findings": 3, "errors": 1, "warnings": 2,
      "first": "Error: Race reported between Write access at expert_gemm+0x10",
      "printed_in": {}}


def test_initcheck_findings_are_counted_by_kernel(tmp_path):
  """What the print limit shows of an initcheck run, by kernel: whose code the reads are in."""
  log = tmp_path / "compute-sanitizer-initcheck.log"
  finding = ("========= Uninitialized __global__ memory read of size 4 bytes\n"
             "=========     at {}+0x{:x}\n"
             "=========     by thread (0,0,0) in block (0,0,0)\n")
  log.write_text("".join(finding.format(k, o) for k, o in (
      ("input_reduce_fusion", 0xd0), ("input_reduce_fusion", 0xd0),
      ("void ccf::cuda::scatter_slots<float, 4>(ccf::cuda::ScatterParams)", 0x1a0)))
      + "========= ERROR SUMMARY: 7 errors\n")
  found = gpu_check.parse_sanitizer(log)
  assert (found["findings"], found["errors"]) == (7, 7)
  assert found["printed_in"] == {
      "input_reduce_fusion": 2,
      "void ccf::cuda::scatter_slots<float, 4>(ccf::cuda::ScatterParams)": 1}


def test_stamp_names_the_commit_while_the_tree_matches(tmp_path, monkeypatch):
  """Where .git did not travel, the commit comes from the stamp, which says whether the files
  changed since."""
  repo = tmp_path / "repo"
  repo.mkdir()
  git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
  git("init", "-q")
  (repo / "a.py").write_text("a = 1\n")
  (repo / "untracked.txt").write_text("travels too\n")
  (repo / ".gitignore").write_text("/.whl/\n")
  git("add", "a.py", ".gitignore")
  monkeypatch.setattr(records, "commit", lambda: "abc1234")
  doc = gpu_check.stamp(repo / ".whl" / "COMMIT", repo)
  assert doc["files"] == [".gitignore", "a.py", "untracked.txt"]
  monkeypatch.setattr(records, "commit", lambda: "unknown")  # the device: no .git
  found = gpu_check.commit_of_tree(repo, repo / ".whl" / "COMMIT")
  assert (found["commit"], found["stamp_matches_tree"]) == ("abc1234", True)
  # A .git that travelled may be an older one: while the tree matches, the stamp names it.
  monkeypatch.setattr(records, "commit", lambda: "0ld0ne1+dirty")
  assert gpu_check.commit_of_tree(repo, repo / ".whl" / "COMMIT")["commit"] == "abc1234"
  (repo / "a.py").write_text("a = 2\n")
  found = gpu_check.commit_of_tree(repo, repo / ".whl" / "COMMIT")
  assert (found["commit"], found["stamp_matches_tree"]) == ("0ld0ne1+dirty", False)
  monkeypatch.setattr(records, "commit", lambda: "unknown")
  assert gpu_check.commit_of_tree(repo, repo / ".whl" / "COMMIT")["stamp_matches_tree"] is False
  monkeypatch.setenv("CCF_COMMIT", "def5678")
  assert gpu_check.commit_of_tree(repo, repo / "absent")["commit"] == "def5678"


def test_carried_extension_only_while_its_sources_match_the_stamp(tmp_path, monkeypatch):
  """The CUDA extension built with the wheels stands in for the device's own build only for the
  sources it was built from, this Python and the architecture asked for; results or docs
  written since (a GPU check's results, copied in) do not make the device build it again."""
  repo = tmp_path / "repo"
  (repo / "cuda").mkdir(parents=True)
  subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
  (repo / ".gitignore").write_text("/.whl/\n")
  (repo / "cuda" / "kernel.cu").write_text("// v1\n")
  (repo / "README.md").write_text("v1\n")
  carry = repo / ".whl"
  name = "_ccfuser_cuda" + sysconfig.get_config_var("EXT_SUFFIX")
  assert gpu_check.carried_extension(carry, "90a", repo)[0] is None  # nothing carried
  (carry / "cuda-90a").mkdir(parents=True)
  (carry / "cuda-90a" / name).write_bytes(b"\x7fELF")
  path, why = gpu_check.carried_extension(carry, "90a", repo)
  assert path is None and "COMMIT is missing" in why
  monkeypatch.setattr(records, "commit", lambda: "abc1234")
  gpu_check.stamp(carry / "COMMIT", repo)
  path, why = gpu_check.carried_extension(carry, "90a", repo)
  assert path == carry / "cuda-90a" / name and why.startswith("carried, built from abc1234")
  assert gpu_check.carried_extension(carry, "100a", repo)[0] is None  # another architecture
  (repo / "README.md").write_text("v2\n")
  (repo / "cuda" / "__pycache__").mkdir()  # what a build leaves, which does not travel
  (repo / "cuda" / "__pycache__" / "x.pyc").write_bytes(b"\0")
  assert gpu_check.carried_extension(carry, "90a", repo)[0] == path
  (repo / "cuda" / "kernel.cu").write_text("// v2\n")
  path, why = gpu_check.carried_extension(carry, "90a", repo)
  assert path is None and "the extension's sources differ" in why
  (repo / "cuda" / "kernel.cu").write_text("// v1\n")
  (repo / "cuda" / "new.cuh").write_text("// added\n")
  assert gpu_check.carried_extension(carry, "90a", repo)[0] is None


def test_dense_baselines_are_sized_before_compiling():
  """The dropless all_to_all's padded buffer and jax's GPU ragged_dot's float32 expansion, both
  [E, D*T*K, H]: DeepSeek-V3's are past any one GPU, Mixtral's fit."""
  deepseek, mixtral = gpu.CONFIGS["DeepSeek-V3"], gpu.CONFIGS["Mixtral-8x7B"]
  rows = deepseek.devices * deepseek.tokens * deepseek.k
  assert gpu.dense_bytes("all_to_all", deepseek) == 256 * rows * 7168 * 2
  assert gpu.dense_bytes("ragged_dot", deepseek) == 256 * rows * 7168 * 4 > 200 * 2**30
  assert gpu.dense_bytes("ragged_dot", mixtral) < 2 * 2**30
  assert gpu.dense_bytes("fused", deepseek) is None and gpu.dense_bytes("tokamax", mixtral) is None


def test_env_records_the_machines_packages(tmp_path):
  """The env stage's facts name the installed versions the next lock should match, and None for
  what is not installed; here, without a GPU, the GPU facts are None."""
  import flax
  import numpy as np

  facts = gpu_check.env(tmp_path / "env.json", tmp_path / "no-stamp")
  assert json.loads((tmp_path / "env.json").read_text()) == facts
  assert facts["packages"]["numpy"] == np.__version__
  assert facts["packages"]["flax"] == flax.__version__
  assert set(facts["packages"]) == set(gpu_check.PACKAGES)
  assert gpu_check.package_versions(("no-such-distribution",)) == {"no-such-distribution": None}
  assert (facts["device"], facts["gpus"], facts["backend"]) == (None, [], "cpu")


def test_sanitizer_workload_runs(capsys):
  """The program compute-sanitizer runs, here on the CPU: finite, close to the reference."""
  gpu_check.workload()
  lines = capsys.readouterr().out.splitlines()
  assert [l.split(":")[0] for l in lines] == ["workload float32", "workload float32 as TF32",
                                              "workload float32, budget 1 B",
                                              "workload bfloat16",
                                              "workload bfloat16, budget 1 B"]
  errors = [[float(e) for e in line.split(": ")[-1].split(", ")] for line in lines]
  assert [len(e) for e in errors] == [5] * 5
  # TF32 (on a GPU; exact float32 here) keeps 10 mantissa bits, as float16 does.
  assert max(errors[0] + errors[2]) < 1e-5 and max(errors[1]) < 2e-3
  assert max(errors[3] + errors[4]) < 2e-2
  gpu_check.workload(("float32",))  # initcheck's calls
  assert [l.split(":")[0] for l in capsys.readouterr().out.splitlines()] == [
      "workload float32", "workload float32 as TF32", "workload float32, budget 1 B"]


def test_gpu_benchmark_document(tmp_path):
  """bench/gpu.py's tiny configuration on the CPU: every program timed, ratios against fused."""
  out = tmp_path / "bench.json"
  doc = gpu.main(["--quick", "--out", str(out)])
  assert json.loads(out.read_text()) == doc
  assert doc["fused_gemms"] is None  # the CPU backend
  record = doc["configs"]["quick"]
  assert list(record["impls"]) == ["fused", "fused_hidden", "fused_fetch_sms0", "ragged_dot",
                                   "tokamax", "all_to_all", "all_to_all_cf1.25", "roof"]
  for impl, fields in record["impls"].items():
    assert fields["fwd_ms"] > 0 and fields["fwd_bwd_ms"] > 0, impl
  assert record["impls"]["roof"]["fwd_roof_fraction"] == pytest.approx(1.0)
  assert set(record["baseline_ms_over_fused_ms"]) == {"fused_hidden", "fused_fetch_sms0",
                                                      "ragged_dot", "tokamax", "all_to_all",
                                                      "all_to_all_cf1.25"}
  errors = record["fused_forward_relative_error_vs"]
  # Every program of the same layer: all_to_all_cf1.25 where its capacity dropped no row.
  same_layer = {"fused_hidden", "fused_fetch_sms0", "ragged_dot", "tokamax", "all_to_all"}
  if record["impls"]["all_to_all_cf1.25"]["dropped_fraction"] == 0.0:
    same_layer.add("all_to_all_cf1.25")
  assert set(errors) == same_layer
  # Keeping h and the SMs a GEMM runs on change no bit of the forward.
  assert errors["fused_hidden"] == errors["fused_fetch_sms0"] == 0.0
  assert max(errors.values()) < 2e-2  # bfloat16
  # The CUDA handler's scratch, where the CUDA extension was built: the backward's is larger.
  scratch = record["fused_scratch_bytes"]
  if ccf._extension.cuda is None:
    assert scratch is None
  else:
    assert 0 < scratch["fwd"] < scratch["bwd"]


def test_benchmark_programs_must_exist_and_one_that_failed_is_not_compared(monkeypatch):
  """`--impls` with a typo once measured nothing and exited 0; a program whose forward ran but
  whose forward+backward failed is reported not run, so its forward is compared with nothing."""
  config = gpu.QUICK_CONFIGS["quick"]
  with pytest.raises(SystemExit, match="unknown programs \\['fusd'\\]"):
    gpu.measure(config, min_samples=1, max_samples=1, budget_s=0.0, impls=["fusd", "roof"])
  made = gpu.gpu_programs

  def one_backward_fails(config, **kwargs):
    programs = made(config, **kwargs)
    def fail(*args):
      raise RuntimeError("RESOURCE_EXHAUSTED: made up for the test")
    programs["ragged_dot"] = dataclasses.replace(programs["ragged_dot"],
                                                 forward_backward=jax.jit(fail))
    return programs

  monkeypatch.setattr(gpu, "gpu_programs", one_backward_fails)
  record = gpu.measure(config, min_samples=1, max_samples=1, budget_s=0.0,
                       impls=["fused", "ragged_dot", "roof"])
  assert "RESOURCE_EXHAUSTED" in record["impls"]["ragged_dot"]["error"]
  assert "ragged_dot" not in record["fused_forward_relative_error_vs"]
  assert record["impls"]["fused"]["fwd_ms"] > 0


def test_benchmark_shapes_run_in_the_order_asked():
  """--configs (CCF_GPU_BENCH_CONFIGS in gpu_check.sh) picks shapes in its order, so a run cut
  short by its time limit keeps the first; a name not among them is refused."""
  assert list(gpu.select_configs(False, None)) == list(gpu.CONFIGS)
  assert list(gpu.select_configs(False, "DeepSeek-V3,Mixtral-8x7B")) == ["DeepSeek-V3",
                                                                        "Mixtral-8x7B"]
  assert list(gpu.select_configs(True, "")) == ["quick"]
  with pytest.raises(SystemExit, match="DeepSeek-V4"):
    gpu.select_configs(False, "DeepSeek-V4")


def test_kernel_times_add_up_per_call():
  """bench.kernels' arithmetic on a made-up trace of two calls: overlapping kernels count once
  in busy time, idle gaps count in wall time only, kernels ranked by their time per call."""
  ms = 1e6
  events = [kernels.KernelEvent("gemm", 0, 4 * ms), kernels.KernelEvent("fetch", 1 * ms, 2 * ms),
            kernels.KernelEvent("gemm", 10 * ms, 4 * ms),
            kernels.KernelEvent("fetch", 12 * ms, 4 * ms)]
  found = kernels.summarize(events, calls=2, lines=["/device:GPU:0 Stream #1"], top=1)
  assert found["wall_ms"] == pytest.approx(8.0)   # 0..16 ms over two calls
  assert found["busy_ms"] == pytest.approx(5.0)   # 0..4 and 10..16
  assert found["kernel_ms"] == pytest.approx(7.0)
  assert found["kernels"] == [{"name": "gemm", "launches": 1.0, "ms": pytest.approx(4.0)}]
  assert found["other_kernels_ms"] == pytest.approx(3.0)
  assert "error" in kernels.summarize([], calls=2)


def test_kernel_profile_environment_is_restored(monkeypatch):
  monkeypatch.setenv("JAX_CCFUSER_SOURCE_PHASES", "0")
  monkeypatch.delenv("CCF_NOT_SET", raising=False)
  with kernels._environment({"JAX_CCFUSER_SOURCE_PHASES": "1", "CCF_NOT_SET": "x"}):
    assert os.environ["JAX_CCFUSER_SOURCE_PHASES"] == "1" and os.environ["CCF_NOT_SET"] == "x"
  assert os.environ["JAX_CCFUSER_SOURCE_PHASES"] == "0" and "CCF_NOT_SET" not in os.environ


def test_kernel_profile_on_a_cpu_records_its_absence(tmp_path):
  doc = kernels.main(["--quick", "--calls", "1", "--out", str(tmp_path / "kernels.json")])
  assert json.loads((tmp_path / "kernels.json").read_text()) == doc
  record = doc["configs"]["quick"]
  assert set(record) == {f"{impl}_{kind}" for impl in ("fused", "fused_phases", "roof")
                         for kind in ("fwd", "fwd_bwd")}
  assert all(found == {"error": "no GPU kernel in the trace (no CUPTI, or not a GPU)"}
             for found in record.values())


def test_tokamax_script_says_why_where_no_check_ran(tmp_path):
  """On a machine started afresh no check's state is in /tmp: `ls` fails there, and under
  pipefail the script once ended silently (rc 2) instead of saying why."""
  ls = tmp_path / "ls"  # finds no state directory, as on a fresh machine
  ls.write_text("#!/bin/sh\nexit 2\n")
  ls.chmod(0o755)
  done = subprocess.run(["bash", str(gpu_check.REPO / "bench" / "gpu_tokamax.sh")],
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
  assert done.returncode == 1 and "run the check first" in done.stderr, done
