"""`python -m bench.gpu`: the one-GPU benchmark of bench/gpu_check.sh, small enough for a lease.

On the first device, for the layer shapes of Mixtral-8x7B, DeepSeek-V3 and Qwen3-30B-A3B
(`bench.model.SHAPES`) in bfloat16 with the tokens per device cut to fit a lease, forward and
forward+backward:

- `fused`: `fused_moe_emulated` over D = 8 emulated peers (the remote-read path on one GPU);
- `fused_hidden`: the same keeping h for the backward (`residuals="hidden"`): what recomputing it
  costs;
- `fused_fetch_sms0`: `fused` with no SMs kept for the fetch (`jax_ccfuser.fetch_sms(0)`), so
  the two show what keeping them costs or gains;
- `ragged_dot`: sort + `jax.lax.ragged_dot` + unsort (`bench.ragged`);
- `tokamax`: the same with tokamax's `ragged_dot` (its default implementation choice), where
  tokamax is importable (bench/gpu_tokamax.sh brings it to a GPU machine);
- `tokamax_triton`: the same with tokamax's Pallas Triton kernels, chosen explicitly;
- `all_to_all`, `all_to_all_cf1.25`: `all_to_all_moe` over the one device. The D-GPU
  `all_to_all` cannot run on one GPU; this is its sort, padded buffers and grouped FFN without
  the exchange (dropless pads every expert to all `D * T * K` rows);
- `roof`: one dense matmul with the layer's useful FLOPs on the same device, the physical limit.

Each program is compiled and run once before timing, so one that fails (out of memory, an op
the backend refuses, tokamax not installed) is recorded with its error and the others are still
timed. Medians of wall-clock samples around `block_until_ready`, programs interleaved sample by
sample, fresh inputs for each (`bench.timing`). Memory: XLA's peak bytes of each program and,
for `fused`, the scratch its custom calls take from XLA's allocator on top (as the CUDA handler
carves it; absent without the CUDA extension). Writes one JSON document (`--out`) and prints a
line per program. `--quick` runs tiny shapes, for checking the script on a CPU.
"""

import argparse
import dataclasses
import pathlib

import jax
import numpy as np

from bench import model, records
from bench.problem import ACTIVATION, Config
from bench.programs import gpu_programs
from bench.timing import compile_program, interleaved_medians

# Tokens per emulated device: every expert gets 256-1024 rows on average (D * T * K / E), a few
# TFLOP a layer, so each shape's programs compile and time within the benchmark's share of a
# lease. Mixtral first, where every baseline fits on the card: a run cut short by its time limit
# keeps the shapes it finished.
_TOKENS = {"Mixtral-8x7B": 512, "Qwen3-30B-A3B": 1024, "DeepSeek-V3": 1024}
_SHAPES = {shape.name: shape for shape in model.SHAPES}
CONFIGS = {
    name: Config(devices=8, tokens=tokens, hidden=_SHAPES[name].hidden, ffn=_SHAPES[name].ffn,
                 experts=_SHAPES[name].experts, k=_SHAPES[name].k, dtype="bfloat16")
    for name, tokens in _TOKENS.items()
}
QUICK_CONFIGS = {
    "quick": Config(devices=8, tokens=16, hidden=32, ffn=64, experts=8, k=2, dtype="bfloat16"),
}
_KINDS = {"fwd": "forward", "fwd_bwd": "forward_backward"}

NOTES = {
    "fused": "fused_moe_emulated: D emulated peers on one GPU (peer reads are local here)",
    "fused_hidden": "fused with residuals=\"hidden\": the forward keeps h = x @ w_in (float32) "
                    "and the backward reads it instead of recomputing it",
    "fused_fetch_sms0": "fused under jax_ccfuser.fetch_sms(0): the GEMMs keep no SMs free for "
                        "the fetch of later sources' rows (fused keeps the default, one SM in "
                        "eight)",
    "ragged_dot": "sort + jax.lax.ragged_dot + unsort over all experts on one GPU",
    "tokamax": "sort + tokamax.ragged_dot + unsort over all experts on one GPU (tokamax "
               "picks its implementation: Mosaic GPU on Hopper where it can)",
    "tokamax_triton": "as tokamax, with its Pallas Triton kernels chosen explicitly",
    "all_to_all": "all_to_all_moe(axis_name=None), dropless: the D-GPU exchange cannot run on "
                  "one GPU; this times its sort, buffers padded to every expert x all rows, and "
                  "grouped FFN",
    "all_to_all_cf1.25": "all_to_all_moe(axis_name=None, capacity_factor=1.25): as all_to_all "
                         "but capacity-padded buffers; drops rows (dropped_fraction)",
    "roof": "one dense [pairs, H] @ [H, 3F] matmul: the layer's useful FLOPs, no routing",
}


def first_line(error: Exception) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _relative_error(a, b) -> float:
  """`||a - b|| / ||b||` in float32."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fused_scratch_bytes(config: Config) -> dict | None:
  """Scratch of one `fused_moe_emulated` forward and backward call on one GPU, `{"fwd": bytes,
  "bwd": bytes}`, as the CUDA handler sizes it under the scratch budget in force; None without
  the CUDA extension."""
  from jax_ccfuser import _extension  # noqa: PLC0415 (the CUDA module, where it was built)
  from jax_ccfuser._config import scratch_budget_bytes  # noqa: PLC0415
  from jax_ccfuser._ffn import ACTIVATIONS  # noqa: PLC0415
  if _extension.cuda is None:
    return None
  sizes = dict(num_devices=config.devices, tokens=config.tokens, hidden=config.hidden,
               ffn=config.ffn, k=config.k, experts_local=config.experts // config.devices,
               gated=ACTIVATIONS[ACTIVATION].gated, float32=config.dtype == "float32",
               emulated=True, scratch_budget=scratch_budget_bytes(),
               grouped_gemms=fused_gemms() == "sm90 grouped",
               num_sms=getattr(jax.devices()[0], "core_count", 132))
  return {short: _extension.cuda.scratch_bytes(**sizes, backward=short == "bwd")
          for short in ("fwd", "bwd")}


def fused_gemms() -> str | None:
  """Which kernels the fused calls' GEMMs over pair rows run on this GPU: "sm90 grouped" or
  "sm80"; None where they run on no GPU."""
  from jax_ccfuser import _extension  # noqa: PLC0415
  if _extension.cuda is None or jax.default_backend() != "gpu":
    return None
  return "sm90 grouped" if _extension.cuda.grouped_gemms() else "sm80"


def dense_bytes(impl: str, config: Config) -> int | None:
  """Bytes of the one buffer a baseline materialises by construction, whatever XLA does next:
  dropless `all_to_all` pads every expert to all `D * T * K` rows ([E, D*T*K, H]), and
  `jax.lax.ragged_dot` on GPU expands its rows per group in float32 ([E, D*T*K, H], seen in
  XLA's GPU autotuner log of the first GPU check). None for the others."""
  rows = config.devices * config.tokens * config.k
  itemsize = {"all_to_all": np.dtype(config.dtype).itemsize, "ragged_dot": 4}.get(impl)
  return None if itemsize is None else config.experts * rows * config.hidden * itemsize


def _device_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get("bytes_limit") if stats else None


def measure(config: Config, *, min_samples: int, max_samples: int, budget_s: float,
            impls=None) -> dict:
  """Times the programs of `config` (those named in `impls`, default all); returns its record
  (see `main`). A baseline whose `dense_bytes` exceed the device's memory is recorded as not
  run without compiling it: XLA's autotuner takes minutes to find out the same."""
  programs = gpu_programs(config, all_to_all=True)
  if impls is not None:
    unknown = [name for name in impls if name not in programs]
    if unknown:  # a typo once measured nothing and exited 0, on a GPU lease
      raise SystemExit(f"unknown programs {unknown}; choose from {', '.join(programs)}")
    programs = {name: program for name, program in programs.items() if name in impls}
  runs, errors, peak = {}, {}, {}
  first_outputs = {}
  limit = _device_bytes()
  for impl, program in programs.items():
    need = dense_bytes(impl, config)
    if limit and need and need > limit:
      errors[impl] = (f"not compiled: its [E, D*T*K, H] buffer alone takes {need / 2**30:.0f} "
                      f"GiB, the device has {limit / 2**30:.0f} GiB")
      continue
    try:
      for short, kind in _KINDS.items():
        compiled, memory = compile_program(getattr(program, kind), program.inputs(0))
        out = jax.block_until_ready(compiled(*program.inputs(0)))
        runs[impl, short] = (compiled, program.inputs)
        peak[impl, short] = memory.peak
        if short == "fwd":
          first_outputs[impl] = out
    except Exception as e:  # noqa: BLE001 (recorded: the other programs still run)
      errors[impl] = first_line(e)
      runs = {key: run for key, run in runs.items() if key[0] != impl}
      first_outputs.pop(impl, None)  # its forward ran, but the program is reported not run
  times = interleaved_medians(runs, min_samples=min_samples, max_samples=max_samples,
                              budget_s=budget_s)
  useful = {short: config.useful_flop(short == "fwd_bwd") for short in _KINDS}
  impls = {}
  for impl, program in programs.items():
    if impl in errors:
      impls[impl] = {"error": errors[impl]}
      continue
    fields = {"samples": min(times[impl, short].samples for short in _KINDS),
              "dropped_fraction": program.dropped}
    for short in _KINDS:
      ms = times[impl, short].ms
      fields[f"{short}_ms"] = ms
      fields[f"{short}_tflops"] = useful[short] * (1 - program.dropped) / ms / 1e9
      fields[f"{short}_peak_bytes"] = peak[impl, short]
      if ("roof", short) in times:
        fields[f"{short}_roof_fraction"] = times["roof", short].ms / ms
    impls[impl] = fields
  fused = impls.get("fused", {})
  speedup = {impl: {short: f[f"{short}_ms"] / fused[f"{short}_ms"] for short in _KINDS}
             for impl, f in impls.items()
             if impl not in ("fused", "roof") and "error" not in f and "fwd_ms" in fused}
  # Against every program that computes the same layer: not the roof, none that dropped rows.
  agreement = {impl: _relative_error(first_outputs["fused"], out)
               for impl, out in first_outputs.items()
               if impl not in ("fused", "roof") and programs[impl].dropped == 0.0
               and "fused" in first_outputs}
  return {"config": dataclasses.asdict(config), "useful_tflop": useful["fwd"] / 1e12,
          "impls": impls, "baseline_ms_over_fused_ms": speedup,
          "fused_forward_relative_error_vs": agreement,
          "fused_scratch_bytes": fused_scratch_bytes(config)}


def _line(name: str, impl: str, f: dict) -> str:
  if "error" in f:
    return f"{name:<8s} {impl:<18s} not run: {f['error']}"
  roof = lambda short: (f"{100 * f[f'{short}_roof_fraction']:5.1f}% roof"
                        if f"{short}_roof_fraction" in f else "")
  return (f"{name:<8s} {impl:<18s} fwd {f['fwd_ms']:8.3f} ms {f['fwd_tflops']:7.1f} TFLOP/s "
          f"{roof('fwd')} | fwd+bwd {f['fwd_bwd_ms']:8.3f} ms {f['fwd_bwd_tflops']:7.1f} "
          f"TFLOP/s {roof('fwd_bwd')}")


def select_configs(quick: bool, names: str | None) -> dict[str, Config]:
  """The configurations to run: QUICK_CONFIGS or CONFIGS, or those named in `names`
  (comma-separated, in that order: a run cut short keeps the first)."""
  configs = QUICK_CONFIGS if quick else CONFIGS
  if not names:
    return configs
  asked = names.split(",")
  unknown = [n for n in asked if n not in configs]
  if unknown:
    raise SystemExit(f"unknown configurations {unknown}; choose from {', '.join(configs)}")
  return {name: configs[name] for name in asked}


def main(argv=None) -> dict:
  """Runs the benchmark and writes its document; returns it.

  The document: platform, device, jax version, date, notes per implementation, and per
  configuration its sizes, useful TFLOP (forward), per implementation either its medians
  (`fwd_ms`, `fwd_bwd_ms`), useful TFLOP/s, fraction of the roof, peak bytes, samples and
  dropped fraction, or the error that stopped it, the baselines' times over fused's, and the
  relative error of fused's forward against every program of the same layer, those that
  dropped no rows (a wrong kernel shows here; against `fused_hidden` and `fused_fetch_sms0` it
  is 0, bitwise alike).
  """
  parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write")
  parser.add_argument("--quick", action="store_true", help="tiny shapes, a CPU will do")
  parser.add_argument("--configs", default=None,
                      help=f"comma-separated subset of {', '.join(CONFIGS)}, run in that order")
  parser.add_argument("--impls", default=None,
                      help="comma-separated subset of the programs (default: all of them)")
  args = parser.parse_args(argv)
  configs = select_configs(args.quick, args.configs)
  doc = {"platform": records.platform(), "device": records.device_description(),
         "jax": jax.__version__, "date": records.now(), "activation": ACTIVATION,
         "fused_gemms": fused_gemms(), "notes": NOTES, "configs": {}}
  for name, config in configs.items():
    record = measure(config, min_samples=1 if args.quick else 5,
                     max_samples=1 if args.quick else 20, budget_s=8.0,
                     impls=args.impls.split(",") if args.impls else None)
    doc["configs"][name] = record
    for impl, f in record["impls"].items():
      print(_line(name, impl, f), flush=True)
    records.write_whole(doc, args.out)
  return doc


if __name__ == "__main__":
  main()
