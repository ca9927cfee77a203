"""A long training run of fused_moe: memory and the peer registry stay flat."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil
import pytest
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser import _extension
from moe_cases import shard_ep


@pytest.mark.slow
def test_thousand_training_steps_keep_memory_flat():
  """1,000 Adam steps of a routed MoE layer: after warm-up, resident memory, live arrays, the
  peer registry and the traffic table stay put, and the loss goes down."""
  devices, tokens, hidden, ffn, experts_local, k = 4, 16, 32, 32, 2, 2
  num_experts = devices * experts_local
  rng = np.random.default_rng(61)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = dict(router=0.1 * normal(hidden, num_experts),
                w_in=normal(num_experts, hidden, 2 * ffn) / np.sqrt(hidden),
                w_out=normal(num_experts, ffn, hidden) / np.sqrt(ffn))
  batches = [(normal(devices * tokens, hidden), normal(devices * tokens, hidden))
             for _ in range(4)]

  def body(params, x, target, axis_name):
    ids, weights, aux = ccf.route(x @ params["router"], k, axis_name=axis_name)
    y = ccf.fused_moe(x, ids, weights, params["w_in"], params["w_out"], axis_name=axis_name)
    loss = jnp.mean(jnp.square(x + y - target)) + 1e-2 * aux.load_balancing_loss
    return jax.lax.pmean(loss, axis_name)

  specs = dict(router=P(), w_in=P("ep"), w_out=P("ep"))
  loss_fn = shard_ep(body, devices, in_specs=(specs, P("ep"), P("ep")), out_specs=P())
  optimizer = optax.adam(1e-3)

  @jax.jit
  def train_step(params, opt_state, x, target):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  process = psutil.Process()
  marks = {}
  for step in range(1000):
    params, opt_state, loss = train_step(params, opt_state, *batches[step % len(batches)])
    if step in (0, 199, 999):
      jax.block_until_ready(loss)
      marks[step] = dict(loss=float(loss), rss=process.memory_info().rss,
                         groups=_extension.cpu.peer_group_count(),
                         arrays=len(jax.live_arrays()), traffic=len(ccf.peer_traffic()))
  warm, end = marks[199], marks[999]
  growth_mb = (end["rss"] - warm["rss"]) / 2**20
  assert growth_mb < 20, f"resident memory grew {growth_mb:.1f} MB from step 200 to 1000"
  for key in ("groups", "arrays", "traffic"):
    assert end[key] == warm[key], (key, warm[key], end[key])
  assert np.isfinite(end["loss"]) and end["loss"] < 0.5 * marks[0]["loss"]

