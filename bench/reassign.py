"""What expert reassignment costs and buys on skewed routing: `python -m bench.reassign`.

On 8 simulated CPU devices, side by side in the same rounds: the plan alone (`ccf.reassign`
under `shard_map`: one `[E]` all-reduce and the water-filling pass), and one fused layer's
forward+backward without and with the plan (the plan computed inside, as a training step
would). Routings: `make_inputs`' skew toward expert 0, two hot experts on two owners or on one,
every row on one expert, and a Zipf popularity over 256 experts with K=8. Writes
`bench/results/reassign-cpu.json` and rewrites README.md between `<!-- reassign:start -->` and
`<!-- reassign:end -->` (with `--out DIR`: the JSON there, the README untouched).
"""

import dataclasses
import functools
import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ccfuser as ccf  # noqa: E402
from bench import records, report  # noqa: E402
from bench.problem import ACTIVATION, Config, make_inputs  # noqa: E402
from bench.programs import _half_square_grad, _perturbed  # noqa: E402
from bench.timing import interleaved_medians  # noqa: E402

BASE = Config(devices=8, tokens=256, hidden=256, ffn=512, experts=16, k=2)
# Same routed rows as BASE: 64 tokens x K=8.
MANY = dataclasses.replace(BASE, tokens=64, experts=256, k=8)


def _first_choices(shares):
  """Routing where a `shares[e]` share of the tokens picks expert e first, the rest at random."""
  def ids(config, rng):
    n = config.devices * config.tokens
    logits = rng.standard_normal((n, config.experts), dtype=np.float32)
    hot = rng.choice(len(shares) + 1, n, p=[*shares.values(), 1.0 - sum(shares.values())])
    for j, e in enumerate(shares):
      logits[hot == j, e] += 30.0
    return ccf.route(jnp.asarray(logits), config.k)[0]
  return ids


def _zipf(config, rng):
  """Each token samples its K experts without replacement, expert e with weight 1 / (e + 1):
  the low experts, all on device 0, are the hottest."""
  n = config.devices * config.tokens
  popularity = -np.log(np.arange(1, config.experts + 1))
  return ccf.route(jnp.asarray(popularity + rng.gumbel(size=(n, config.experts))), config.k)[0]


def _one_expert(config, rng):
  """Every (token, k) row on expert 0: K copies of it per token."""
  return jnp.zeros((config.devices * config.tokens, config.k), jnp.int32)


# Routings that replace `make_inputs`' expert_ids: (config, expert_ids(config, rng)).
ROUTINGS = {
    "two hot, two owners": (BASE, _first_choices({0: 2 / 3, 2: 1 / 4})),
    "two hot, one owner": (BASE, _first_choices({0: 1 / 2, 1: 1 / 2})),
    "every row on expert 0": (BASE, _one_expert),
    "Zipf over 256 experts": (MANY, _zipf),
}
CONFIGS = [dataclasses.replace(BASE, skew=skew) for skew in (0.0, 0.5, 0.9)]
START, END = "<!-- reassign:start -->", "<!-- reassign:end -->"


def _layer(config, planned):
  def body(x, ids, weights, w_in, w_out):
    plan = ccf.reassign(ids, config.experts, axis_name="ep") if planned else None
    return ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name="ep", activation=ACTIVATION,
                         plan=plan)
  return body


def measure(config: Config, routing: str | None = None) -> dict:
  """One record: `make_inputs(config)`, its expert_ids replaced by `ROUTINGS[routing]`'s."""
  mesh = jax.make_mesh((config.devices,), ("ep",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:config.devices])
  arrays = make_inputs(config)
  if routing is not None:
    arrays = (arrays[0], ROUTINGS[routing][1](config, np.random.default_rng(1)), *arrays[2:])
  arrays = jax.device_put(arrays, NamedSharding(mesh, P("ep")))
  shard = functools.partial(jax.shard_map, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
  inputs = _perturbed(arrays, (0, 2))
  plan_only = jax.jit(shard(lambda ids: jax.tree.map(
      lambda a: a[None], ccf.reassign(ids, config.experts, axis_name="ep"))))
  runs = {
      "plan": (plan_only, lambda i: (inputs(i)[1],)),
      "layer": (jax.jit(_half_square_grad(shard(_layer(config, False)), (0, 2, 3, 4))), inputs),
      "layer_with_plan": (jax.jit(_half_square_grad(shard(_layer(config, True)), (0, 2, 3, 4))),
                          inputs),
  }
  timings = interleaved_medians(runs, min_samples=5, max_samples=9, budget_s=30)
  plan = jax.tree.map(lambda a: a[0], plan_only(arrays[1]))
  before, after = (int(v.max()) / float(v.mean()) for v in ccf.plan_loads(plan))
  return {"platform": records.platform(), "device": records.device_description(),
          "commit": records.commit(), "date": records.now(), "config": vars(config).copy(),
          "routing": routing or str(config.skew),
          "plan_ms": timings["plan"].ms, "layer_fwd_bwd_ms": timings["layer"].ms,
          "layer_with_plan_fwd_bwd_ms": timings["layer_with_plan"].ms,
          "imbalance_before": before, "imbalance_after": after}


def section(recs: list[dict]) -> str:
  c0 = recs[0]["config"]
  lines = [
      "_Generated by `python -m bench.reassign` (medians, measured side by side; the machine's "
      "other load makes absolute times noisy)._",
      "",
      f"{records.provenance(recs)}; {recs[0]['device']}; float32, "
      f"H={c0['hidden']}, F={c0['ffn']}, D={c0['devices']}, T tokens per device; fused "
      "forward+backward. A number as routing is the share of tokens that pick expert 0 first.",
      "",
      "| routing | T | E | K | max/mean rows per device: before / after | plan ms | "
      "plan / layer | layer ms | layer with plan ms | speed-up |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in recs:
    c = r["config"]
    lines.append(
        f"| {r['routing']} | {c['tokens']} | {c['experts']} | {c['k']} "
        f"| {r['imbalance_before']:.2f} / {r['imbalance_after']:.2f} | {r['plan_ms']:.2f} "
        f"| {r['plan_ms'] / r['layer_fwd_bwd_ms']:.1%} | {r['layer_fwd_bwd_ms']:.1f} | "
        f"{r['layer_with_plan_fwd_bwd_ms']:.1f} | "
        f"{r['layer_fwd_bwd_ms'] / r['layer_with_plan_fwd_bwd_ms']:.2f}x |")
  lines += ["", "The plan is recomputed every step here (`plan ms`, its own program: the `[E]` "
            "all-reduce and the planning; `plan / layer` against the layer without a plan). "
            "With the default options a plan leaves the busiest device within "
            "max(1.1 x mean, mean + 32) rows, 32 being the tile. The 8 simulated devices share "
            "one machine's cores, so an idle "
            "device's time partly goes to the others: these speed-ups are not those of devices "
            "with cores or GPUs of their own."]
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  out = records.parser(__doc__).parse_args(argv).out
  recs = [measure(c) for c in CONFIGS]
  recs += [measure(config, name) for name, (config, _) in ROUTINGS.items()]
  for r in recs:
    print(json.dumps(r))
  (out or records.RESULTS_DIR).joinpath("reassign-cpu.json").write_text(json.dumps(recs, indent=1))
  if out is None:
    report.write_section(section(recs), start=START, end=END, heading="Expert reassignment")
  return recs


if __name__ == "__main__":
  main()
