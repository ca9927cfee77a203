"""Several call sites in one step, and one step run from several threads."""

import dataclasses
import functools
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from hardening_cases import (NO_HANG_S, PEER_CASE, assert_loss_and_grads_close,
                             assert_matches_reference, make_forward_and_grads, peer_args)
from moe_cases import Case, make_inputs, shard_ep


# Layer A: H=16, K=2, E_local=2, swiglu. Layer B: H=8, K=3, E_local=3, gelu, F=12.
_LAYER_A = Case(devices=4, tokens=12, hidden=16, ffn=8, experts_local=2, k=2)
_LAYER_B = Case(devices=4, tokens=12, hidden=8, ffn=12, experts_local=3, k=3, activation="gelu")


def _two_layer_inputs(seed):
  """Layer A's and B's routing and weights, the projections between them and a cotangent."""
  x, ids_a, weights_a, w_in_a, w_out_a = make_inputs(dataclasses.replace(_LAYER_A, seed=seed))
  _, ids_b, weights_b, w_in_b, w_out_b = make_inputs(dataclasses.replace(_LAYER_B, seed=seed + 1))
  rng = np.random.default_rng(seed + 2)
  down = jnp.asarray(rng.standard_normal((16, 8)) / 4, jnp.float32)
  up = jnp.asarray(rng.standard_normal((8, 16)) / 3, jnp.float32)
  proj = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  return (x, ids_a, weights_a, w_in_a, w_out_a, ids_b, weights_b, w_in_b, w_out_b, down, up,
          proj)


_TWO_LAYER_GRADS = ("dx", "dw_in_a", "dw_out_a", "dw_in_b", "dw_out_b")


def _two_layer_step(moe_fn):
  """A jitted loss and its gradients through three call sites of two layers in one step.

  Sites 1 (layer A) and 2 (layer B, another shape) are independent, so XLA may run them in
  either order or at once; site 3 (layer A's weights again) depends on both. The backward runs
  them in reverse, interleaved with the forward's residual reads.
  """
  def body(x, ids_a, weights_a, w_in_a, w_out_a, ids_b, weights_b, w_in_b, w_out_b, down, up,
           axis_name):
    layer_a = functools.partial(moe_fn, axis_name=axis_name)
    layer_b = functools.partial(moe_fn, axis_name=axis_name, activation="gelu")
    y1 = layer_a(x, ids_a, weights_a, w_in_a, w_out_a)
    y2 = layer_b(x @ down, ids_b, weights_b, w_in_b, w_out_b)
    return layer_a(y1 + y2 @ up, ids_a[:, ::-1], weights_a, w_in_a, w_out_a)

  model = shard_ep(body, 4, in_specs=(P("ep"),) * 9 + (P(), P()))

  def loss(*args):
    *inputs, proj = args
    return jnp.sum(model(*inputs) * proj)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 7, 8)))


def test_two_layers_three_sites_in_one_step():
  args = _two_layer_inputs(31)
  loss, grads = _two_layer_step(ccf.fused_moe)(*args)
  assert_loss_and_grads_close((loss, grads), _two_layer_step(ccf.reference_moe)(*args),
                              _TWO_LAYER_GRADS)


def test_one_traced_layer_called_twice_in_one_step():
  """A jitted layer called twice inside another jit is traced once, so both of its calls in the
  compiled program (and both backward calls) share one call site and one peer group; every
  device must still meet its peers in the same call, in forward and backward."""
  case = dataclasses.replace(PEER_CASE, tokens=64, hidden=32, ffn=64, seed=71)
  x, ids, weights, w_in, w_out, dy = peer_args(case)

  def step(moe_fn):
    layer = jax.jit(shard_ep(lambda *a, axis_name: moe_fn(*a, axis_name=axis_name), 4))

    def loss(x, w_in, w_out):
      y = layer(x, ids, weights, w_in, w_out) + 3 * layer(2 * x[::-1], ids, weights, w_in, w_out)
      return jnp.sum(y * dy)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  fused = step(ccf.fused_moe)
  hlo = fused.lower(x, w_in, w_out).compile().as_text()
  sites = re.findall(r'custom_call_target="ccf_moe_fwd".*?site = (\d+)', hlo)
  assert len(sites) == 2 and sites[0] == sites[1], sites
  reference = step(ccf.reference_moe)(x, w_in, w_out)
  for _ in range(3):
    assert_loss_and_grads_close(fused(x, w_in, w_out), reference, ("dx", "dw_in", "dw_out"))


def test_steps_from_two_threads_do_not_cross_talk():
  """Two threads run the same two jitted steps on different inputs at once; each gets bitwise
  the results of running alone (fused_moe is deterministic), so no device paired with a device
  of the other thread's execution."""
  # Short enough that a deadlock between the threads' executions ends as an error in the join
  # window below; long enough that a merely slow peer never trips it.
  with ccf.peer_timeout(NO_HANG_S / 2):
    steps = (_two_layer_step(ccf.fused_moe), make_forward_and_grads(ccf.fused_moe, 4))
    inputs = [(_two_layer_inputs(seed), peer_args(dataclasses.replace(PEER_CASE, seed=seed)))
              for seed in (41, 42)]
    alone = [jax.tree.map(np.asarray, [step(*a) for step, a in zip(steps, args)])
             for args in inputs]
  two_layers_ref = _two_layer_step(ccf.reference_moe)
  for args, (two_layers, one_layer) in zip(inputs, alone):
    assert_loss_and_grads_close(two_layers, two_layers_ref(*args[0]), _TWO_LAYER_GRADS)
    assert_matches_reference(one_layer, args[1], 4, "swiglu", jnp.float32)
  failures = []

  def run(thread):
    try:
      # Each thread's own: the settings are thread-local (and keys of the steps' traces).
      with ccf.peer_timeout(NO_HANG_S / 2):
        for _ in range(15):
          got = [step(*a) for step, a in zip(steps, inputs[thread])]
          jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got),
                       alone[thread])
    except Exception as e:  # noqa: BLE001 (reported below)
      failures.append((thread, e))

  threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(2 * NO_HANG_S)
    assert not t.is_alive(), "a thread's step hangs"
  assert not failures, failures
