"""fused_moe across processes: `python -m bench.distributed`.

Starts two processes with four simulated CPU devices each (`jax.distributed` on 127.0.0.1, gloo
collectives) and one expert-parallel axis of 8 over both, then times forward+backward side by
side, round-robin, in the same rounds:
  - `fused_shared_memory`: the two processes as one host (shared-memory workspaces);
  - `fused_collectives`: each process a host of its own (all_gather / all_to_all between them,
    direct reads within each);
  - `all_to_all` and `all_to_all_cf1.25`: the baseline (gloo all_to_all), dropless and capped;
  - `roof`: a dense matmul of the layer's useful FLOPs per device;
and, on routing skewed onto host 0's experts (`SKEW` of the tokens pick expert 0 first), with each
process a host: `fused_moe` without a plan, with `reassign` (balancing within each host only) and
with `reassign(..., replicas=REPLICAS)` (hot experts replicated onto the other host), beside the
capped `all_to_all`; each with the bytes its compiled program's collectives return per device
and the busiest host's rows over the mean.
Writes `bench/results/distributed-cpu.json` and `distributed-cpu.png` and rewrites README.md
between `<!-- distributed:start -->` and `<!-- distributed:end -->`.
"""

import dataclasses
import functools
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np

PROCESSES, DEVICES_PER_PROCESS = 2, 4
SKEW, REPLICAS = 0.8, 1
# A collective's result types in XLA's compiled program text: `= f32[8,256]{1,0} all-gather(`,
# or a tuple of them (with `/*index=5*/` comments past the fifth) before an all-to-all.
_COLLECTIVE = re.compile(r"^\s*%\S+ = (.*?) (all-gather|all-to-all|reduce-scatter|all-reduce)"
                         r"(?:-start)?\(", re.M)
_ARRAY = re.compile(r"(pred|[subf]\d+)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> int:
  """Bytes the collectives of one device's compiled program return (what it receives, its own
  share included): an upper bound of what crosses hosts."""
  total = 0
  for types, _ in _COLLECTIVE.findall(hlo):
    for kind, dims in _ARRAY.findall(types):
      bits = 8 if kind == "pred" else int(kind[1:])
      total += bits // 8 * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total
START, END = "<!-- distributed:start -->", "<!-- distributed:end -->"


def _worker(process: int, port: int, config_json: str, samples: int) -> None:
  import jax
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=process)
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import jax_ccfuser as ccf
  from bench import records
  from bench.problem import ACTIVATION, Config, make_inputs
  from bench.programs import CAPACITY_FACTOR, half_square_grad, perturbed, roof_operands
  from bench.timing import interleaved_medians

  config = Config(**json.loads(config_json))
  hosts = lambda loads: np.asarray(loads).reshape(PROCESSES, -1).sum(1)
  mesh = jax.make_mesh((config.devices,), ("ep",), axis_types=(AxisType.Auto,))
  shard = NamedSharding(mesh, P("ep"))
  put = lambda arrays: tuple(jax.make_array_from_callback(a.shape, shard, lambda i, a=a: a[i])
                             for a in map(np.asarray, arrays))
  layer = lambda moe: jax.shard_map(functools.partial(moe, axis_name="ep", activation=ACTIVATION),
                                    mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
  inputs = perturbed(put(make_inputs(config)), (0, 2))
  skewed = perturbed(put(make_inputs(dataclasses.replace(config, skew=SKEW))), (0, 2))

  def planned(replicas):
    def moe(x, ids, *rest, axis_name, **kw):
      plan = ccf.reassign(ids, config.experts, axis_name=axis_name, replicas=replicas)
      return ccf.fused_moe(x, ids, *rest, axis_name=axis_name, plan=plan, **kw)
    return moe

  def host_rows(replicas):
    """The busiest host's rows over the mean, without and with the plan, on skewed routing."""
    loads = jax.jit(jax.shard_map(
        lambda ids: jnp.stack(ccf.plan_loads(ccf.reassign(ids, config.experts, axis_name="ep",
                                                          replicas=replicas))),
        mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(skewed(0)[1])
    loads = multihost_utils.process_allgather(loads, tiled=True)
    return [float(hosts(v).max() / hosts(v).mean()) for v in loads[:2]]

  runs, collectives, busiest = {}, {}, {}
  with jax.set_mesh(mesh):
    for name, kind in (("fused_shared_memory", "shared_memory"),
                       ("fused_collectives", "collectives")):
      with ccf.transport(kind):
        step = jax.jit(half_square_grad(layer(ccf.fused_moe), (0, 2, 3, 4)))
        runs[name] = (step.lower(*inputs(0)).compile(), inputs)
    for name, cf in (("all_to_all", None), (f"all_to_all_cf{CAPACITY_FACTOR}", CAPACITY_FACTOR)):
      step = jax.jit(half_square_grad(layer(functools.partial(ccf.all_to_all_moe,
                                                               capacity_factor=cf)),
                                       (0, 2, 3, 4)))
      runs[name] = (step.lower(*inputs(0)).compile(), inputs)
    dense = jax.shard_map(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
                          mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
    roof_inputs = perturbed(put(roof_operands(config, groups=config.devices)), (0,))
    runs["roof"] = (jax.jit(half_square_grad(dense, (0, 1))).lower(*roof_inputs(0)).compile(),
                    roof_inputs)
    with ccf.transport("collectives"):
      for name, moe in (("skewed_fused", ccf.fused_moe), ("skewed_fused_plan", planned(0)),
                        ("skewed_fused_replicas", planned(REPLICAS)),
                        (f"skewed_all_to_all_cf{CAPACITY_FACTOR}",
                         functools.partial(ccf.all_to_all_moe, capacity_factor=CAPACITY_FACTOR))):
        step = jax.jit(half_square_grad(layer(moe), (0, 2, 3, 4)))
        runs[name] = (step.lower(*skewed(0)).compile(), skewed)
      busiest = {"skewed_fused": host_rows(0)[0], "skewed_fused_plan": host_rows(0)[1],
                 "skewed_fused_replicas": host_rows(REPLICAS)[1]}
    collectives = {name: collective_bytes(program.as_text()) for name, (program, _) in runs.items()
                   if name != "roof"}
    # A fixed number of rounds: every process must run the same programs in the same order.
    timings = interleaved_medians(runs, min_samples=samples, max_samples=samples, budget_s=0)
  if process == 0:
    print(json.dumps({
        "platform": records.platform(), "device": records.device_description(),
        "commit": records.commit(), "date": records.now(), "config": config_json,
        "processes": PROCESSES, "devices_per_process": DEVICES_PER_PROCESS,
        "fwd_bwd_ms": {k: t.ms for k, t in timings.items()},
        "collective_bytes": collectives, "busiest_host": busiest, "skew": SKEW,
        "replicas": REPLICAS,
        "samples": min(t.samples for t in timings.values())}), flush=True)


def measure(config, samples: int, timeout_s: float = 1200) -> dict:
  """Runs the two worker processes and returns process 0's record."""
  import dataclasses
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_CCFUSER_HOST="bench-host")
  env.pop("XLA_FLAGS", None)
  config_json = json.dumps(dataclasses.asdict(config))
  procs = [subprocess.Popen([sys.executable, "-m", "bench.distributed", "--worker", str(p),
                             str(port), config_json, str(samples)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for p in range(PROCESSES)]
  try:
    outs = [p.communicate(timeout=timeout_s) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"bench worker failed ({p.returncode}):\n{err[-4000:]}")
  record = json.loads([line for line in outs[0][0].splitlines() if line.startswith("{")][-1])
  record["config"] = json.loads(record["config"])
  return record


def plot(rec: dict, path) -> None:
  """A bar per implementation (forward+backward ms), the roof as a line."""
  from bench.report import plt
  t = rec["fwd_bwd_ms"]
  names = [n for n in t if n != "roof"]
  fig, ax = plt.subplots(figsize=(6.4, 3.4))
  ax.barh(names, [t[n] for n in names], color=["C0" if "fused" in n else "C7"
                                              for n in names])
  ax.axvline(t["roof"], color="k", ls="--", lw=1, label=f"roof {t['roof']:.0f} ms")
  for y, name in enumerate(names):
    ax.text(t[name], y, f" {t[name]:.0f} ms", va="center", fontsize=8)
  ax.set_xscale("log")
  ax.set_xlim(0.5 * t["roof"], 3 * max(t.values()))
  ax.xaxis.set_minor_formatter(plt.NullFormatter())
  ax.set_xlabel("forward+backward ms (median)")
  ax.invert_yaxis()
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="x")
  fig.suptitle(f"{rec['processes']} processes x {rec['devices_per_process']} CPU devices, "
               f"commit {rec['commit']}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def section(rec: dict) -> str:
  c, t = rec["config"], rec["fwd_bwd_ms"]
  baseline = t["all_to_all_cf1.25"]
  lines = [
      "_Generated by `python -m bench.distributed` (medians of rounds run side by side)._",
      "",
      f"Commit `{rec['commit']}`, {rec['date']}; {rec['device']}; {rec['processes']} processes x "
      f"{rec['devices_per_process']} simulated CPU devices, one expert-parallel axis of "
      f"{c['devices']}; float32, T={c['tokens']} per device, H={c['hidden']}, F={c['ffn']}, "
      f"E={c['experts']}, K={c['k']}; forward+backward, {rec['samples']} samples each.",
      "",
      "![forward+backward time per implementation](bench/results/distributed-cpu.png)",
      "",
      "| implementation | ms | vs all_to_all cf 1.25 | roof / time | collective MiB per device |",
      "|---|---|---|---|---|",
  ]
  mib = lambda name: (f"{rec['collective_bytes'][name] / 2**20:.1f}"
                      if name in rec["collective_bytes"] else "-")
  for name in (n for n in t if not n.startswith("skewed")):
    lines.append(f"| {name} | {t[name]:.1f} | {baseline / t[name]:.2f}x | "
                 f"{t['roof'] / t[name]:.0%} | {mib(name)} |")
  skewed = [n for n in t if n.startswith("skewed")]
  lines += [
      "",
      f"Routing skewed onto host 0's experts ({rec['skew']:.0%} of the tokens pick expert 0 "
      f"first), each process a host of its own: `fused_moe` without a plan, with `reassign` "
      f"(helpers on the expert's host only), with `reassign(..., replicas={rec['replicas']})` "
      f"(hot experts replicated onto the other host), and the capped `all_to_all`. Collective "
      f"MiB: what the compiled forward+backward's collectives return per device (its own share "
      f"included).",
      "",
      "| implementation | ms | vs no plan | collective MiB per device | busiest host / mean rows |",
      "|---|---|---|---|---|",
  ]
  for name in skewed:
    busiest = rec["busiest_host"].get(name)
    lines.append(f"| {name} | {t[name]:.1f} | {t['skewed_fused'] / t[name]:.2f}x | {mib(name)} | "
                 f"{'-' if busiest is None else f'{busiest:.2f}'} |")
  lines += ["", "Both processes share one machine's cores, so these are ratios of one "
            "machine's work, not of hosts with cores of their own."]
  return "\n".join(lines)


def main(argv=None) -> dict:
  from bench import records
  parser = records.parser(__doc__)
  parser.add_argument("--worker", nargs=4, metavar=("PROCESS", "PORT", "CONFIG", "SAMPLES"))
  parser.add_argument("--samples", type=records.positive_int, default=7)
  parser.add_argument("--tokens", type=records.positive_int, default=256)
  args = parser.parse_args(argv)
  if args.worker:
    process, port, config_json, samples = args.worker
    _worker(int(process), int(port), config_json, int(samples))
    return {}
  from bench import report
  from bench.problem import Config
  config = Config(devices=PROCESSES * DEVICES_PER_PROCESS, tokens=args.tokens, hidden=256,
                  ffn=512, experts=16, k=2)
  rec = measure(config, args.samples)
  print(json.dumps(rec))
  out = args.out or records.RESULTS_DIR
  (out / "distributed-cpu.json").write_text(json.dumps(rec, indent=1))
  plot(rec, out / "distributed-cpu.png")
  if args.out is None:
    report.write_section(section(rec), start=START, end=END,
                         heading="Across processes: measured")
  return rec


if __name__ == "__main__":
  main()
