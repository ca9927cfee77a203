"""Expert reassignment: plans even out device loads and never change results."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ccfuser as ccf
from jax_ccfuser._fused import fused_moe_emulated
from jax.sharding import PartitionSpec as P

from moe_cases import Case, assert_close, ep_mesh, make_inputs, sharded


def _planned(x, ids, weights, w_in, w_out, axis_name, **options):
  """fused_moe with a fresh plan; also returns the plan (replicated: every device has it)."""
  plan = ccf.reassign(ids, w_in.shape[0] * jax.lax.axis_size(axis_name), axis_name=axis_name,
                      **options)
  y = ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name, plan=plan)
  return y, jax.tree.map(lambda a: a[None], plan)


def _run(case, ids=None, **options):
  x, case_ids, weights, w_in, w_out = make_inputs(case)
  ids = case_ids if ids is None else ids
  f = sharded(functools.partial(_planned, **options), case.devices)
  y, plan = f(x, ids, weights, w_in, w_out)
  return (x, ids, weights, w_in, w_out), y, jax.tree.map(lambda a: a[0], plan)


def _imbalance(loads):
  loads = np.asarray(loads, np.float64)
  return loads.max() / loads.mean()


def test_skewed_routing_is_balanced_and_results_unchanged():
  case = Case(devices=8, tokens=96, k=2, skew=1.0, seed=1)
  args, y, plan = _run(case, tile=4)
  before, after = ccf.plan_loads(plan)
  assert _imbalance(before) >= 2.0
  assert _imbalance(after) <= 1.15
  assert int(before.sum()) == int(after.sum()) == case.devices * case.tokens * case.k
  y_plain = sharded(ccf.fused_moe, 8)(*args)
  assert_close(y, y_plain, jnp.float32)
  assert_close(y, sharded(ccf.reference_moe, 8)(*args), jnp.float32)


def test_gradients_equal_with_and_without_plan():
  case = Case(devices=4, tokens=40, k=3, skew=0.9, seed=2)
  x, ids, weights, w_in, w_out = make_inputs(case)
  proj = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(planned):
    def fn(x, ids, weights, w_in, w_out, axis_name):
      if planned:
        return _planned(x, ids, weights, w_in, w_out, axis_name, tile=2)[0]
      return ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name)
    f = sharded(fn, 4)
    return lambda x, w, a, b: jnp.sum(f(x, ids, w, a, b) * proj)

  g_plan = jax.grad(loss(True), (0, 1, 2, 3))(x, weights, w_in, w_out)
  g_none = jax.grad(loss(False), (0, 1, 2, 3))(x, weights, w_in, w_out)
  for a, b in zip(g_plan, g_none):
    assert_close(a, b, jnp.float32, max(1.0, float(jnp.max(jnp.abs(b))) / 4))
  # The plan really moved work: otherwise this test would compare a path with itself.
  _, _, plan = _run(case, tile=2)
  assert np.any(np.asarray(plan.workers)[:, 1:] >= 0)


def test_every_row_to_one_expert():
  case = Case(devices=4, tokens=33, k=2, seed=3)
  x = make_inputs(case)[1]
  ids = jnp.full(x.shape, 5, jnp.int32)  # expert 5 lives on device 2
  args, y, plan = _run(case, ids=ids, tile=1)
  before, after = ccf.plan_loads(plan)
  assert list(np.asarray(before)) == [0, 0, 4 * 33 * 2, 0]
  assert _imbalance(after) <= 1.05
  assert_close(y, sharded(ccf.reference_moe, 4)(*args), jnp.float32)


def test_uniform_routing_moves_nothing():
  case = Case(devices=4, tokens=64, k=1, experts_local=1, seed=4)
  x, _, *_ = make_inputs(case)
  ids = jnp.tile(jnp.arange(4, dtype=jnp.int32), 64)[:, None]
  _, _, plan = _run(case, ids=ids)
  assert np.all(np.asarray(plan.workers)[:, 1:] == -1)
  np.testing.assert_array_equal(*ccf.plan_loads(plan))


def test_one_devices_rows_only():
  """Only device 1's experts receive rows: its peers take slices, results unchanged."""
  case = Case(devices=4, tokens=30, k=2, experts_local=2, seed=5)
  _, ids, *_ = make_inputs(case)
  ids = 2 + ids % 2
  args, y, plan = _run(case, ids=ids, tile=1)
  before, after = ccf.plan_loads(plan)
  assert int(before[1]) == int(before.sum())
  assert _imbalance(after) <= 1.15
  assert_close(y, sharded(ccf.reference_moe, 4)(*args), jnp.float32)


def test_options_limit_what_moves():
  case = Case(devices=8, tokens=64, skew=1.0, seed=6)
  _, _, plan = _run(case, max_helpers=1, tile=1)
  assert plan.workers.shape == (case.num_experts, 2)
  _, _, still = _run(case, threshold=100.0)
  assert np.all(np.asarray(still.workers)[:, 1:] == -1)
  _, _, coarse = _run(case, tile=64)
  sizes = np.diff(np.asarray(coarse.bounds), axis=1)
  helped = np.asarray(coarse.workers)[:, 1:] >= 0
  assert helped.any()
  # Whole tiles, except a slice that takes everything the owner still had.
  whole = (sizes[:, 1:] % 64 == 0) | (sizes[:, :1] == 0)
  assert np.all(whole[helped])


def _plan_step(case, ids, previous=None):
  """reassign under shard_map, optionally from a previous (replicated) plan."""
  def body(ids, previous, axis_name):
    plan = ccf.reassign(ids, case.num_experts, axis_name=axis_name, tile=1, previous=previous)
    return jax.tree.map(lambda a: a[None], plan)

  f = jax.jit(jax.shard_map(functools.partial(body, axis_name="ep"), mesh=ep_mesh(case.devices),
                            in_specs=(P("ep"), P()), out_specs=P("ep")))
  return jax.tree.map(lambda a: a[0], f(ids, previous))


def test_previous_plan_is_kept_while_it_balances():
  case = Case(devices=4, tokens=64, skew=1.0, seed=7)
  _, ids, *_ = make_inputs(case)
  first = _plan_step(case, ids)
  assert np.any(np.asarray(first.workers)[:, 1:] >= 0)
  # The same routing again: the previous slices still balance, so they are kept as they are.
  kept = _plan_step(case, ids, first)
  np.testing.assert_array_equal(kept.workers, first.workers)
  np.testing.assert_array_equal(kept.bounds, first.bounds)
  # Routing that moved to other experts: the old slices no longer balance; a new plan comes.
  moved = (ids + 3) % case.num_experts
  fresh = _plan_step(case, moved, first)
  assert _imbalance(ccf.plan_loads(fresh)[1]) <= 1.15
  assert not np.array_equal(np.asarray(fresh.workers), np.asarray(first.workers))


def test_emulated_devices_execute_the_same_plan():
  case = Case(devices=4, tokens=24, k=2, skew=1.0, seed=8)
  args, y, plan = _run(case, tile=2)
  emulated = jax.jit(functools.partial(fused_moe_emulated, num_devices=4))(*args, plan=plan)
  np.testing.assert_array_equal(np.asarray(emulated), np.asarray(y))


def test_plan_for_other_expert_count_is_rejected():
  case = Case(devices=1, experts_local=4, seed=9)
  x, ids, weights, w_in, w_out = make_inputs(case)
  plan = ccf.reassign(ids, 8)
  with pytest.raises(ValueError, match="plan is for 8 experts, this call has 4"):
    ccf.fused_moe(x, ids, weights, w_in, w_out, plan=plan)
  with pytest.raises(ValueError, match="not divisible"):
    ccf.reassign(ids, 0)
