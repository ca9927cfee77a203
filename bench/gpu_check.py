"""The Python side of bench/gpu_check.sh: commit stamp, machine facts, workload, report.

The commit stamp, the machine's facts, the workload compute-sanitizer runs, and the results
document with its summary table.

`python -m bench.gpu_check SUBCOMMAND`, from the repository root:

  stamp PATH         (here, by `make gpu-wheels`) the commit, and a fingerprint of the files
                     that travel to the device machine, which has no .git to ask
  failed STATE_DIR   (device) the tests stage's failed tests, one node id a line, for the
                     triage stage to run again under each fallback switch
  carried CARRY --arch ARCH
                     (device) the CUDA extension `make gpu-wheels` built for this Python in
                     CARRY, printed if its sources still match the stamp; exit status 1 if not
  env PATH           (device) device, driver, jax, Python, packages, nvcc and commit, as JSON
  workload [--dtypes float32,...]
                     (device, under compute-sanitizer) a small emulated forward+backward
  report STATE_DIR   the stages' outcomes in STATE_DIR as `gpu-<date>-<commit>.json` and its
                     log, then the summary table

Only the standard library is imported at module level: the report is written even where jax
or the build is broken. The state directory gpu_check.sh fills: `stages.tsv` (one row per stage:
name, status, exit code, seconds, limit, note), `<stage>.log` per stage, `env.json`,
`junit.xml` (pytest), `junit-triage-<switch>.xml` (the failed tests again with one
environment switch set, stage `triage:<switch>`), `compute-sanitizer-<tool>.log` (the tool's
findings, apart from the workload's output), `kernels.json` (bench/kernels.py) and `bench.json` (bench/gpu.py).
"""

import argparse
import collections
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET

from bench import records

REPO = pathlib.Path(__file__).resolve().parent.parent
STAMP = REPO / ".whl" / "COMMIT"  # `make gpu-wheels` writes it; .whl/ travels as a carried path
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# Report order; sanitizer rows are "sanitizer:<tool>", and the triage rows ("triage:<switch>")
# follow the tests they rerun.
STAGES = ("env", "build", "tests", *(f"sanitizer:{t}" for t in SANITIZER_TOOLS), "kernels",
          "benchmark")
TRIAGE = "triage:"


# ---------------------------------------------------------------------------------------------
# Commit stamp (here) and machine facts (there).

def _fingerprint(root: pathlib.Path, files) -> str:
  """sha256 over the files' paths and contents; a missing file counts as absent."""
  digest = hashlib.sha256()
  for name in sorted(files):
    path = root / name
    content = path.read_bytes() if path.is_file() else b"<missing>"
    digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
  return digest.hexdigest()


def _travelling_files(root: pathlib.Path) -> list[str]:
  """What the device tool sends: tracked files and untracked ones git does not ignore."""
  out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=root, capture_output=True, check=True).stdout
  return sorted({f for f in out.decode().split("\0") if f and (root / f).is_file()})


# What the CUDA extension is built from (jaxlib's FFI headers aside, which the image fixes).
_EXTENSION_SOURCES = ("CMakeLists.txt", "common", "cuda", "xla_ffi")


def _extension_sources(root: pathlib.Path) -> list[str]:
  """The files the CUDA extension is built from, found on disk (the device has no git): its
  sources and headers, not what a build leaves beside them."""
  found = []
  for name in _EXTENSION_SOURCES:
    path = root / name
    found += [str(p.relative_to(root)) for p in ([path] if path.is_file() else path.rglob("*"))
              if p.is_file() and (p.suffix in (".cc", ".cu", ".h", ".cuh") or p == path)]
  return sorted(found)


def stamp(path: pathlib.Path, root: pathlib.Path = REPO) -> dict:
  """Writes the commit, the date, the travelling files' fingerprint (the tree the commit names)
  and the extension sources' (what a carried extension was built from) to `path` (JSON)."""
  files = _travelling_files(root)
  doc = {"commit": records.commit(), "date": records.now(), "files": files,
         "fingerprint": _fingerprint(root, files),
         "extension_fingerprint": _fingerprint(root, _extension_sources(root))}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(doc, indent=1) + "\n")
  return doc


def _matches(root: pathlib.Path, doc: dict) -> bool:
  """Whether the files a stamp fingerprinted are still the same in `root`."""
  return _fingerprint(root, doc["files"]) == doc["fingerprint"]


def carried_extension(carry: pathlib.Path, arch: str, root: pathlib.Path = REPO):
  """The CUDA extension for this Python and `arch` that `make gpu-wheels` built into `carry`,
  if its sources are still those it was built from (`carry`/COMMIT, whether or not .git
  travelled): results, docs or tests changed since do not make the device build it again.

  Returns:
    `(path or None, why)`: why it is used or not, one line for the build's log.
  """
  name = f"_ccfuser_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
  path, stamp_path = carry / f"cuda-{arch}" / name, carry / "COMMIT"
  if not path.is_file():
    return None, f"none carried ({path.relative_to(carry.parent)} is missing)"
  if not stamp_path.is_file():
    return None, f"{stamp_path.name} is missing: the carried one cannot be matched to the tree"
  doc = json.loads(stamp_path.read_text())
  if _fingerprint(root, _extension_sources(root)) != doc.get("extension_fingerprint"):
    return None, (f"the extension's sources differ from those it was built from "
                  f"({doc['commit']})")
  return path, f"carried, built from {doc['commit']} on {doc['date']}"


def commit_of_tree(root: pathlib.Path, stamp_path: pathlib.Path) -> dict:
  """The tree's commit: the stamp's while the tree still matches it (a .git on the device
  machine may be an older one: the first GPU check's named a commit three back), else git's,
  else the stamp's with the mismatch recorded, else `$CCF_COMMIT`, else "unknown".

  Returns:
    `{"commit", "commit_source", "stamp_matches_tree"}` (the last None without a stamp).
  """
  doc = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
  matches = _matches(root, doc) if doc else None
  if matches:
    return {"commit": doc["commit"], "commit_source": f"stamp of {doc['date']}",
            "stamp_matches_tree": True}
  from_git = records.commit()
  if from_git != "unknown":
    return {"commit": from_git, "commit_source": "git", "stamp_matches_tree": matches}
  if doc:
    return {"commit": doc["commit"], "commit_source": f"stamp of {doc['date']}",
            "stamp_matches_tree": False}
  return {"commit": os.environ.get("CCF_COMMIT", "unknown"), "commit_source": "environment",
          "stamp_matches_tree": None}


def _command_output(args, timeout=60.0):
  """stdout of `args` stripped, or None if it is missing, fails or runs past `timeout`."""
  try:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


_JAX_PROBE = """
import json, jax, jaxlib
devices = jax.devices()
print(json.dumps({"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                  "backend": jax.default_backend(),
                  "jax_devices": [d.device_kind for d in devices]}))
"""


# What the tests and the benchmark import beside jax, read from the machine's own Python before
# anything carried is staged: the versions the lock files should match on the next check.
PACKAGES = ("numpy", "ml_dtypes", "scipy", "flax", "optax", "orbax-checkpoint", "matplotlib",
            "pytest", "nanobind", "scikit-build-core", "cmake", "ninja", "tokamax",
            "nvidia-cutlass")


def package_versions(names=PACKAGES) -> dict:
  """`{name: version}` of the installed distributions, None for each one not installed."""
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def env(path: pathlib.Path, stamp_path: pathlib.Path) -> dict:
  """Writes the machine's facts to `path`: each one that cannot be read is None."""
  facts = {"date": records.now(), "dry_run": os.environ.get("CCF_GPU_CHECK_DRY", "0") == "1",
           "hostname": socket.gethostname(), "python": platform.python_version(),
           "cpus": os.cpu_count(), "cuda_arch": os.environ.get("CCF_CUDA_ARCH"),
           # The extensions build against them (nanobind): a venv of a distribution's Python
           # has them only where its -dev package is installed.
           "python_headers": pathlib.Path(sysconfig.get_paths()["include"], "Python.h").is_file()}
  facts.update(commit_of_tree(REPO, stamp_path))
  facts["packages"] = package_versions()
  smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                         "--format=csv,noheader"])
  gpus = [dict(zip(("name", "driver", "memory"), (v.strip() for v in line.split(","))))
          for line in smi.splitlines()] if smi else []
  facts["gpus"] = gpus
  facts["device"] = gpus[0]["name"] if gpus else None
  facts["driver"] = gpus[0]["driver"] if gpus else None
  nvcc = _command_output(["nvcc", "--version"])
  facts["nvcc"] = next((l for l in nvcc.splitlines() if "release" in l), nvcc) if nvcc else None
  sanitizer = _command_output(["compute-sanitizer", "--version"])
  facts["compute_sanitizer"] = sanitizer.splitlines()[-1] if sanitizer else None
  probe = _command_output([sys.executable, "-c", _JAX_PROBE], timeout=120.0)
  facts.update(json.loads(probe.splitlines()[-1]) if probe else
               {"jax": None, "jaxlib": None, "backend": None, "jax_devices": []})
  path.write_text(json.dumps(facts, indent=1) + "\n")
  return facts


# ---------------------------------------------------------------------------------------------
# The workload compute-sanitizer checks.

# The workload's calls: (dtype, scratch budget or None, TF32).
# float32 in one-tile chunks too, for initcheck: the staging is not zeroed, so a slot the
# combine read that no chunk's scatter wrote (a token's slot first written by a later chunk) is
# a read of memory nothing wrote.
WORKLOAD_CALLS = (("float32", None, False), ("float32", None, True), ("float32", 1, False),
                  ("bfloat16", None, False), ("bfloat16", 1, False))


def workload(dtypes: tuple[str, ...] | None = None) -> None:
  """`fused_moe_emulated` forward and backward over 4 emulated peers, float32 (exact, and as
  TF32) and bfloat16, on a shape off every tile, both also in one-tile chunks (the least
  scratch budget), or only the calls in `dtypes`; prints each result's relative error against
  reference_moe."""
  import contextlib

  import jax
  import jax.numpy as jnp
  import numpy as np

  import jax_ccfuser as ccf
  from jax_ccfuser.experimental import fused_moe_emulated
  from bench.problem import Config, make_inputs

  for dtype, budget, tf32 in WORKLOAD_CALLS:
    if dtypes is not None and dtype not in dtypes:
      continue
    config = Config(devices=4, tokens=37, hidden=64, ffn=40, experts=8, k=2, dtype=dtype,
                    skew=0.5)
    x, ids, weights, w_in, w_out = make_inputs(config)

    def loss(moe, x, weights, w_in, w_out):
      return jnp.sum(jnp.square(moe(x, ids, weights, w_in, w_out).astype(jnp.float32)))

    fused = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda *b: fused_moe_emulated(*b, num_devices=4), *a), (0, 1, 2, 3)))
    reference = jax.jit(jax.value_and_grad(lambda *a: loss(ccf.reference_moe, *a), (0, 1, 2, 3)))
    with contextlib.ExitStack() as traced_under:  # the call is traced here
      if budget:
        traced_under.enter_context(ccf.scratch_budget(budget))
      if tf32:
        traced_under.enter_context(jax.default_matmul_precision("tensorfloat32"))
      got = jax.block_until_ready(fused(x, weights, w_in, w_out))
    with jax.default_matmul_precision("highest"):
      want = reference(*(a.astype(jnp.float32) for a in (x, weights, w_in, w_out)))
    errors = [float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    name = dtype + (" as TF32" if tf32 else "") + (f", budget {budget} B" if budget else "")
    print(f"workload {name}: relative error of loss, dx, d_weights, dw_in, dw_out: "
          + ", ".join(f"{e:.2e}" for e in errors), flush=True)
    if not np.all(np.isfinite(errors)):
      raise SystemExit(f"workload {name}: non-finite results")


# ---------------------------------------------------------------------------------------------
# Parsing the stages' outputs.

def read_stages(state: pathlib.Path) -> list[dict]:
  """`stages.tsv`'s rows in `STAGES` order (others after), the last row of a name winning."""
  rows = {}
  tsv = state / "stages.tsv"
  for line in tsv.read_text().splitlines() if tsv.is_file() else []:
    name, status, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
    rows[name] = {"name": name, "status": status, "rc": int(rc) if rc else None,
                  "seconds": float(seconds) if seconds else None,
                  "limit_s": float(limit) if limit else None, "note": note}
  order = {name: i for i, name in enumerate(STAGES)}
  def place(row):
    if row["name"].startswith(TRIAGE):
      return order["tests"] + 0.5
    return order.get(row["name"], len(order))
  return sorted(rows.values(), key=place)


_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_STARTED = re.compile(r"^(\S+::\S+) *$")
# pytest-timeout's banner, on the line of the test it stopped; its thread method then ends the
# process: no outcome, no short summary, no junit XML.
_TIMED_OUT = re.compile(r"^(\S+::\S+) (?:(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*?)?"
                        r"\++ Timeout \++")
_COLLECTED = re.compile(r"\bcollected (\d+) items?\b")
_SHORT_SUMMARY = re.compile(r"^(?:FAILED|ERROR) (\S+::\S+) - (.*)$")


def parse_pytest(junit: pathlib.Path, log: pathlib.Path) -> dict:
  """Counts and names from pytest's junit XML, else from its `-v` log (a run stopped early
  writes no XML; the log then also names the test that was running).

  Returns:
    `{"source", "passed", "failed", "errors", "skipped", "not_run", "failures": [{"name",
    "message"}], "slowest": [{"name", "seconds"}], "running_when_stopped"}`; None if neither
    file exists. A test that pytest-timeout stopped counts as failed and as the one running;
    `not_run`: collected tests with no outcome (None where the log names no collection).
  """
  if junit.is_file():
    try:
      return _parse_junit(junit)
    except ET.ParseError:
      pass
  if not log.is_file():
    return None
  counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0, "XFAIL": 0, "XPASS": 0}
  failures, last_started, collected, ran = {}, None, None, set()
  for line in log.read_text(errors="replace").splitlines():
    if (m := _COLLECTED.search(line)) and collected is None:
      collected = int(m[1])
    if m := _TIMED_OUT.match(line) or _OUTCOME.match(line):
      ran.add(m[1])  # a test with a teardown error has two outcomes
    if m := _TIMED_OUT.match(line):
      # After an outcome, the stop came in the test's teardown: its call's outcome counts too.
      if m[2]:
        counts[m[2]] += 1
      counts["ERROR" if m[2] else "FAILED"] += 1
      failures[m[1]] = ("timed out in teardown" if m[2] else "timed out") + \
          " (pytest-timeout stopped the run here)"
      last_started = m[1]
    elif m := _OUTCOME.match(line):
      counts[m[2]] += 1
      last_started = None
      if m[2] in ("FAILED", "ERROR"):
        failures[m[1]] = ""
    elif m := _STARTED.match(line):
      last_started = m[1]
    elif (m := _SHORT_SUMMARY.match(line)) and m[1] in failures:
      failures[m[1]] = m[2][:300]
  return {"source": "log", "passed": counts["PASSED"] + counts["XPASS"],
          "failed": counts["FAILED"], "errors": counts["ERROR"],
          "skipped": counts["SKIPPED"] + counts["XFAIL"],
          "not_run": None if collected is None else collected - len(ran),
          "failures": [{"name": n, "message": m} for n, m in failures.items()], "slowest": [],
          "running_when_stopped": last_started}


def _junit_cases(path: pathlib.Path):
  """`(node id, "passed" / "failed" / "errors" / "skipped", first line of the message, seconds)`
  per test case of pytest's junit XML."""
  for case in ET.parse(path).getroot().iter("testcase"):
    module = case.get("classname", "").replace(".", "/")
    name = f"{module}.py::{case.get('name')}" if module else case.get("name", "")
    outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
    kind = "passed" if outcome is None else {"failure": "failed", "error": "errors",
                                             "skipped": "skipped"}[outcome.tag]
    message = "" if outcome is None else (outcome.get("message") or outcome.text or "").strip()
    yield name, kind, message.splitlines()[0][:300] if message else "", float(
        case.get("time") or 0.0)


def _parse_junit(path: pathlib.Path) -> dict:
  counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
  failures, times = [], []
  for name, kind, message, seconds in _junit_cases(path):
    times.append({"name": name, "seconds": seconds})
    counts[kind] += 1
    if kind in ("failed", "errors"):
      failures.append({"name": name, "message": message})
  times.sort(key=lambda t: -t["seconds"])
  return {"source": "junit", **counts, "not_run": 0, "failures": failures,
          "slowest": times[:5], "running_when_stopped": None}


def failed_tests(state: pathlib.Path) -> list[str]:
  """The tests stage's failed and erroring tests, and the one running when it was stopped."""
  found = parse_pytest(state / "junit.xml", state / _log_name("tests")) or {}
  names = [f["name"] for f in found.get("failures", [])] + [found.get("running_when_stopped")]
  return [name for name in dict.fromkeys(names) if name]


def triage(state: pathlib.Path, stages: list[dict]) -> dict:
  """Per triage switch, the failed tests run again with it set: `{"passed": [node ids],
  "failed": [node ids, errors included]}`, or None where the run left no junit XML (stopped)."""
  found = {}
  for row in stages:
    if row["name"].startswith(TRIAGE):
      switch = row["name"][len(TRIAGE):]
      found[switch] = None
      try:
        cases = list(_junit_cases(state / f"junit-triage-{switch}.xml"))
      except (OSError, ET.ParseError):
        continue
      found[switch] = {"passed": [n for n, kind, _, _ in cases if kind == "passed"],
                       "failed": [n for n, kind, _, _ in cases if kind in ("failed", "errors")]}
  return found


def parse_sanitizer(log: pathlib.Path) -> dict:
  """compute-sanitizer's findings in its `--log-file`.

  Returns:
    `{"findings": int or None (no summary: the run did not finish), "errors", "warnings",
    "first": the first reported line, "printed_in": {kernel: printed findings in it}}`;
    racecheck's summary gives hazards with their errors and warnings, the other tools' "ERROR
    SUMMARY" errors. `printed_in` says whose code the findings are in (ours, CUTLASS's or XLA's)
    as far as the print limit shows them.
  """
  text = log.read_text(errors="replace") if log.is_file() else ""
  result = {"findings": None, "errors": None, "warnings": None, "first": None,
            "printed_in": dict(collections.Counter(
                re.findall(r"^=+\s+at (.+?)\+0x[0-9a-f]+(?: in .*)?$", text, re.MULTILINE)).most_common())}
  if m := re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
                    r"(\d+) warnings?\)", text):
    result.update(findings=int(m[1]), errors=int(m[2]), warnings=int(m[3]))
  elif m := re.search(r"ERROR SUMMARY: (\d+) errors?", text):
    result.update(findings=int(m[1]), errors=int(m[1]), warnings=0)
  if m := re.search(r"^=+ (?!ERROR SUMMARY|RACECHECK SUMMARY|COMPUTE-SANITIZER)(\S.*)$", text,
                    re.MULTILINE):
    result["first"] = m[1][:300]
  return result


def sanitizer_summary(found: dict | None, code: str = "") -> str:
  """"3 findings (3 errors, 0 warnings; printed ones in kernel 2, ...)": whose code they are in.

  `found` is `parse_sanitizer`'s result; `code` quotes the kernel names (e.g. "`" in markdown).
  """
  if not found or found.get("findings") is None:
    return "no summary (its stage was skipped, or stopped before the tool's summary)"
  where = ", ".join(f"{code}{kernel[:60]}{code} {n}"
                    for kernel, n in (found.get("printed_in") or {}).items())
  return (f"{found['findings']} findings ({found['errors']} errors, {found['warnings']} warnings"
          + (f"; printed ones in {where}" if where else "") + ")")


def _last_line(log: pathlib.Path, prefix: str = "") -> str:
  """The log's last non-blank line that starts with `prefix`, cut to 160 characters."""
  text = log.read_text(errors="replace") if log.is_file() else ""
  lines = [l for l in map(str.strip, text.splitlines()) if l and l.startswith(prefix)]
  return lines[-1][:160] if lines else ""


# ---------------------------------------------------------------------------------------------
# The document and the summary.

def _log_name(stage: str) -> str:
  return stage.replace(":", "-") + ".log"


def build_document(state: pathlib.Path) -> dict:
  """The results document from the state directory; whatever is missing is None or absent."""
  env_path = state / "env.json"
  # Without the env stage's facts the commit is still known where git or the stamp is.
  facts = (json.loads(env_path.read_text()) if env_path.is_file()
           else commit_of_tree(REPO, STAMP))
  stages = read_stages(state)
  bench_path, kernels_path = state / "bench.json", state / "kernels.json"
  return {
      "kind": "gpu-check",
      "dry_run": facts.get("dry_run", os.environ.get("CCF_GPU_CHECK_DRY", "0") == "1"),
      "date": facts.get("date") or records.now(),
      "commit": facts.get("commit", "unknown"),
      "commit_source": facts.get("commit_source"),
      "stamp_matches_tree": facts.get("stamp_matches_tree"),
      "device": facts.get("device"), "driver": facts.get("driver"),
      "jax": facts.get("jax"), "jaxlib": facts.get("jaxlib"), "python": facts.get("python"),
      "nvcc": facts.get("nvcc"), "compute_sanitizer": facts.get("compute_sanitizer"),
      "cuda_arch": facts.get("cuda_arch"), "environment": facts,
      "stages": stages,
      "tests": parse_pytest(state / "junit.xml", state / _log_name("tests")),
      "triage": triage(state, stages),
      "sanitizer": {tool: parse_sanitizer(state / f"compute-sanitizer-{tool}.log")
                    for tool in SANITIZER_TOOLS
                    if any(r["name"] == f"sanitizer:{tool}" for r in stages)},
      "kernels": json.loads(kernels_path.read_text()) if kernels_path.is_file() else None,
      "benchmark": json.loads(bench_path.read_text()) if bench_path.is_file() else None,
  }


def _detail(stage: dict, doc: dict, state: pathlib.Path) -> str:
  """One line on what a stage found."""
  name = stage["name"]
  if stage["status"] == "skipped":
    return stage["note"]
  if name == "env":
    return (f"{doc['device'] or 'no GPU'} | driver {doc['driver']} | jax {doc['jax']} | "
            f"commit {doc['commit']}" + ("" if doc["stamp_matches_tree"] is not False
                                         else " (tree differs from the stamp)"))
  if name == "tests" and doc["tests"]:
    t = doc["tests"]
    text = (f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
            f"{t['skipped']} skipped" + (f", {t['not_run']} not run" if t.get("not_run") else ""))
    return text + (f"; stopped in {t['running_when_stopped']}" if t["running_when_stopped"]
                   else "")
  if name.startswith(TRIAGE) and doc["triage"].get(name[len(TRIAGE):]):
    t = doc["triage"][name[len(TRIAGE):]]
    return (f"{len(t['passed'])} of the {len(t['passed']) + len(t['failed'])} failed tests "
            f"pass with {name[len(TRIAGE):]}")
  if name.startswith("sanitizer:"):
    found = doc["sanitizer"].get(name.split(":")[1], {})
    if found.get("findings") is not None:
      return sanitizer_summary(found)
  if name == "kernels" and doc["kernels"]:
    return _kernels_detail(doc["kernels"])
  if name == "benchmark" and doc["benchmark"]:
    return _benchmark_detail(doc["benchmark"])
  if name == "build" and stage["status"] == "passed":  # which CUDA extension ran
    return _last_line(state / _log_name(name), "cuda extension:")
  return "" if stage["status"] == "passed" else _last_line(state / _log_name(name))


def _kernels_detail(kernels: dict) -> str:
  """Per shape, the fused forward+backward's wall and busy time and its longest kernel."""
  parts = []
  for config_name, record in kernels.get("configs", {}).items():
    found = record.get("fused_fwd_bwd", {})
    if "error" in found or not found:
      parts.append(f"{config_name}: {found.get('error', 'not run')}")
      continue
    top = found["kernels"][0]
    parts.append(f"{config_name}: fwd+bwd wall {found['wall_ms']:.2f} ms, busy "
                 f"{found['busy_ms']:.2f} ms, longest {top['name'][:40]} {top['ms']:.2f} ms")
  return " | ".join(parts)


def _benchmark_detail(bench: dict) -> str:
  parts = []
  for config_name, record in bench.get("configs", {}).items():
    fused = record["impls"].get("fused", {})
    if "fwd_bwd_ms" not in fused:
      parts.append(f"{config_name}: fused {fused.get('error', 'not run')}")
      continue
    ratios = ", ".join(f"{impl} {r['fwd_bwd']:.2f}x"
                       for impl, r in record["baseline_ms_over_fused_ms"].items())
    roof = fused.get("fwd_bwd_roof_fraction")
    parts.append(f"{config_name}: fused fwd+bwd {fused['fwd_bwd_ms']:.2f} ms"
                 + (f" ({100 * roof:.0f}% of roof)" if roof else "")
                 + (f"; baseline/fused {ratios}" if ratios else ""))
  return " | ".join(parts)


def summary(doc: dict, state: pathlib.Path) -> str:
  """Failing tests and sanitizer first findings, then the table of stages."""
  lines = []
  for f in (doc["tests"] or {}).get("failures", [])[:15]:
    passing_with = [switch for switch, t in doc["triage"].items()
                    if t and f["name"] in t["passed"]]
    lines.append(f"FAILED {f['name']}" + (f": {f['message']}" if f["message"] else "")
                 + (f" (passes with {', '.join(passing_with)})" if passing_with else ""))
  for tool, found in doc["sanitizer"].items():
    if found.get("findings") and found.get("first"):
      lines.append(f"{tool}: {found['first']}")
  rows = [(s["name"], s["status"], "" if s["seconds"] is None else f"{s['seconds']:.0f}",
           _detail(s, doc, state)) for s in doc["stages"]]
  header = ("stage", "status", "s", "detail")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
  for r in [header, *rows]:
    lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
  return "\n".join(lines)


def report(state: pathlib.Path, results: pathlib.Path, out: pathlib.Path | None = None):
  """Writes `gpu-<date>-<commit>.json` and `.log` (every stage's log, in order) into
  `results`, copies both into `out` if given, and prints the summary last.

  Returns:
    The JSON file's path.
  """
  doc = build_document(state)
  stem = f"gpu-{doc['date'][:10]}-{doc['commit'].split('+')[0]}"
  doc["log"] = f"{stem}.log"
  results.mkdir(parents=True, exist_ok=True)
  json_path, log_path = results / f"{stem}.json", results / f"{stem}.log"
  json_path.write_text(json.dumps(doc, indent=1) + "\n")
  logs = [(s["name"], state / _log_name(s["name"])) for s in doc["stages"]]
  logs += [(f"compute-sanitizer {t}", state / f"compute-sanitizer-{t}.log")
           for t in SANITIZER_TOOLS]
  with log_path.open("w") as f:
    for title, path in logs:
      if path.is_file():
        f.write(f"\n===== {title} =====\n")
        f.write(path.read_text(errors="replace"))
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    for path in (json_path, log_path):
      shutil.copyfile(path, out / path.name)
  print(summary(doc, state))
  print(f"results: {json_path}" + (f" (and in {out})" if out is not None else ""))
  return json_path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("stamp").add_argument("path", type=pathlib.Path)
  env_parser = sub.add_parser("env")
  env_parser.add_argument("path", type=pathlib.Path)
  env_parser.add_argument("--stamp", type=pathlib.Path, default=STAMP)
  sub.add_parser("failed").add_argument("state", type=pathlib.Path)
  carried_parser = sub.add_parser("carried")
  carried_parser.add_argument("carry", type=pathlib.Path)
  carried_parser.add_argument("--arch", required=True)
  workload_parser = sub.add_parser("workload")
  workload_parser.add_argument("--dtypes", default=None,
                               help="comma-separated dtypes whose calls run (default: all)")
  report_parser = sub.add_parser("report")
  report_parser.add_argument("state", type=pathlib.Path)
  report_parser.add_argument("--results", type=pathlib.Path, default=records.RESULTS_DIR)
  report_parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  if args.command == "stamp":
    doc = stamp(args.path)
    print(f"{args.path}: commit {doc['commit']}, {len(doc['files'])} files")
  elif args.command == "env":
    print(json.dumps(env(args.path, args.stamp), indent=1))
  elif args.command == "failed":
    for name in failed_tests(args.state):  # none: nothing printed, and no triage
      print(name)
  elif args.command == "carried":
    path, why = carried_extension(args.carry, args.arch)
    print(f"cuda extension: {why}", file=sys.stderr)
    if path is None:
      sys.exit(1)
    print(path)
  elif args.command == "workload":
    workload(None if args.dtypes is None else tuple(args.dtypes.split(",")))
  else:
    report(args.state, args.results, args.out)


if __name__ == "__main__":
  main()
