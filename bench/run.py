"""`python -m bench.run` (what `make bench` runs): fused_moe against the baselines, one run.

On CPU (no GPU present) the D = 8 simulated devices of one process run, side by side and
interleaved sample by sample:

- `fused`: `jax_ccfuser.fused_moe`;
- `all_to_all`: `all_to_all_moe`, dropless (buffers padded to the worst case);
- `all_to_all_cf1.25`: `all_to_all_moe(capacity_factor=1.25)`, which drops rows;
- `roof`: a dense matmul per device with the same useful FLOPs;

forward and forward+backward, over sweeps of tokens per device, experts, K and routing skew.
Each configuration prints one line per implementation (ms, useful GFLOP/s, % of the roof by
wall clock and by process CPU time, XLA's per-device activation bytes) and the run writes `bench/results/<platform>-<date>-
<commit>.json` (`-2`, `-3`, ... after it for a later run of the day and commit) plus
`latest-<platform>.json`, then regenerates the plots and the README table (`bench.report`);
with `--out DIR` it writes there and leaves the plots and the README alone.

It always measures the CPU path (it selects JAX's CPU backend, also on a GPU machine); the GPU
benchmark is `python -m bench.gpu`, which `bench/gpu_check.sh` runs.

Examples:
  python -m bench.run                      # the full CPU sweep (~10 minutes on 2 cores)
  python -m bench.run --quick              # tiny shapes, one sample each, into a temp dir
  python -m bench.run --sweeps tokens,skew --tokens 128,256
"""

import argparse
import dataclasses
import pathlib
import sys
import tempfile

import jax
from tqdm import tqdm

from bench import records
from bench.problem import Config
from bench.timing import compile_program, interleaved_medians

_KINDS = ("forward", "forward_backward")

_CPU_BASE = Config(devices=8, tokens=128, hidden=256, ffn=512, experts=8, k=2)
_CPU_QUICK = Config(devices=8, tokens=16, hidden=32, ffn=64, experts=8, k=2)
# Sweep name -> (field, values); each varies one field of the base configuration.
_CPU_SWEEPS = {
    "tokens": ("tokens", (64, 128, 256, 512)),
    "experts": ("experts", (8, 16, 32)),
    "k": ("k", (1, 2, 4)),
    "skew": ("skew", (0.0, 0.5, 1.0)),
}
_CPU_QUICK_SWEEPS = {
    "tokens": ("tokens", (8, 16)),
    "experts": ("experts", (8, 16)),
    "k": ("k", (1, 2)),
    "skew": ("skew", (0.0, 1.0)),
}
def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes and one sample each; writes to a temporary directory "
                           "unless --out is given, and regenerates no plots or README")
  parser.add_argument("--sweeps", type=lambda text: text.split(","), default=None,
                      help="comma-separated sweeps to run (tokens,experts,k,skew); default: all")
  parser.add_argument("--tokens", type=records.positive_ints, default=None,
                      help="comma-separated tokens per device for the tokens sweep")
  parser.add_argument("--min-samples", type=int, default=None,
                      help="timed samples kept per program, at least (default 3; quick 1)")
  parser.add_argument("--max-samples", type=int, default=None,
                      help="timed samples kept per program, at most (default 10; quick 1)")
  parser.add_argument("--budget", type=float, default=20.0,
                      help="seconds of timed calls per configuration after which sampling "
                           "stops once every program has --min-samples")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help=f"results directory (default {records.RESULTS_DIR}); the plots and "
                           "the README are regenerated only without it")
  parser.add_argument("--no-report", action="store_true",
                      help="do not regenerate the plots and the README table")
  args = parser.parse_args(argv)
  args.min_samples = args.min_samples or (1 if args.quick else 3)
  args.max_samples = max(args.min_samples, args.max_samples or (1 if args.quick else 10))
  # The README shows bench/results: results written elsewhere leave it alone.
  args.report = args.out is None and not (args.quick or args.no_report)
  if args.out is None:
    args.out = (pathlib.Path(tempfile.mkdtemp(prefix="ccf-bench-")) if args.quick
                else records.RESULTS_DIR)
  return args


def _select(sweeps: dict, names) -> dict:
  if names is None:
    return sweeps
  unknown = set(names) - set(sweeps)
  if unknown:
    raise SystemExit(f"unknown sweeps {sorted(unknown)}; choose from {sorted(sweeps)}")
  return {n: sweeps[n] for n in names}


def _cpu_plan(args) -> dict[Config, list[str]]:
  """`{config: [sweeps it belongs to]}`, in run order; shared configurations run once."""
  base = _CPU_QUICK if args.quick else _CPU_BASE
  sweeps = dict(_CPU_QUICK_SWEEPS if args.quick else _CPU_SWEEPS)
  if args.tokens:
    sweeps["tokens"] = ("tokens", args.tokens)
  plan = {}
  for name, (field, values) in _select(sweeps, args.sweeps).items():
    for v in values:
      plan.setdefault(dataclasses.replace(base, **{field: v}), []).append(name)
  return plan


def measure(config: Config, programs: dict, *, min_samples: int, max_samples: int,
            budget_s: float) -> dict[str, dict]:
  """Times and sizes every program of one configuration.

  Returns:
    `{impl: fields}` with the record's measured fields: fwd_ms, fwd_bwd_ms (wall clock),
    fwd_cpu_ms, fwd_bwd_cpu_ms (process CPU time), peak_bytes (forward+backward program),
    activation_bytes (its XLA temp bytes), fwd_peak_bytes, fwd_activation_bytes, samples, and
    the derived useful_gflop (forward, of the rows the program kept), GFLOP/s, roof fractions
    (roof time / this time: fwd_roof_fraction, roof_fraction for forward+backward,
    cpu_roof_fraction for its CPU time) and dropped_fraction.
  """
  compiled, memory = {}, {}
  for impl, program in programs.items():
    for kind in _KINDS:
      compiled[impl, kind], memory[impl, kind] = compile_program(getattr(program, kind),
                                                                 program.inputs(0))
  times = interleaved_medians(
      {key: (c, programs[key[0]].inputs) for key, c in compiled.items()},
      min_samples=min_samples, max_samples=max_samples, budget_s=budget_s)
  roof = {kind: times["roof", kind] for kind in _KINDS}
  useful = {kind: config.useful_flop(kind == "forward_backward") for kind in _KINDS}
  fields = {}
  for impl, program in programs.items():
    t = {kind: times[impl, kind] for kind in _KINDS}
    ms = {kind: t[kind].ms for kind in _KINDS}
    fwd_mem, bwd_mem = memory[impl, "forward"], memory[impl, "forward_backward"]
    fields[impl] = dict(
        fwd_ms=ms["forward"], fwd_bwd_ms=ms["forward_backward"],
        fwd_cpu_ms=t["forward"].cpu_ms, fwd_bwd_cpu_ms=t["forward_backward"].cpu_ms,
        peak_bytes=bwd_mem.peak, activation_bytes=bwd_mem.temp,
        fwd_peak_bytes=fwd_mem.peak, fwd_activation_bytes=fwd_mem.temp,
        useful_gflop=useful["forward"] * (1 - program.dropped) / 1e9,
        fwd_gflops=useful["forward"] * (1 - program.dropped) / ms["forward"] / 1e6,
        fwd_bwd_gflops=(useful["forward_backward"] * (1 - program.dropped)
                        / ms["forward_backward"] / 1e6),
        fwd_roof_fraction=roof["forward"].ms / ms["forward"],
        roof_fraction=roof["forward_backward"].ms / ms["forward_backward"],
        cpu_roof_fraction=roof["forward_backward"].cpu_ms / t["forward_backward"].cpu_ms,
        dropped_fraction=program.dropped,
        samples=min(t[kind].samples for kind in _KINDS))
  return fields


def _line(config: Config, impl: str, f: dict) -> str:
  return (f"T={config.tokens:<5d} E={config.experts:<3d} K={config.k} skew={config.skew:.2f} "
          f"{impl:<18s} fwd {f['fwd_ms']:9.2f} ms {f['fwd_gflops']:7.1f} GFLOP/s "
          f"{100 * f['fwd_roof_fraction']:5.1f}% roof | fwd+bwd {f['fwd_bwd_ms']:9.2f} ms "
          f"{f['fwd_bwd_gflops']:7.1f} GFLOP/s {100 * f['roof_fraction']:5.1f}% roof "
          f"(CPU time {100 * f['cpu_roof_fraction']:5.1f}%) | "
          f"act {f['activation_bytes'] / 2**20:7.2f} MiB"
          + (f" | drops {100 * f['dropped_fraction']:.1f}%" if f["dropped_fraction"] else ""))


def main(argv=None) -> list[dict]:
  """Runs the benchmark; returns the records it wrote."""
  args = _parse_args(argv)
  # Only effective before the backends start, which nothing above has done.
  jax.config.update("jax_platforms", "cpu")
  if jax.config.jax_num_cpu_devices < _CPU_BASE.devices:
    jax.config.update("jax_num_cpu_devices", _CPU_BASE.devices)
  # Imported here: they build on the library, whose devices must come up after the lines above.
  from bench.programs import cpu_programs
  plan = _cpu_plan(args)
  provenance = dict(platform=records.platform(),
                    device=records.device_description(_CPU_BASE.devices),
                    commit=records.commit(), date=records.now())
  tqdm.write(f"{provenance['device']}, commit {provenance['commit']}: {len(plan)} "
             f"configurations")
  results = []
  for config, sweeps in tqdm(plan.items(), desc="configurations", unit="config",
                             file=sys.stderr):
    fields = measure(config, cpu_programs(config), min_samples=args.min_samples,
                     max_samples=args.max_samples, budget_s=args.budget)
    for impl, f in fields.items():
      tqdm.write(_line(config, impl, f))
      results.append(dict(provenance, config=dataclasses.asdict(config), impl=impl,
                          sweeps=sweeps, **f))
  path = records.write(results, args.out)
  tqdm.write(f"wrote {path}")
  if args.report:
    from bench import report
    report.regenerate(args.out)
  return results


if __name__ == "__main__":
  main()
