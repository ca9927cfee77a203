"""Keep or recompute the hidden activations: `python -m bench.residuals`.

On 8 simulated CPU devices, `fused_moe`'s forward+backward with `residuals="inputs"` (the
backward recomputes h = x @ w_in) and `residuals="hidden"` (the forward keeps it), side by side
in the same rounds, for a small, a middle and a large F (the GEMMs' share of the step grows with
F: the exchange, the activation and the combine grow with H only) and a skewed routing, without
and with a reassignment plan (the busiest device keeps T*K rows and recomputes the rest; the
plan brings it near T*K rows). Memory per device: the kept bytes from
the shapes (`T * K * 2F * 4`, float32) and XLA's temp bytes of each program. Writes
`bench/results/residuals-cpu.json` and `residuals-cpu.png` and rewrites README.md between
`<!-- residuals:start -->` and `<!-- residuals:end -->` (with `--out DIR`: the files there, the
README untouched). No GPU figures: run it where the platform is CPU.
"""

import dataclasses
import functools
import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ccfuser as ccf  # noqa: E402
from bench import records, report  # noqa: E402
from bench.problem import Config, make_inputs  # noqa: E402
from bench.programs import ep_mesh, half_square_grad, perturbed, planned_layer  # noqa: E402
from bench.timing import compile_program, interleaved_medians  # noqa: E402

SETTINGS = ("inputs", "hidden")
BASE = Config(devices=8, tokens=256, hidden=256, ffn=512, experts=16, k=2)
# (configuration, whether a reassignment plan runs in the layer).
CONFIGS = [(dataclasses.replace(BASE, ffn=f), False) for f in (64, 512, 2048)] + [
    (dataclasses.replace(BASE, skew=0.5), planned) for planned in (False, True)]
_MIB = 2**20


def _kept_bytes(config: Config) -> int:
  """h rows one device keeps under "hidden": T*K of them, 2F float32 each (swiglu)."""
  return config.tokens * config.k * 2 * config.ffn * 4


def measure(config: Config, planned: bool) -> dict:
  """One record: forward+backward medians and memory per device of both settings."""
  mesh = ep_mesh(config.devices)
  arrays = make_inputs(config)
  arrays = jax.device_put(arrays, NamedSharding(mesh, P("ep")))
  shard = functools.partial(jax.shard_map, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
  loads = jax.jit(shard(lambda ids: jnp.stack(ccf.plan_loads(
      ccf.reassign(ids, config.experts, axis_name="ep")))[None]))(arrays[1])[0]
  busiest = int(loads[int(planned)].max())
  inputs = perturbed(arrays, (0, 2))
  runs, temp = {}, {}
  for residuals in SETTINGS:
    layer = shard(planned_layer(config, planned, residuals=residuals))
    compiled, memory = compile_program(jax.jit(half_square_grad(layer, (0, 2, 3, 4))),
                                       inputs(0))
    runs[residuals] = (compiled, inputs)
    temp[residuals] = memory.temp
  timings = interleaved_medians(runs, min_samples=9, max_samples=15, budget_s=40)
  return {"platform": records.platform(), "device": records.device_description(),
          "commit": records.commit(), "date": records.now(), "config": vars(config).copy(),
          "plan": planned, "fwd_bwd_ms": {s: timings[s].ms for s in SETTINGS},
          "cpu_ms": {s: timings[s].cpu_ms for s in SETTINGS},
          "samples": min(t.samples for t in timings.values()),
          "temp_bytes": temp, "kept_bytes": _kept_bytes(config),
          "busiest_rows_over_mean": float(busiest / (config.tokens * config.k))}


def _label(rec: dict) -> str:
  c = rec["config"]
  return (f"F={c['ffn']}" + (f", skew {c['skew']}" if c["skew"] else "")
          + (", plan" if rec["plan"] else ""))


def plot(recs: list[dict], path) -> None:
  """Forward+backward ms and XLA's temp MiB per device, both settings side by side."""
  from bench.report import plt
  labels = [_label(r) for r in recs]
  y = np.arange(len(recs))
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.2))
  for i, setting in enumerate(SETTINGS):
    offset = (i - 0.5) * 0.38
    ms = [r["fwd_bwd_ms"][setting] for r in recs]
    ax_t.barh(y + offset, ms, 0.38, color=f"C{i}")
    ax_m.barh(y + offset, [r["temp_bytes"][setting] / _MIB for r in recs], 0.38, color=f"C{i}",
              label=f'residuals="{setting}"')
    for yy, v in zip(y + offset, ms):
      ax_t.text(v, yy, f" {v:.0f}", va="center", fontsize=7)
  ax_t.set_xscale("log")
  ax_t.xaxis.set_minor_formatter(plt.NullFormatter())
  ax_t.set_xlabel("forward+backward ms (median)")
  ax_m.set_xlabel("XLA temp MiB per device")
  for ax in (ax_t, ax_m):
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
  ax_m.set_yticklabels([])
  ax_m.legend(fontsize=7, loc="lower right")
  fig.suptitle(f"{recs[0]['device']}, commit {recs[0]['commit']}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


START, END = "<!-- residuals:start -->", "<!-- residuals:end -->"
# The table's columns: (header, the cell of a record).
_COLUMNS = (
    ("F", lambda r: r["config"]["ffn"]),
    ("skew", lambda r: r["config"]["skew"]),
    ("plan", lambda r: "yes" if r["plan"] else "no"),
    ("busiest device rows / T*K", lambda r: f"{r['busiest_rows_over_mean']:.2f}"),
    ("kept h MiB per device", lambda r: f"{r['kept_bytes'] / _MIB:.2f}"),
    ("XLA temp MiB: inputs / hidden",
     lambda r: " / ".join(f"{r['temp_bytes'][s] / _MIB:.2f}" for s in SETTINGS)),
    ("fwd+bwd ms: inputs / hidden",
     lambda r: " / ".join(f"{r['fwd_bwd_ms'][s]:.1f}" for s in SETTINGS)),
    ("hidden speed-up", lambda r: f"{r['fwd_bwd_ms']['inputs'] / r['fwd_bwd_ms']['hidden']:.2f}x"),
    ("by CPU time", lambda r: f"{r['cpu_ms']['inputs'] / r['cpu_ms']['hidden']:.2f}x"),
)


def section(recs: list[dict]) -> str:
  """The results as README text: a sentence of provenance, then the table."""
  c0 = recs[0]["config"]
  row = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
  return "\n".join([
      "_Generated by `python -m bench.residuals` (medians, measured side by side)._",
      "",
      f"{records.provenance(recs)}; {recs[0]['device']}; float32, swiglu, "
      f"T={c0['tokens']} per device, H={c0['hidden']}, E={c0['experts']}, K={c0['k']}, "
      f"D={c0['devices']}; forward+backward, {min(r['samples'] for r in recs)}+ samples each. "
      "Wall clock, and the process's CPU time (all threads: what other load on the machine "
      "disturbs least, but spin-waits count).",
      "",
      "![forward+backward time and XLA temp memory, inputs or hidden rows kept]"
      "(bench/results/residuals-cpu.png)",
      "",
      row(header for header, _ in _COLUMNS),
      row("---" for _ in _COLUMNS),
      *(row(cell(r) for _, cell in _COLUMNS) for r in recs),
  ])


def main(argv=None) -> list[dict]:
  out = records.parser(__doc__).parse_args(argv).out or records.RESULTS_DIR
  recs = [measure(config, planned) for config, planned in CONFIGS]
  for r in recs:
    print(json.dumps(r))
  (out / "residuals-cpu.json").write_text(json.dumps(recs, indent=1))
  plot(recs, out / "residuals-cpu.png")
  print(section(recs))
  if out == records.RESULTS_DIR:
    report.write_section(section(recs), start=START, end=END, heading="Keep or recompute")
  return recs


if __name__ == "__main__":
  main()
