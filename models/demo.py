"""`python -m models.demo`: train the MoE LM with expert parallelism, fused path vs all-to-all.

On `--devices` simulated CPU devices (one mesh axis, "expert": each device holds E / D experts and
B / D sequences), trains `MoeLM` on the standard library's `.py` sources with
`dispatch="fused"`, then the same steps from the same initialization with
`dispatch="all_to_all"`, prints how closely the two loss curves agree and a generated sample,
and writes `<out>/metrics.json` and `<out>/report.png`. Checkpoints go to
`<out>/checkpoints/<dispatch>`; `--resume` continues from them (without it a run starts afresh).
With `--replace-every N`, both paths move their experts between devices every N steps
(`jax_ccfuser.placement`: an ILP on the routing of the latest batches) without changing what the
model computes, and report remote rows and device load before and after each move. With
`--balance bias` the routers balance their experts without the auxiliary loss (DeepSeek-V3): each
carries a per-expert bias, stepped after every training step from the step's expert loads; the
run prints how far the busiest expert is above the mean load early and late in training
(`--balance none` shows the imbalance with neither).
"""

import argparse
import dataclasses
import json
import pathlib
import shutil
import time

import jax
import matplotlib
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from tqdm import tqdm

matplotlib.use("Agg")  # the report is a file; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from jax_ccfuser import experimental, placement
from models.moe_lm import LMConfig, MoeLM
from models.placement_report import record
from models.train import (TrainConfig, batch_placer, checkpoint_manager, evaluate, generate,
                          load_corpus, make_optimizer, restore, train)

DISPATCHES = ("fused", "all_to_all")
# Batches whose routing a re-placement is solved from (the latest of the window): enough for
# stable counts, few enough that the extra forward passes stay a small part of a window.
PLACEMENT_BATCHES = 8


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m models.demo", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--steps", type=int, default=100, help="training steps per path")
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (the EP group)")
  p.add_argument("--experts", type=int, default=8, help="experts per MoE block")
  p.add_argument("--k", type=int, default=2, help="experts per token")
  p.add_argument("--layers", type=int, default=2, help="transformer blocks")
  p.add_argument("--hidden", type=int, default=64, help="model width")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument("--ffn", type=int, default=128, help="hidden width of each expert")
  p.add_argument("--seq-len", type=int, default=128, help="context length in bytes")
  p.add_argument("--batch", type=int, default=16, help="sequences per step")
  p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
  p.add_argument("--seed", type=int, default=0, help="initialization and data order")
  p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
  p.add_argument("--eval-batches", type=int, default=8, help="validation batches")
  p.add_argument("--max-corpus-bytes", type=int, default=None,
                 help="read at most this much of the standard library (default: all of it)")
  p.add_argument("--prompt", default="def ", help="start of the generated sample")
  p.add_argument("--sample-bytes", type=int, default=200, help="length of the generated sample")
  p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0: greedy")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_out"),
                 help="where metrics.json, report.png and checkpoints go")
  p.add_argument("--reassign", action="store_true",
                 help="fused path: idle devices take over slices of hot experts (reports rows "
                      "per device before and after)")
  p.add_argument("--replace-every", type=int, default=0, metavar="N",
                 help="every N steps, re-place experts on devices from the latest routing and "
                      "report remote rows and device load before and after (the load can only "
                      "change with several experts per device); 0: never")
  p.add_argument("--balance", choices=("loss", "bias", "none"), default="loss",
                 help="expert load balancing: the Switch load-balancing loss, an expert bias "
                      "updated from the loads with no auxiliary loss (DeepSeek-V3), or neither")
  p.add_argument("--bias-rate", type=float, default=1e-2,
                 help="with --balance bias: the bias update speed (DeepSeek-V3 used 1e-3 over "
                      "far longer runs than a demo's)")
  p.add_argument("--score", choices=("softmax", "sigmoid"), default="softmax",
                 help="the routers' scores")
  p.add_argument("--resume", action="store_true",
                 help="continue from the checkpoints in --out instead of starting afresh (with "
                 "the same training settings, which is checked: the learning-rate schedule "
                 "spans --steps)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  for name, least in (("devices", 1), ("experts", 1), ("steps", 1), ("layers", 1),
                      ("hidden", 1), ("heads", 1), ("ffn", 1), ("seq_len", 1), ("batch", 1),
                      ("checkpoint_every", 1), ("eval_batches", 1), ("sample_bytes", 0),
                      ("replace_every", 0), ("temperature", 0)):
    if not getattr(args, name) >= least:  # NaN too
      p.error(f"--{name.replace('_', '-')} must be at least {least}")
  if args.max_corpus_bytes is not None and args.max_corpus_bytes < 1:
    p.error("--max-corpus-bytes must be at least 1")
  if not args.lr > 0 or not args.bias_rate > 0:
    p.error("--lr and --bias-rate must be positive")
  if not args.prompt:
    p.error("--prompt must hold at least one character (the sample starts from it)")
  if args.out.exists() and not args.out.is_dir():
    p.error(f"--out {args.out} is a file, not a folder")
  try:
    model_config(args, DISPATCHES[0])
  except ValueError as error:
    p.error(f"--hidden, --heads, --experts or --k: {error}")
  if args.experts % args.devices:
    p.error(f"--experts {args.experts} must be divisible by --devices {args.devices}")
  if args.batch % args.devices:
    p.error(f"--batch {args.batch} must be divisible by --devices {args.devices}")
  if args.seq_len % args.devices:  # the sample's [1, seq_len] window splits over the devices
    p.error(f"--seq-len {args.seq_len} must be divisible by --devices {args.devices}")
  return args


def model_config(args, dispatch: str) -> LMConfig:
  return LMConfig(seq_len=args.seq_len, hidden=args.hidden, heads=args.heads,
                  layers=args.layers, ffn=args.ffn, num_experts=args.experts, k=args.k,
                  dispatch=dispatch, reassign=args.reassign and dispatch == "fused",
                  score=args.score, expert_bias=args.balance == "bias")


# Settings that change neither the model nor its training: a resumed run may change them.
_NOT_TRAINING = ("out", "resume", "no_progress", "checkpoint_every", "eval_batches", "prompt",
                 "sample_bytes", "temperature")


def claim_checkpoints(args) -> None:
  """Readies `<out>/checkpoints` for this run: without `--resume` both paths' checkpoints are
  deleted (a path's left from an earlier run would otherwise be resumed as this run's) and the
  training settings recorded; with it, checkpoints of other training settings are refused
  (another learning rate or step count restores as well, and trains on wrongly).

  Raises:
    ValueError: `--resume` over checkpoints of other settings, or of unknown ones.
  """
  directory = args.out / "checkpoints"
  record = directory / "settings.json"
  settings = {name: value for name, value in vars(args).items() if name not in _NOT_TRAINING}
  if args.resume and directory.exists():
    saved = json.loads(record.read_text()) if record.exists() else None
    if saved is None:
      raise ValueError(f"{directory} holds no record of the settings its checkpoints were "
                       f"trained with ({record.name}): start afresh (without --resume)")
    differ = [f"--{name.replace('_', '-')} {saved.get(name)!r} there, {value!r} here"
              for name, value in settings.items() if saved.get(name) != value]
    if differ:
      raise ValueError(f"the checkpoints in {directory} were trained with other settings "
                       f"({'; '.join(differ)}): resume with theirs, or start afresh (without "
                       f"--resume)")
    return
  shutil.rmtree(directory, ignore_errors=True)
  directory.mkdir(parents=True)
  record.write_text(json.dumps(settings, indent=1))


def run_path(dispatch: str, args, corpus, mesh) -> dict:
  """Trains one path from the seed's initialization (or its checkpoint) and evaluates it.

  Returns:
    `{"history", "val_loss", "train_s", "model"}`: the per-step records of `train`, the
    validation cross-entropy, this session's training wall time (compilation included) and the
    trained model.
  """
  config = model_config(args, dispatch)
  train_config = TrainConfig(batch=args.batch, learning_rate=args.lr, total_steps=args.steps,
                             warmup_steps=min(20, args.steps // 5), seed=args.seed,
                             expert_bias_rate=args.bias_rate)
  if args.balance != "loss":
    train_config = dataclasses.replace(train_config, load_balancing_coef=0.0)
  directory = args.out / "checkpoints" / dispatch
  place = batch_placer(mesh, config.axis_name)
  with jax.set_mesh(mesh):
    model = MoeLM(config, rngs=nnx.Rngs(args.seed))
    optimizer = make_optimizer(model, train_config)
    checkpoints = checkpoint_manager(directory, every=args.checkpoint_every)
    history = restore(checkpoints, model, optimizer)
    tokens_per_step = args.batch * args.seq_len
    bar = tqdm(total=args.steps, initial=len(history), desc=f"{dispatch:>10}", unit="step",
               disable=args.no_progress, dynamic_ncols=True)

    def on_step(record):
      seconds = record["seconds"]
      rate = "compiling" if seconds is None else f"{tokens_per_step / seconds:,.0f}"
      bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=rate, refresh=False)
      bar.update(1)

    began = time.perf_counter()
    # Train up to each re-placement in turn (a resumed run starts at its checkpoint's step).
    moves = (range(args.replace_every, args.steps, args.replace_every) if args.replace_every
             else range(0))
    placements = []
    for stop in [s for s in moves if s >= len(history)] + [args.steps]:
      history = train(model, optimizer, corpus.train, train_config, steps=stop, place=place,
                      history=history, checkpoints=checkpoints, on_step=on_step)
      if stop < args.steps:
        placements.append(replace_experts(model, optimizer, corpus.train, stop, args, place))
        bar.write(f"{dispatch:>10}: step {stop}: {_describe(placements[-1])}")
    train_s = time.perf_counter() - began
    bar.close()
    checkpoints.close()
    val_loss = evaluate(model, corpus.validation, batches=args.eval_batches, batch=args.batch,
                        place=place)
  return {"history": history, "val_loss": val_loss, "train_s": train_s, "model": model,
          "placements": placements}


def replace_experts(model, optimizer, data, step: int, args, place) -> dict:
  """Moves every MoE layer's experts to the ILP placement for the latest batches' routing.

  The routing is recorded with the model as it is now, on the training batches of the
  `PLACEMENT_BATCHES` steps before `step`; the same counts score the old and the new placement.

  Returns:
    `{"step", "methods", "solve_s", "remote_before", "remote_after", "load_before",
    "load_after"}`: remote-row fraction and busiest device's rows over the mean, averaged over
    the layers, under the old and the new placement.
  """
  stats = record(model, data, range(max(0, step - PLACEMENT_BATCHES), step), batch=args.batch,
                 seed=args.seed, num_devices=args.devices, place=place)
  solution = placement.solve(stats, args.devices)
  before, after = placement.score(stats), placement.score(stats, solution.perms)
  placement.apply(model, optimizer, solution.perms)
  return {"step": step, "methods": list(solution.methods), "solve_s": sum(solution.seconds),
          "remote_before": float(before.remote_fraction.mean()),
          "remote_after": float(after.remote_fraction.mean()),
          "load_before": float(before.max_load.mean()),
          "load_after": float(after.max_load.mean())}


def _describe(move: dict) -> str:
  return (f"experts re-placed ({', '.join(sorted(set(move['methods'])))}, "
          f"{move['solve_s']:.1f} s): remote rows {move['remote_before']:.3f} -> "
          f"{move['remote_after']:.3f}, max device load {move['load_before']:.2f} -> "
          f"{move['load_after']:.2f}")


def summarize(run: dict, args) -> dict:
  """The metrics of one path: first/last/validation loss, throughput and expert load."""
  history = run["history"]
  timed = [r["seconds"] for r in history if r["seconds"] is not None]
  counts = np.asarray([r["expert_counts"] for r in history], np.float64)  # [steps, L, E]
  assignments = args.batch * args.seq_len * args.k
  return {
      "loss_first": history[0]["loss"],
      "loss_last": history[-1]["loss"],
      "val_loss": run["val_loss"],
      # Steady state: the first step of a session, which compiles, is left out.
      "tokens_per_s": (len(timed) * args.batch * args.seq_len / sum(timed)) if timed else None,
      "train_s": run["train_s"],
      "losses": [r["loss"] for r in history],
      # [L][E]: the share of (token, k) assignments each expert got, averaged over the run.
      "expert_load": (counts.mean(axis=0) / assignments).round(4).tolist(),
      # [L][2]: the busiest expert's load over the mean, averaged over the first and the last
      # tenth of the steps.
      "expert_imbalance": _expert_imbalance(counts).round(3).tolist(),
      # [L][2]: max / mean rows per device, without and with reassignment, averaged over steps.
      "device_imbalance": _imbalance(history).round(3).tolist(),
      # One record per re-placement (`replace_experts`).
      "placements": run["placements"],
  }


def _expert_imbalance(counts) -> np.ndarray:
  """`counts` `[steps, L, E]` -> `[L, 2]`: max / mean expert load, first and last tenth."""
  ratio = counts.max(-1) / counts.mean(-1)  # [steps, L]
  tenth = max(1, len(ratio) // 10)
  return np.stack([ratio[:tenth].mean(0), ratio[-tenth:].mean(0)], axis=-1)


def _imbalance(history) -> np.ndarray:
  loads = np.asarray([r["device_loads"] for r in history], np.float64)  # [steps, L, 2, D]
  return (loads.max(-1) / np.maximum(loads.mean(-1), 1)).mean(0)


def plot_report(path: pathlib.Path, runs: dict, metrics: dict, args) -> None:
  """Both loss curves, and the fused path's expert load per layer over the steps."""
  layers = args.layers
  fig = plt.figure(figsize=(12, 2.2 * max(2, layers) + 1), constrained_layout=True)
  grid = fig.add_gridspec(layers, 2)
  ax = fig.add_subplot(grid[:, 0])
  for dispatch, style in zip(DISPATCHES, ("-", "--")):
    losses = metrics[dispatch]["losses"]
    ax.plot(np.arange(1, len(losses) + 1), losses, style,
            label=f"{dispatch} (val {metrics[dispatch]['val_loss']:.3f})")
  ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)",
         title=f"training loss; max |fused - all_to_all| = {metrics['max_loss_diff']:.2e}")
  ax.legend()
  ax.grid(alpha=0.3)

  counts = np.asarray([r["expert_counts"] for r in runs["fused"]["history"]], np.float64)
  share = counts / (args.batch * args.seq_len * args.k)  # [steps, L, E]
  for layer in range(layers):
    hax = fig.add_subplot(grid[layer, 1])
    image = hax.imshow(share[:, layer].T, aspect="auto", origin="lower", cmap="viridis",
                       extent=(0.5, len(share) + 0.5, -0.5, args.experts - 0.5))
    hax.set(ylabel="expert", title=f"block {layer}: share of assignments (fused)")
    if layer == layers - 1:
      hax.set_xlabel("step")
    fig.colorbar(image, ax=hax)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  try:
    claim_checkpoints(args)
  except ValueError as error:  # a command-line mistake, said as argparse says one
    raise SystemExit(f"python -m models.demo: error: {error}") from None
  # Before the first use of a backend, which creates the devices and XLA:CPU's thread pool (the
  # pool `import jax_ccfuser` reserved holds 8 devices: --devices 16 warned that a loop could stop).
  experimental.reserve_cpu_threads(args.devices)
  jax.config.update("jax_num_cpu_devices", args.devices)
  mesh = jax.make_mesh((args.devices,), ("expert",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:args.devices])
  corpus = load_corpus(max_bytes=args.max_corpus_bytes)
  print(f"corpus: {len(corpus.train):,} training and {len(corpus.validation):,} validation bytes "
        f"of the standard library; {args.devices} devices, {args.experts} experts per block "
        f"(top-{args.k}), {args.layers} blocks")

  runs = {dispatch: run_path(dispatch, args, corpus, mesh) for dispatch in DISPATCHES}
  metrics = {"settings": {name: str(value) if isinstance(value, pathlib.Path) else value
                          for name, value in vars(args).items()}}
  metrics.update({dispatch: summarize(runs[dispatch], args) for dispatch in DISPATCHES})
  diffs = np.abs(np.subtract(metrics["fused"]["losses"], metrics["all_to_all"]["losses"]))
  metrics["max_loss_diff"] = float(diffs.max())
  for dispatch in DISPATCHES:
    m = metrics[dispatch]
    rate = "n/a" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:,.0f} tokens/s"
    print(f"{dispatch:>10}: loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, "
          f"validation {m['val_loss']:.3f}, {rate}, {m['train_s']:.0f} s training")
  tenth = max(1, args.steps // 10)
  imbalance = ", ".join(f"{first:.2f} -> {last:.2f}"
                        for first, last in metrics["fused"]["expert_imbalance"])
  print(f"busiest expert over the mean load, per layer, first {tenth} -> last {tenth} steps "
        f"(--balance {args.balance}): {imbalance}")
  if args.reassign:
    for layer, (before, after) in enumerate(metrics["fused"]["device_imbalance"]):
      print(f"layer {layer}: max/mean rows per device {before:.2f} without reassignment, "
            f"{after:.2f} with it")
  print(f"largest loss difference between the paths over {len(diffs)} steps: "
        f"{metrics['max_loss_diff']:.2e}")

  with jax.set_mesh(mesh):
    sample = generate(runs["fused"]["model"], args.prompt.encode(), length=args.sample_bytes,
                      temperature=args.temperature, seed=args.seed)
  text = (args.prompt.encode() + sample).decode("utf-8", errors="replace")
  metrics["sample"] = text
  print(f"sample (temperature {args.temperature}):\n{text}\n")

  (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
  plot_report(args.out / "report.png", runs, metrics, args)
  print(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.png'}")
  return metrics


if __name__ == "__main__":
  main()
