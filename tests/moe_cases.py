"""Random MoE problems and the shard_map harness shared by the tests."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser._ffn import ACTIVATIONS

# Forward/gradient tolerances (rtol, atol) per compute dtype, against reference_moe in float32.
TOLERANCES = {
    jnp.float32: (2e-4, 2e-5),
    jnp.bfloat16: (3e-2, 3e-2),
    jnp.float16: (5e-3, 5e-3),
}


@dataclasses.dataclass(frozen=True)
class Case:
  devices: int = 4
  tokens: int = 13          # per device; deliberately not a multiple of any tile
  hidden: int = 16
  ffn: int = 24
  experts_local: int = 2
  k: int = 2
  dtype: type = jnp.float32
  activation: str = "swiglu"
  skew: float = 0.0         # 0: uniform routing; 1: almost every row to expert 0
  seed: int = 0

  @property
  def num_experts(self):
    return self.devices * self.experts_local


def make_inputs(case: Case):
  """Global arrays (device d's shard is the d-th block of rows / experts).

  Returns:
    x `[D*T, H]`, expert_ids `[D*T, K]` int32, expert_weights `[D*T, K]` float32,
    w_in `[E, H, 2F or F]`, w_out `[E, F, H]`.
  """
  rng = np.random.default_rng(case.seed)
  n = case.devices * case.tokens
  e = case.num_experts
  g = 2 if ACTIVATIONS[case.activation].gated else 1
  x = rng.standard_normal((n, case.hidden), dtype=np.float32)
  logits = rng.standard_normal((n, e)) + np.where(np.arange(e) == 0, 8.0 * case.skew, 0.0)
  gumbel = -np.log(-np.log(rng.uniform(size=(n, case.k, e))))
  ids = np.argmax(logits[:, None, :] + gumbel, axis=-1).astype(np.int32)
  weights = rng.uniform(0.1, 1.0, size=(n, case.k)).astype(np.float32)
  w_in = rng.standard_normal((e, case.hidden, g * case.ffn), dtype=np.float32) / np.sqrt(case.hidden)
  w_out = rng.standard_normal((e, case.ffn, case.hidden), dtype=np.float32) / np.sqrt(case.ffn)
  cast = lambda a: jnp.asarray(a, case.dtype)
  return cast(x), jnp.asarray(ids), jnp.asarray(weights), cast(w_in), cast(w_out)


def emulated_plan(ids, num_experts: int, devices: int, tile: int = 4):
  """`reassign`'s plan for `fused_moe_emulated` over `devices` devices: each takes its block of
  `ids` `[D*T, K]`, as under `shard_map` (the same axis collectives, over a named vmap axis)."""
  plan = jax.vmap(lambda block: ccf.reassign(block, num_experts, axis_name="ep", tile=tile),
                  axis_name="ep")(ids.reshape(devices, -1, ids.shape[1]))
  return jax.tree.map(lambda a: a[0], plan)


def ep_mesh(devices: int):
  return jax.make_mesh((devices,), ("ep",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:devices])


def shard_ep(body, devices: int, in_specs=P("ep"), out_specs=P("ep")):
  """`body(*args, axis_name="ep")` under `shard_map` over the first `devices` devices."""
  return jax.shard_map(functools.partial(body, axis_name="ep"), mesh=ep_mesh(devices),
                       in_specs=in_specs, out_specs=out_specs)


def sharded(moe_fn, devices: int, **kwargs):
  """`moe_fn` (a contract-shaped MoE function) run under `shard_map` over axis "ep", jitted.

  The returned function takes the global arrays of `make_inputs`.
  """
  return jax.jit(shard_ep(functools.partial(moe_fn, **kwargs), devices))


def assert_close(actual, expected, dtype, scale=1.0):
  rtol, atol = TOLERANCES[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             rtol=rtol * scale, atol=atol * scale)


def backward_weight_grads(lowered_text: str) -> list[int]:
  """The `weight_grads` attribute of each backward custom call in a lowered module's text."""
  return [int(v) for v in re.findall(r"@ccf_moe_bwd\(.*weight_grads = (\d+)", lowered_text)]
