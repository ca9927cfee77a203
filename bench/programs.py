"""The implementations a benchmark compares, each as a forward and a forward+backward program.

CPU (the simulated devices of one process, `jax.shard_map` over an "ep" axis of D devices):
`fused` (`jax_ccfuser.fused_moe`), `all_to_all` (`all_to_all_moe`, dropless),
`all_to_all_cf1.25` (`all_to_all_moe(capacity_factor=1.25)`) and `roof`.
GPU (one device): `fused` (`jax_ccfuser.experimental.fused_moe_emulated` over D emulated
peers), `fused_hidden` (the same keeping h for the backward, `residuals="hidden"`, instead of
recomputing it), `fused_fetch_sms0` (`fused` traced under `jax_ccfuser.fetch_sms(0)`: every GEMM
on every SM, none kept for the fetch), `ragged_dot` and `tokamax` (`bench.ragged` with
`jax.lax.ragged_dot` or tokamax's), on a GPU `tokamax_triton` (tokamax's Pallas Triton
kernels, chosen explicitly) and `roof`; on request also `all_to_all` and
`all_to_all_cf1.25` over the one device (`all_to_all_moe` with `axis_name=None`: no exchange, so
what they time is the baseline's sort, padded buffers and grouped FFN).

The roof is one dense matmul per device with the layer's useful FLOPs, `[T*K, H] @ [H, 3F]`,
in the layer's dtype: what the expert FFNs would cost with perfect routing and no gather,
activation or combine.
Forward+backward programs take `jax.grad` of `0.5 * sum(y**2)` (so `dy = y`) with respect to
every float input: x, expert_weights, w_in and w_out (a and b for the roof).
"""

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser.experimental import fused_moe_emulated

from bench.problem import ACTIVATION, GEMMS_PER_ROW, Config, make_inputs
from bench.ragged import ragged_dot_moe, tokamax_ragged_dot

CAPACITY_FACTOR = 1.25
CPU_IMPLS = ("fused", "all_to_all", f"all_to_all_cf{CAPACITY_FACTOR}", "roof")
GPU_IMPLS = ("fused", "fused_hidden", "fused_fetch_sms0", "ragged_dot", "tokamax",
             "tokamax_triton", "roof")
ONE_DEVICE_ALL_TO_ALL = ("all_to_all", f"all_to_all_cf{CAPACITY_FACTOR}")


@dataclasses.dataclass(frozen=True)
class Program:
  """One implementation of one configuration, ready to compile and time."""
  forward: Callable           # jitted, on `inputs(i)`
  forward_backward: Callable  # jitted, on `inputs(i)`; returns the gradients
  inputs: Callable[[int], tuple]  # fresh (perturbed) arguments for sample i
  dropped: float = 0.0        # share of routed rows the implementation drops


def half_square_grad(fn, argnums):
  """`jax.grad` of `0.5 * sum(fn(*args)**2)` in float32 with respect to `argnums`."""
  def loss(*args):
    y = fn(*args).astype(jnp.float32)
    return 0.5 * jnp.vdot(y, y)
  return jax.grad(loss, argnums=argnums)


def perturbed(arrays, perturb_argnums):
  """`inputs(i)`: `arrays` with the ones at `perturb_argnums` scaled by `1 + 1e-3 * i`.

  Scaling keeps the routing and hence the work identical, while every sample gets new buffers.
  """
  @jax.jit
  def scale(i, *args):
    factor = 1.0 + 1e-3 * i
    return tuple((a * factor).astype(a.dtype) if n in perturb_argnums else a
                 for n, a in enumerate(args))
  return lambda i: scale(jnp.float32(i), *arrays)


def _dropped_share(expert_ids: np.ndarray, config: Config, capacity_factor: float) -> float:
  """Share of routed rows `all_to_all_moe(capacity_factor=...)` drops for these ids.

  Each source device serves at most `ceil(c * T * K / E)` rows per expert (the baseline's
  documented capacity rule), so the drops are what exceeds it, device by device.
  """
  capacity = math.ceil(min(capacity_factor, config.experts) * config.tokens * config.k
                       / config.experts)
  per_device = expert_ids.reshape(config.devices, config.tokens * config.k)
  counts = np.stack([np.bincount(row, minlength=config.experts) for row in per_device])
  return float(np.maximum(counts - capacity, 0).sum() / config.pairs)


def planned_layer(config: Config, planned: bool, **options):
  """`fused_moe` over the "ep" axis, with `reassign`'s plan when `planned`; `options` go to
  `fused_moe`."""
  def body(x, ids, weights, w_in, w_out):
    plan = ccf.reassign(ids, config.experts, axis_name="ep") if planned else None
    return ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name="ep", activation=ACTIVATION,
                         plan=plan, **options)
  return body


def ep_mesh(devices: int):
  if len(jax.devices()) < devices:
    raise ValueError(f"{devices} devices asked for, {len(jax.devices())} present; on CPU set "
                     "jax_num_cpu_devices before jax starts")
  return jax.make_mesh((devices,), ("ep",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:devices])


def _dense(a, b):
  """`a @ b` in a's dtype, as the layer returns y, so that the backward's GEMMs take a cotangent
  in that dtype too. A float32 product (even one cast back) hands them a float32 cotangent,
  which XLA:GPU multiplies as float32 (TF32, half bfloat16's rate): 17.1 of such a roof's
  23.9 ms forward+backward at Mixtral-8x7B's shape on an H200."""
  return jnp.dot(a, b)


def roof_operands(config: Config, *, groups: int):
  """`a [groups*T*K, H]` and `b [groups*H, 3F]` (or `[H, 3F]` when `groups` is 1; `2F`
  ungated), unit scale."""
  rng = np.random.default_rng(1)
  dtype = jnp.dtype(config.dtype)
  a = jnp.asarray(rng.standard_normal((config.pairs, config.hidden), dtype=np.float32), dtype)
  b = jnp.asarray(rng.standard_normal((groups * config.hidden, GEMMS_PER_ROW * config.ffn),
                                      dtype=np.float32) / np.sqrt(config.hidden), dtype)
  return a, b


def cpu_programs(config: Config) -> dict[str, Program]:
  """`CPU_IMPLS` under `jax.shard_map` over the first `config.devices` devices."""
  mesh = ep_mesh(config.devices)
  shard = NamedSharding(mesh, P("ep"))
  arrays = jax.device_put(make_inputs(config), shard)

  def sharded(fn):
    return jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))

  programs = {}
  moe_fns = {
      "fused": ccf.fused_moe,
      "all_to_all": ccf.all_to_all_moe,
      f"all_to_all_cf{CAPACITY_FACTOR}": functools.partial(ccf.all_to_all_moe,
                                                          capacity_factor=CAPACITY_FACTOR),
  }
  dropped = _dropped_share(np.asarray(arrays[1]), config, CAPACITY_FACTOR)
  for name, moe in moe_fns.items():
    layer = sharded(functools.partial(moe, axis_name="ep", activation=ACTIVATION))
    programs[name] = Program(
        forward=jax.jit(layer),
        forward_backward=jax.jit(half_square_grad(layer, (0, 2, 3, 4))),
        inputs=perturbed(arrays, (0, 2)),
        dropped=dropped if "cf" in name else 0.0)
  dense = sharded(_dense)
  roof_args = jax.device_put(roof_operands(config, groups=config.devices), shard)
  programs["roof"] = Program(forward=jax.jit(dense),
                             forward_backward=jax.jit(half_square_grad(dense, (0, 1))),
                             inputs=perturbed(roof_args, (0,)))
  return programs


def _traced_under(setting, value, fn):
  """`fn` with `setting(value)` in force while it is traced (each trace enters it anew)."""
  def traced(*args):
    with setting(value):
      return fn(*args)
  return traced


def gpu_programs(config: Config, *, all_to_all: bool = False) -> dict[str, Program]:
  """`GPU_IMPLS` on the first device; `fused` emulates `config.devices` peers on it.

  With `all_to_all`, also `ONE_DEVICE_ALL_TO_ALL` (before the roof): the baseline over the
  whole problem on the one device, whose capacity rule then counts all `D * T` tokens as one
  source's.
  """
  arrays = jax.device_put(make_inputs(config), jax.devices()[0])
  fused = functools.partial(fused_moe_emulated, num_devices=config.devices,
                            activation=ACTIVATION)
  moe_fns = {"fused": fused,
             "fused_hidden": functools.partial(fused, residuals="hidden"),
             "fused_fetch_sms0": _traced_under(ccf.fetch_sms, 0, fused),
             "ragged_dot": functools.partial(ragged_dot_moe, activation=ACTIVATION),
             "tokamax": functools.partial(ragged_dot_moe, activation=ACTIVATION,
                                          ragged_dot=tokamax_ragged_dot)}
  if jax.default_backend() == "gpu":  # Pallas Triton kernels compile for GPUs only
    moe_fns["tokamax_triton"] = functools.partial(
        ragged_dot_moe, activation=ACTIVATION,
        ragged_dot=functools.partial(tokamax_ragged_dot, implementation="triton"))
  dropped = {}
  if all_to_all:
    dropless, capped = ONE_DEVICE_ALL_TO_ALL
    moe_fns[dropless] = functools.partial(ccf.all_to_all_moe, activation=ACTIVATION)
    moe_fns[capped] = functools.partial(ccf.all_to_all_moe, activation=ACTIVATION,
                                        capacity_factor=CAPACITY_FACTOR)
    one_source = dataclasses.replace(config, devices=1, tokens=config.devices * config.tokens)
    dropped[capped] = _dropped_share(np.asarray(arrays[1]), one_source, CAPACITY_FACTOR)
  programs = {
      name: Program(forward=jax.jit(fn),
                    forward_backward=jax.jit(half_square_grad(fn, (0, 2, 3, 4))),
                    inputs=perturbed(arrays, (0, 2)), dropped=dropped.get(name, 0.0))
      for name, fn in moe_fns.items()
  }
  roof_args = jax.device_put(roof_operands(config, groups=1), jax.devices()[0])
  programs["roof"] = Program(forward=jax.jit(_dense),
                             forward_backward=jax.jit(half_square_grad(_dense, (0, 1))),
                             inputs=perturbed(roof_args, (0,)))
  return programs
