"""Result records: where they live, what each must hold, and the run's provenance.

jax is imported by the functions that ask it: bench/gpu_check.py reports the commit and date
with this module where jax may not import at all.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import warnings

RESULTS_DIR = pathlib.Path(__file__).parent / "results"

# Every record has these; `config` has CONFIG_FIELDS.
REQUIRED_FIELDS = ("platform", "device", "commit", "date", "config", "impl", "fwd_ms",
                   "fwd_bwd_ms", "peak_bytes")
CONFIG_FIELDS = ("devices", "tokens", "hidden", "ffn", "experts", "k", "dtype", "skew")


def parser(doc: str) -> argparse.ArgumentParser:
  """A measuring script's command line: `--out DIR` writes its results there and leaves the
  README alone; without it they go to bench/results and its README section is rewritten."""
  parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
  parser.add_argument("--out", type=folder, default=None,
                      help="results folder; the README is rewritten only without it")
  return parser


def folder(text: str) -> pathlib.Path:
  """A results folder from the command line, made now, so that a missing one fails before the
  measuring and not at the write after it."""
  path = pathlib.Path(text)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise argparse.ArgumentTypeError(f"cannot make the folder {text!r}: {error}") from None
  return path


def positive_ints(text: str) -> tuple[int, ...]:
  """Whole numbers of 1 or more, separated by commas, from the command line."""
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive whole numbers separated by commas, "
                                     f"got {text!r}")
  return values


def positive_int(text: str) -> int:
  """One whole number of 1 or more from the command line."""
  values = positive_ints(text)
  if len(values) != 1:
    raise argparse.ArgumentTypeError(f"expected one positive whole number, got {text!r}")
  return values[0]


def config_key(record: dict) -> tuple:
  """The record's configuration, as a key: its `CONFIG_FIELDS` in order."""
  return tuple(record["config"][f] for f in CONFIG_FIELDS)


def platform() -> str:
  """"cpu" or "gpu" (XLA's name for CUDA), from the default backend's devices."""
  import jax
  return jax.devices()[0].platform


def device_description(simulated: int | None = None) -> str:
  """What ran the benchmark, e.g. "NVIDIA H100 80GB HBM3" or "8 simulated CPU devices on 2
  cores (AMD EPYC ...)"; `simulated`: the CPU devices it used, where not all of them."""
  import jax
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return dev.device_kind
  model = "unknown CPU"
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  return (f"{simulated or len(jax.devices())} simulated CPU devices on "
          f"{len(os.sched_getaffinity(0))} cores ({model})")


def commit() -> str:
  """The checked-out commit (short hash), with "+dirty" when tracked files differ from it."""
  repo = pathlib.Path(__file__).parent.parent
  git = lambda *args: subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
  head = git("rev-parse", "--short", "HEAD")
  if head.returncode:
    return "unknown"
  dirty = git("diff", "--quiet", "HEAD").returncode != 0
  return head.stdout.strip() + ("+dirty" if dirty else "")


def now() -> str:
  """UTC date and time, ISO 8601 to the second."""
  return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def provenance(records: list[dict]) -> str:
  """"Commit `c`, <date>" of a run's records; where a commit was made while it measured, each
  commit with the number of records it holds, and the first and last date."""
  counts = {}
  for r in records:
    counts[r["commit"]] = counts.get(r["commit"], 0) + 1
  if len(counts) == 1:
    return f"Commit `{records[0]['commit']}`, {records[0]['date']}"
  commits = ", ".join(f"`{c}` ({n} row{'s' * (n > 1)})" for c, n in counts.items())
  return f"Commits {commits}, {records[0]['date']} to {records[-1]['date']}"


def check(record: dict) -> None:
  """Raises `ValueError` unless `record` has every required field and positive times."""
  missing = [f for f in REQUIRED_FIELDS if f not in record]
  missing += [f"config.{f}" for f in CONFIG_FIELDS if f not in record.get("config", {})]
  if missing:
    raise ValueError(f"record lacks {missing}: {record}")
  if not (record["fwd_ms"] > 0 and record["fwd_bwd_ms"] > 0 and record["peak_bytes"] > 0):
    raise ValueError(f"record has a non-positive time or size: {record}")


def write(records: list[dict], out_dir: pathlib.Path) -> pathlib.Path:
  """Writes `<platform>-<date>-<commit>.json` (`-2`, `-3`, ... after it where an earlier run of
  the day and commit wrote one) and its copy `latest-<platform>.json`.

  Returns:
    The dated file's path.
  """
  for r in records:
    check(r)
  first = records[0]
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"{first['platform']}-{first['date'][:10]}-{first['commit'].split('+')[0]}"
  path, runs = out_dir / f"{stem}.json", 1
  while path.exists():
    runs += 1
    path = out_dir / f"{stem}-{runs}.json"
  write_whole(records, path)
  write_whole(records, out_dir / f"latest-{first['platform']}.json")
  return path


def write_whole(doc, path: pathlib.Path) -> None:
  """`doc` as JSON at `path`, written beside it and renamed into place: a run stopped by its
  time limit midway leaves the last whole document (the configurations it finished)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".partial")
  partial.write_text(json.dumps(doc, indent=1) + "\n")
  partial.replace(path)


def load_latest(out_dir: pathlib.Path = RESULTS_DIR) -> dict[str, list[dict]]:
  """`{platform: records}` from every `latest-<platform>.json` in `out_dir`.

  Raises:
    ValueError: a file that is not JSON, holds no records, a record that fails `check`, or a
      configuration without a `fused` record (what the report compares against); naming it.
  """
  latest = {}
  for path in sorted(out_dir.glob("latest-*.json")):
    try:
      recs = json.loads(path.read_text())
      if not isinstance(recs, list) or not recs:
        raise ValueError("it holds no records")
      for r in recs:
        check(r)
      configs = {config_key(r) for r in recs} - {config_key(r) for r in recs
                                                   if r["impl"] == "fused"}
      if configs:
        raise ValueError(f"no fused record for the configurations {sorted(configs)}")
    except ValueError as error:  # json.JSONDecodeError is one
      raise ValueError(f"{path}: {error}") from None
    latest[path.stem.removeprefix("latest-")] = recs
  return latest


def newest_gpu_results(out_dir: pathlib.Path = RESULTS_DIR,
                       device: str = "") -> tuple[pathlib.Path, dict] | None:
  """The newest `gpu-<date>-<commit>.json` (bench/gpu_check.py's results file) in `out_dir`
  whose device name contains `device` and that holds a benchmark measured on a GPU (not a
  dry run), with its document; None when there is none. Newest by the document's `date`."""
  found = []
  for path in out_dir.glob("gpu-*.json"):
    try:
      doc = json.loads(path.read_text())
    except ValueError as error:  # half-written: the other files still count
      warnings.warn(f"{path} is not a results file, left out: {error}", stacklevel=2)
      continue
    if not isinstance(doc, dict) or doc.get("dry_run") or not doc.get("benchmark"):
      continue
    if device in (doc.get("device") or doc["benchmark"].get("device") or ""):
      found.append((doc.get("date", ""), path.name, path, doc))
  if not found:
    return None
  *_, path, doc = max(found, key=lambda item: item[:2])
  return path, doc
