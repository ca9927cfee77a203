"""`python -m bench.kernels`: where the fused layer's GPU time goes, kernel by kernel.

For `bench.gpu`'s configurations, the fused forward and forward+backward (and the dense roof
beside them, whose one GEMM is the yardstick for the grouped ones) run a few times under
jax's profiler; CUPTI's records of the device's streams give each kernel's time. `fused` runs
its GEMMs in source phases or not as the shape decides, `fused_phases` the same program in
phases whatever the shape (JAX_CCFUSER_SOURCE_PHASES=1), so the two show what phases cost.
Per program:

- `wall_ms`: the span from the first kernel's start to the last one's end, per call (the
  calls run back to back, each waited for, so the host's turn between two calls is in it);
- `busy_ms`: the time at least one kernel ran, per call (wall minus busy: the device idled,
  waiting on the host: launches, synchronisation, allocation, the turn between calls);
- `kernels`: per kernel name (demangled where `c++filt` is on the PATH), its calls and
  milliseconds per layer call, longest first.

The benchmark's medians say how fast; this says where the time goes, so a change to one stage
is measured against the rest. Writes one JSON document (`--out`); prints the top kernels.
"""

import argparse
import collections
import contextlib
import dataclasses
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

from bench import gpu, records
from bench.programs import gpu_programs
from bench.timing import compile_program

# Each one's program in `bench.programs.gpu_programs`, and the environment it runs under.
# The yardstick comes second and the phases' cost last: a run stopped at its time limit keeps
# what it wrote before (each program's record is written as it completes).
PROGRAMS = {"fused": ("fused", {}),
            "roof": ("roof", {}),
            "fused_phases": ("fused", {"JAX_CCFUSER_SOURCE_PHASES": "1"})}
_KINDS = {"fwd": "forward", "fwd_bwd": "forward_backward"}


@dataclasses.dataclass(frozen=True)
class KernelEvent:
  name: str
  start_ns: float
  duration_ns: float


def _device_events(xspace_path: pathlib.Path) -> tuple[list[KernelEvent], list[str]]:
  """The events on the GPU planes' stream lines of one trace, and the lines they came from."""
  from jax.profiler import ProfileData  # noqa: PLC0415 (jaxlib's reader of the trace)
  lines = {}
  for plane in ProfileData.from_file(str(xspace_path)).planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        lines[f"{plane.name} {line.name}"] = [KernelEvent(e.name, e.start_ns, e.duration_ns)
                                              for e in line.events]
  # CUPTI's activity lines are one per stream; derived lines (XLA ops, modules), where a
  # version adds them, would count the same kernels twice. Lines otherwise named, all of them.
  chosen = [name for name in lines if " Stream" in name] or list(lines)
  return [e for name in chosen for e in lines[name]], chosen


def _busy_ns(events: list[KernelEvent]) -> float:
  """Length of the union of the events' intervals."""
  busy, end = 0.0, float("-inf")
  for e in sorted(events, key=lambda e: e.start_ns):
    stop = e.start_ns + e.duration_ns
    if stop > end:
      busy += stop - max(e.start_ns, end)
      end = stop
  return busy


def _demangled(names: list[str]) -> dict[str, str]:
  """`{mangled: readable}` through `c++filt` where it is installed; names as they are if not."""
  tool = shutil.which("c++filt")
  if tool is None or not names:
    return {n: n for n in names}
  out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                       check=False).stdout.splitlines()
  return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def summarize(events: list[KernelEvent], calls: int, lines: list[str] = (),
              top: int = 25) -> dict:
  """Per-call wall, busy and per-kernel milliseconds of `calls` traced calls, from `lines`."""
  if not events:
    return {"error": "no GPU kernel in the trace (no CUPTI, or not a GPU)"}
  per_name = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    per_name[e.name][0] += 1
    per_name[e.name][1] += e.duration_ns
  readable = _demangled(list(per_name))
  ranked = sorted(per_name.items(), key=lambda item: -item[1][1])
  start = min(e.start_ns for e in events)
  stop = max(e.start_ns + e.duration_ns for e in events)
  return {
      "calls": calls,
      "lines": list(lines),
      "wall_ms": (stop - start) / calls / 1e6,
      "busy_ms": _busy_ns(events) / calls / 1e6,
      "kernel_ms": sum(d for _, d in per_name.values()) / calls / 1e6,
      "kernels": [{"name": readable[name][:240], "launches": n / calls, "ms": d / calls / 1e6}
                  for name, (n, d) in ranked[:top]],
      "other_kernels_ms": sum(d for _, (_, d) in ranked[top:]) / calls / 1e6,
  }


@contextlib.contextmanager
def _environment(values: dict):
  """`os.environ` updated with `values` inside the block (the CUDA handler reads its switches
  at each call)."""
  saved = {name: os.environ.get(name) for name in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def profile(compiled, inputs, calls: int) -> dict:
  """Traces `calls` calls of `compiled` on `inputs` (built before the trace starts)."""
  jax.block_until_ready(compiled(*inputs))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(calls):
        jax.block_until_ready(compiled(*inputs))
    traces = sorted(pathlib.Path(log_dir).rglob("*.xplane.pb"))
    if not traces:
      return {"error": "the profiler wrote no trace"}
    events, lines = _device_events(traces[-1])
    return summarize(events, calls, lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m bench.kernels",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write")
  parser.add_argument("--quick", action="store_true", help="tiny shapes, a CPU will do")
  parser.add_argument("--calls", type=int, default=3, help="traced calls per program")
  parser.add_argument("--configs", default=None,
                      help=f"comma-separated subset of {', '.join(gpu.CONFIGS)}, run in that "
                           "order")
  args = parser.parse_args(argv)
  configs = gpu.select_configs(args.quick, args.configs)
  doc = {"device": records.device_description(), "jax": jax.__version__, "date": records.now(),
         "fused_gemms": gpu.fused_gemms(), "configs": {}}
  for name, config in configs.items():
    programs = gpu_programs(config)
    record, compiled = doc["configs"].setdefault(name, {}), {}
    for impl, (program_name, environment) in PROGRAMS.items():
      for short, kind in _KINDS.items():
        program = programs[program_name]
        try:
          if (program_name, short) not in compiled:
            compiled[program_name, short], _ = compile_program(getattr(program, kind),
                                                               program.inputs(0))
          with _environment(environment):
            found = profile(compiled[program_name, short], program.inputs(1), args.calls)
        except Exception as e:  # noqa: BLE001 (recorded: the other programs still run)
          found = {"error": gpu.first_line(e)}
        record[f"{impl}_{short}"] = found
        print(f"{name} {impl} {short}: " + (
            found.get("error") or f"wall {found['wall_ms']:.2f} ms, busy {found['busy_ms']:.2f}"
            f" ms, kernels {found['kernel_ms']:.2f} ms"), flush=True)
        for k in found.get("kernels", [])[:8]:
          print(f"    {k['ms']:8.3f} ms  x{k['launches']:<5g} {k['name'][:110]}", flush=True)
        records.write_whole(doc, args.out)
  return doc


if __name__ == "__main__":
  main()
