"""Keep or recompute the hidden activations: `python -m bench.residuals`.

On 8 simulated CPU devices, `fused_moe`'s forward+backward with `residuals="inputs"` (the
backward recomputes h = x @ w_in) and `residuals="hidden"` (the forward keeps it), side by side
in the same rounds, for a small, a middle and a large F (the GEMMs' share of the step grows with
F: the exchange, the activation and the combine grow with H only) and a skewed routing, without
and with a reassignment plan (the busiest device keeps T*K rows and recomputes the rest; the
plan brings it near T*K rows). Memory per device: the kept bytes from
the shapes (`T * K * 2F * 4`, float32) and XLA's temp bytes of each program. Then a scan over
layers, each layer under `jax.checkpoint` (as `nnx.remat` and `nn.remat` make them) or not:
what the rematerialising backward reruns of the forward call with each setting. Writes
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
from bench.problem import ACTIVATION, Config, make_inputs  # noqa: E402
from bench.programs import ep_mesh, half_square_grad, perturbed, planned_layer  # noqa: E402
from bench.timing import compile_program, interleaved_medians  # noqa: E402

SETTINGS = ("inputs", "hidden")
BASE = Config(devices=8, tokens=256, hidden=256, ffn=512, experts=16, k=2)
# (configuration, whether a reassignment plan runs in the layer).
CONFIGS = [(dataclasses.replace(BASE, ffn=f), False) for f in (64, 512, 2048)] + [
    (dataclasses.replace(BASE, skew=0.5), planned) for planned in (False, True)]
_MIB = 2**20
# The scan's programs: (label, residuals, each layer under jax.checkpoint, the name a
# save_only_these_names policy saves, or None).
LAYERS = 4
REMAT = (("inputs", "inputs", False, None), ("hidden", "hidden", False, None),
         ("inputs, remat", "inputs", True, None), ("hidden, remat", "hidden", True, None),
         ("hidden, remat, kept rows saved", "hidden", True, "fused_moe_kept_rows"))


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


def _scanned_layers(residuals: str, remat: bool, saved: str | None):
  """`LAYERS` residual MoE layers in a `scan`, each under `jax.checkpoint` when `remat` (the
  policy saving `saved`, else nothing)."""
  policy = saved and jax.checkpoint_policies.save_only_these_names(saved)

  def layers(x, ids, weights, w_ins, w_outs):
    def layer(x, w):
      return x + ccf.fused_moe(x, ids, weights, *w, axis_name="ep", activation=ACTIVATION,
                               residuals=residuals), None
    return jax.lax.scan(jax.checkpoint(layer, policy=policy) if remat else layer, x,
                        (w_ins, w_outs))[0]
  return layers


def measure_remat(config: Config) -> dict:
  """The record of the scan's programs: forward+backward medians, XLA's temp bytes and the
  forward calls in the compiled loop's body (one layer's)."""
  mesh = ep_mesh(config.devices)
  x, ids, weights, w_in, w_out = make_inputs(config)
  scales = np.linspace(1.0, 0.5, LAYERS, dtype=np.float32)[:, None, None, None]  # layers differ
  arrays = jax.device_put((x, ids, weights, scales * w_in, scales * w_out),
                          (NamedSharding(mesh, P("ep")),) * 3
                          + (NamedSharding(mesh, P(None, "ep")),) * 2)
  inputs = perturbed(arrays, (0, 2))
  runs, temp, calls = {}, {}, {}
  for label, residuals, remat, saved in REMAT:
    layers = jax.shard_map(_scanned_layers(residuals, remat, saved), mesh=mesh,
                           in_specs=(P("ep"),) * 3 + (P(None, "ep"),) * 2, out_specs=P("ep"))
    compiled, memory = compile_program(jax.jit(half_square_grad(layers, (0, 2, 3, 4))),
                                       inputs(0))
    runs[label], temp[label] = (compiled, inputs), memory.temp
    calls[label] = compiled.as_text().count('custom_call_target="ccf_moe_fwd"')
  timings = interleaved_medians(runs, min_samples=9, max_samples=15, budget_s=40)
  return {"platform": records.platform(), "device": records.device_description(),
          "commit": records.commit(), "date": records.now(), "config": vars(config).copy(),
          "layers": LAYERS, "fwd_bwd_ms": {label: t.ms for label, t in timings.items()},
          "cpu_ms": {label: t.cpu_ms for label, t in timings.items()},
          "samples": min(t.samples for t in timings.values()), "temp_bytes": temp,
          "forward_calls_per_layer": calls}


def _label(rec: dict) -> str:
  c = rec["config"]
  return (f"F={c['ffn']}" + (f", skew {c['skew']}" if c["skew"] else "")
          + (", plan" if rec["plan"] else ""))


def plot(results: dict, path) -> None:
  """Forward+backward ms and XLA's temp MiB per device, both settings side by side; then the
  scan's forward+backward ms with and without remat."""
  from bench.report import plt
  recs, remat = results["layers"], results["remat"]
  labels = [_label(r) for r in recs]
  y = np.arange(len(recs))
  fig, (ax_t, ax_m, ax_r) = plt.subplots(1, 3, figsize=(13, 3.2),
                                         gridspec_kw={"width_ratios": [1, 1, 1.1]})
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
  programs = [label for label, *_ in REMAT]
  ms = [remat["fwd_bwd_ms"][label] for label in programs]
  y = np.arange(len(programs))
  ax_r.barh(y, ms, 0.6, color=[f"C{int(label.startswith('hidden'))}" for label in programs])
  for yy, v in zip(y, ms):
    ax_r.text(v, yy, f" {v:.0f}", va="center", fontsize=7)
  ax_r.set_yticks(y, programs, fontsize=7)
  ax_r.yaxis.tick_right()
  ax_r.invert_yaxis()
  ax_r.grid(alpha=0.3, axis="x")
  ax_r.set_xlabel(f"{remat['layers']} layers in a scan: forward+backward ms")
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


# The scan's table: (header, the cell of a program given the record and the program's label).
_REMAT_COLUMNS = (
    ("program", lambda r, label: label),
    ("forward calls per layer", lambda r, label: r["forward_calls_per_layer"][label]),
    ("XLA temp MiB", lambda r, label: f"{r['temp_bytes'][label] / _MIB:.2f}"),
    ("fwd+bwd ms", lambda r, label: f"{r['fwd_bwd_ms'][label]:.1f}"),
    ("time / inputs' without remat",
     lambda r, label: f"{r['fwd_bwd_ms'][label] / r['fwd_bwd_ms'][REMAT[0][0]]:.2f}"),
    ("by CPU time", lambda r, label: f"{r['cpu_ms'][label] / r['cpu_ms'][REMAT[0][0]]:.2f}"),
)


def section(results: dict) -> str:
  """The results as README text: a sentence of provenance, then the tables."""
  recs, remat = results["layers"], results["remat"]
  c0 = recs[0]["config"]
  row = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
  return "\n".join([
      "_Generated by `python -m bench.residuals` (medians, measured side by side)._",
      "",
      f"{records.provenance(recs + [remat])}; {recs[0]['device']}; float32, swiglu, "
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
      "",
      f"{remat['layers']} layers of F={remat['config']['ffn']} in a `lax.scan`, each under "
      "`jax.checkpoint` (remat) or not; kept rows saved by a "
      "`save_only_these_names(\"fused_moe_kept_rows\")` policy in the last row; "
      f"{remat['samples']}+ samples each:",
      "",
      row(header for header, _ in _REMAT_COLUMNS),
      row("---" for _ in _REMAT_COLUMNS),
      *(row(cell(remat, label) for _, cell in _REMAT_COLUMNS) for label, *_ in REMAT),
  ])


def main(argv=None) -> dict:
  out = records.parser(__doc__).parse_args(argv).out or records.RESULTS_DIR
  results = {"layers": [measure(config, planned) for config, planned in CONFIGS],
             "remat": measure_remat(BASE)}
  for r in [*results["layers"], results["remat"]]:
    print(json.dumps(r))
  (out / "residuals-cpu.json").write_text(json.dumps(results, indent=1))
  plot(results, out / "residuals-cpu.png")
  print(section(results))
  if out == records.RESULTS_DIR:
    report.write_section(section(results), start=START, end=END, heading="Keep or recompute")
  return results


if __name__ == "__main__":
  main()
