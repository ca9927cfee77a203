"""`python -m models.placement_report`: expert placement on routing recorded from the demo LM.

Trains `MoeLM` (fused path, simulated CPU devices) with the loop of `models.train`, and at each
of `--steps` records its routing (`jax_ccfuser.placement.capture_expert_ids`) on the next
`--record-batches` training batches (the statistics placement is solved from) and on the
`--record-batches` after those (held out: whether a placement carries over to the batches that
come next). Prints, for the identity placement, greedy (CCFuser) and the ILP (MoETuner, with and
without its cross-layer term), the remote-row fraction, the busiest device's load and the share
of cross-layer transitions that change device, and each solve's time; `--readme` writes the table
into README.md.
"""

import argparse
import pathlib
import textwrap
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType

from jax_ccfuser import placement
from models.moe_lm import LMConfig, MoeLM
from models.train import (TrainConfig, batch_at, batch_placer, load_corpus, make_optimizer,
                          train)

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_MARKERS = ("<!-- placement:table:start -->\n", "<!-- placement:table:end -->")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m models.placement_report", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--steps", type=int, nargs="+", default=[20, 200],
                 help="training steps after which to record (increasing)")
  p.add_argument("--devices", type=int, default=4, help="simulated CPU devices (the EP group)")
  p.add_argument("--experts", type=int, default=16, help="experts per MoE block")
  p.add_argument("--k", type=int, default=2, help="experts per token")
  p.add_argument("--layers", type=int, default=4, help="transformer blocks")
  p.add_argument("--batch", type=int, default=16, help="sequences per step")
  p.add_argument("--seq-len", type=int, default=128, help="context length in bytes")
  p.add_argument("--record-batches", type=int, default=32,
                 help="batches recorded for solving, and as many held out")
  p.add_argument("--time-limit", type=float, default=10.0, help="ILP seconds per layer")
  p.add_argument("--seed", type=int, default=0, help="initialization and data order")
  p.add_argument("--max-corpus-bytes", type=int, default=4_000_000,
                 help="read at most this much of the standard library")
  p.add_argument("--readme", action="store_true", help="write the table into README.md")
  args = p.parse_args(argv)
  for name in ("devices", "experts", "k", "layers", "batch", "seq_len", "record_batches"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be at least 1")
  if not args.time_limit > 0:
    p.error("--time-limit must be positive")
  if args.k > args.experts:
    p.error(f"--k {args.k} must be at most --experts {args.experts}")
  if args.experts % args.devices or args.batch % args.devices:
    p.error(f"--experts and --batch must be divisible by --devices {args.devices}")
  if args.steps != sorted(set(args.steps)) or args.steps[0] < 1:
    p.error("--steps must be positive and increasing")
  return args


# A forward pass that also returns every MoE layer's expert ids, and the counting of them.
_routed_forward = nnx.jit(placement.capture_expert_ids(lambda model, tokens: model(tokens)))
_update = jax.jit(placement.RoutingStats.update)


def record(model: nnx.Module, data: np.ndarray, steps: range, *, batch: int, seed: int,
           num_devices: int, place) -> placement.RoutingStats:
  """The routing of `model` summed over the batches `batch_at(data, step)` of `steps`."""
  layers = len(placement.moe_layers(model))
  stats = placement.RoutingStats.zeros(layers, num_devices, model.config.num_experts)
  for step in steps:
    tokens = batch_at(data, step, batch=batch, seq_len=model.config.seq_len, seed=seed)
    _, ids = _routed_forward(model, place(tokens[:, :-1]))
    stats = _update(stats, ids)
  return stats


def table_rows(args, step: int, fitted: placement.RoutingStats,
         held_out: placement.RoutingStats) -> list[str]:
  """Table rows after `step` training steps: each placement scored on both sets of statistics."""
  solve = lambda **options: placement.solve(fitted, args.devices, time_limit=args.time_limit,
                                            **options)
  solutions = {"identity": None,
               "greedy (CCFuser)": solve(method="greedy"),
               "ILP (MoETuner)": solve(method="ilp"),
               "ILP, no cross-layer term": solve(method="ilp", transition_weight=0.0)}
  lines = []
  for name, solution in solutions.items():
    perms = None if solution is None else solution.perms
    fit, out = placement.score(fitted, perms), placement.score(held_out, perms)
    timing = ("-" if solution is None else
              f"{sum(solution.seconds):.2f} s ({', '.join(sorted(set(solution.methods)))})")
    # One layer has no transitions between layers.
    crossing = lambda s: f"{s.cross_fraction.mean():.3f}" if s.cross_fraction.size else "-"
    lines.append(
        f"| {step} | {name} | {fit.remote_fraction.mean():.3f} | {fit.max_load.mean():.2f} | "
        f"{crossing(fit)} | {out.remote_fraction.mean():.3f} | "
        f"{out.max_load.mean():.2f} | {crossing(out)} | {timing} |")
  return lines


def main(argv=None) -> str:
  args = parse_args(argv)
  # Before the first use of a backend, which creates the devices.
  jax.config.update("jax_num_cpu_devices", args.devices)
  mesh = jax.make_mesh((args.devices,), ("expert",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:args.devices])
  corpus = load_corpus(max_bytes=args.max_corpus_bytes)
  config = LMConfig(seq_len=args.seq_len, layers=args.layers, num_experts=args.experts, k=args.k)
  last = args.steps[-1]
  train_config = TrainConfig(batch=args.batch, total_steps=last,
                             warmup_steps=min(20, last // 5), seed=args.seed)
  place = batch_placer(mesh, config.axis_name)
  record_options = dict(batch=args.batch, seed=args.seed, num_devices=args.devices, place=place)
  n = args.record_batches
  e_local = args.experts // args.devices
  intro = (
      f"`python -m models.placement_report --readme`: the demo LM with {args.layers} MoE "
      f"blocks of {args.experts} experts (top-{args.k}) on {args.devices} simulated CPU devices "
      f"({e_local} experts each), {args.batch} x {args.seq_len} tokens a step. After each "
      f"number of training steps, routing is recorded on the next {n} training batches "
      f"(solved on) and on the {n} after those (held out). Fractions and loads are means over "
      "the layers; the load is the busiest device's rows over the mean (1.00: even).")
  lines = [
      textwrap.fill(intro, width=99, break_on_hyphens=False),
      "",
      "| Steps | Placement | Remote rows | Max device load | Transitions changing device | "
      "Remote rows, held out | Max load, held out | Transitions, held out | Solve time |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  with jax.set_mesh(mesh):
    model = MoeLM(config, rngs=nnx.Rngs(args.seed))
    optimizer = make_optimizer(model, train_config)
    history = []
    for step in args.steps:
      began = time.perf_counter()
      train(model, optimizer, corpus.train, train_config, steps=step, place=place,
            history=history)
      print(f"trained to step {step} in {time.perf_counter() - began:.0f} s: loss "
            f"{history[-1]['loss']:.3f}")
      fitted = record(model, corpus.train, range(step, step + n), **record_options)
      held_out = record(model, corpus.train, range(step + n, step + 2 * n), **record_options)
      lines += table_rows(args, step, fitted, held_out)
  text = "\n".join(lines) + "\n"
  print(text)
  if args.readme:
    readme = _README.read_text()
    start = readme.index(_MARKERS[0]) + len(_MARKERS[0])
    end = readme.index(_MARKERS[1])
    _README.write_text(readme[:start] + text + readme[end:])
    print(f"wrote the table into {_README}")
  return text


if __name__ == "__main__":
  main()
