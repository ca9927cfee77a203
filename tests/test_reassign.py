"""Expert reassignment: plans even out device loads and never change results."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax_ccfuser as ccf
from jax_ccfuser.experimental import fused_moe_emulated
from jax_ccfuser._expert_order import rank_within_expert
from jax_ccfuser._reassign import _host_shares, _plan
from jax_ccfuser._topology import Split
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


@functools.cache
def _loss_and_grads(case, tile):
  """jitted `(loss, (y, plan)), grads` of `sum(fused_moe(...) * proj)` with respect to x,
  expert_weights, w_in and w_out, with a fresh plan (`tile`) or without one (`tile=None`)."""
  def fn(x, ids, weights, w_in, w_out, axis_name):
    if tile is None:
      return ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name), None
    return _planned(x, ids, weights, w_in, w_out, axis_name, tile=tile)
  f = sharded(fn, case.devices)

  def loss(x, weights, w_in, w_out, ids, proj):
    y, plan = f(x, ids, weights, w_in, w_out)
    return jnp.sum(y * proj), (y, plan)
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))


def _same_with_and_without_plan(case, tile, inputs, proj):
  """fused_moe's output and gradients with a fresh plan equal those without; returns the plan."""
  x, ids, weights, w_in, w_out = inputs
  (_, (y_plan, plan)), g_plan = _loss_and_grads(case, tile)(x, weights, w_in, w_out, ids, proj)
  (_, (y_none, _)), g_none = _loss_and_grads(case, None)(x, weights, w_in, w_out, ids, proj)
  assert_close(y_plan, y_none, jnp.float32)
  for a, b in zip(g_plan, g_none):
    assert_close(a, b, jnp.float32, max(1.0, float(jnp.max(jnp.abs(b))) / 4))
  return jax.tree.map(lambda a: a[0], plan)


def test_gradients_equal_with_and_without_plan():
  case = Case(devices=4, tokens=40, k=3, skew=0.9, seed=2)
  inputs = make_inputs(case)
  proj = jnp.cos(jnp.arange(inputs[0].size, dtype=jnp.float32)).reshape(inputs[0].shape)
  plan = _same_with_and_without_plan(case, 2, inputs, proj)
  # The plan really moved work: otherwise this test would compare a path with itself.
  assert np.any(np.asarray(plan.workers)[:, 1:] >= 0)


def test_each_device_computes_the_rows_its_plan_gives_it():
  """Outputs cannot tell which device computed a row: the handlers' own count of the pairs each
  device computed must be the plan's loads."""
  case = Case(devices=4, tokens=40, k=3, skew=0.9, seed=2)
  ccf.peer_traffic(clear=True)
  _, _, plan = jax.block_until_ready(_run(case, tile=2))  # the handlers count as they run
  records = sorted((r for r in ccf.peer_traffic() if not r["backward"]), key=lambda r: r["rank"])
  assert np.any(np.asarray(plan.workers)[:, 1:] >= 0)
  assert [r["pairs"] for r in records] == np.asarray(plan.loads_after).tolist()


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
  # Whole tiles, except one slice of an expert: the owner's, or a helper's when the owner keeps none.
  partial = sizes % 64 != 0
  assert np.all(partial.sum(1) <= 1)
  assert not np.any(partial[:, 1:] & (sizes[:, :1] > 0))


def _plan_step(case, ids, previous=None, tile=1):
  """reassign under shard_map, optionally from a previous (replicated) plan: the plan, which
  every device must have derived alike."""
  def body(ids, previous, axis_name):
    plan = ccf.reassign(ids, case.num_experts, axis_name=axis_name, tile=tile, previous=previous)
    return jax.tree.map(lambda a: a[None], plan)

  f = jax.jit(jax.shard_map(functools.partial(body, axis_name="ep"), mesh=ep_mesh(case.devices),
                            in_specs=(P("ep"), P()), out_specs=P("ep")))
  plans = f(ids, previous)
  for field in jax.tree.leaves(plans):
    assert np.all(np.asarray(field) == np.asarray(field)[:1])
  return jax.tree.map(lambda a: a[0], plans)


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
  with pytest.raises(ValueError, match="threshold a number >= 1.0, got 32 and nan"):
    ccf.reassign(ids, 4, threshold=float("nan"))
  for num_experts in (0, 2.0, True):
    with pytest.raises(ValueError, match=f"num_experts must be a positive int, got "
                                         f"{num_experts!r}"):
      ccf.reassign(ids, num_experts)


def test_previous_plan_from_another_group_is_rejected_while_tracing():
  """One device's plan ([E, 1] workers) has the workers' shape of a two-device plan without
  helpers: refused for its group, at trace time, where the handler would refuse its owners."""
  case = Case(devices=2, experts_local=2, seed=9)
  _, ids, *_ = make_inputs(case)
  previous = ccf.reassign(ids, case.num_experts, max_helpers=0)
  body = lambda ids: ccf.reassign(ids, case.num_experts, axis_name="ep", max_helpers=0,
                                  previous=previous).counts[None]
  with pytest.raises(ValueError, match=r"previous plan was made for a group of 1 with workers "
                                       r"\(4, 1\), this one for 2 with \(4, 1\)"):
    jax.jit(jax.shard_map(body, mesh=ep_mesh(2), in_specs=P("ep"), out_specs=P("ep")))(ids)


@pytest.mark.slow
def test_plans_under_x64_are_the_same_int32_plans_without_warnings():
  """With jax_enable_x64 the planner's sums are int64; what it writes into its int32 arrays
  is cast, not left to a scatter's implicit cast (a FutureWarning, an error to come)."""
  case = Case(devices=4, tokens=64, skew=1.0, seed=11)
  _, ids, *_ = make_inputs(case)
  source = np.zeros((4, 16), np.int32)
  source[:, 0] = 50
  source[1, 5] = 30
  plans = []
  for x64 in (False, True):
    with jax.enable_x64(x64), warnings.catch_warnings():
      warnings.simplefilter("error")
      first = _plan_step(case, ids)
      kept = _plan_step(case, ids, first)
      replicated = jax.jit(functools.partial(
          _plan, split=Split(2, 2, False, ()), max_helpers=1, threshold=1.1, tile=2,
          previous=None, replicas=1))(jnp.asarray(source))
      plans.append((first, kept, replicated))
  for without, with_x64 in zip(*plans):
    for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_x64)):
      assert a.dtype == b.dtype and a.dtype in (jnp.int32, jnp.float32)
      np.testing.assert_array_equal(a, b)


def test_plan_for_another_group_is_rejected_while_tracing():
  """A plan made inside the shard_map without reassign's axis_name is one device's: fused_moe
  over four devices refuses it while tracing, where the handler would refuse its owners."""
  case = Case(devices=4, tokens=6, seed=10)

  def body(x, ids, weights, w_in, w_out, axis_name):
    plan = ccf.reassign(ids, case.num_experts)  # no axis_name: a group of one
    return ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name, plan=plan)

  with pytest.raises(ValueError, match=r"plan is for a group of 1 devices, this call's has 4: "
                                       r"make it with reassign\(\.\.\., axis_name=\)"):
    sharded(body, 4)(*make_inputs(case))


def _within_bound(loads, threshold=1.1, tile=32):
  """Whether the busiest device is within max(threshold * mean, mean + tile) rows."""
  loads = np.asarray(loads, np.float64)
  return loads.max() <= max(threshold * loads.mean(), loads.mean() + tile)


def test_two_hot_experts_even_out_with_the_default_tile():
  """2/3 and 1/4 of the rows on experts of devices 0 and 1 even out within the bound with the
  default tile (a greedy bound by the tile leaves device 0 at 2.13x the mean)."""
  counts = np.full(16, 3)
  counts[0], counts[2] = 700, 272
  counts[[1, 3, 4, 5, 6, 7, 8, 9, 10, 11]] += 1  # 1024 rows: 8 devices x 64 tokens x K=2
  ids = np.random.default_rng(0).permutation(np.repeat(np.arange(16), counts))
  case = Case(devices=8, tokens=64, k=2)
  ids = jnp.asarray(ids.reshape(case.devices * case.tokens, case.k), jnp.int32)
  before, after = ccf.plan_loads(_plan_step(case, ids, tile=32))
  assert _imbalance(before) == 5.5
  assert _within_bound(after)  # at most 160 rows; the tile-bound greedy stopped at 272
  tight = _plan_step(case, ids, tile=1)
  assert list(np.asarray(ccf.plan_loads(tight)[1])) == [128] * 8


@st.composite
def skewed_probabilities(draw, num_experts, experts_local):
  """Routing probabilities `[E]` float64 with hot experts: on several owners, sharing one owner,
  one expert taking (almost) everything, or a sparse Dirichlet spread over many experts."""
  kinds = ["owners", "one_expert", "sparse"] + (["shared_owner"] if experts_local > 1 else [])
  kind = draw(st.sampled_from(kinds))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if kind == "sparse":
    return rng.dirichlet(np.full(num_experts, 0.1))
  num_devices = num_experts // experts_local
  if kind == "one_expert":
    hot = [draw(st.integers(0, num_experts - 1))]
  elif kind == "shared_owner":
    device = draw(st.integers(0, num_devices - 1))
    hot = [device * experts_local + i for i in rng.choice(experts_local, 2, replace=False)]
  else:
    devices = draw(st.lists(st.integers(0, num_devices - 1), min_size=2,
                            max_size=min(3, num_devices), unique=True))
    hot = [d * experts_local + int(rng.integers(experts_local)) for d in devices]
  mass = draw(st.floats(0.5, 1.0))
  p = (1.0 - mass) * rng.dirichlet(np.ones(num_experts))
  p[hot] += mass * rng.dirichlet(np.ones(len(hot)))
  return p


# (hosts, devices per host, experts per device): E from 2 to 256, one and two hosts.
LAYOUTS = [(1, 8, 2), (1, 8, 1), (1, 8, 32), (1, 4, 2), (1, 2, 1), (2, 4, 2)]


@functools.cache
def _planner(num_hosts, per_host, max_helpers):
  split = Split(num_hosts, per_host, False, ())
  return jax.jit(lambda counts, threshold, tile: _plan(
      counts[None], split, max_helpers=max_helpers, threshold=threshold, tile=tile, previous=None))


def _check_plan(plan, counts, per_host, max_helpers, threshold, tile):
  """The plan's invariants (what fused_moe and the work lists rely on) and its load bound."""
  workers, bounds = np.asarray(plan.workers), np.asarray(plan.bounds)
  num_devices = plan.loads_before.shape[0]
  owner = np.arange(counts.size) // (counts.size // num_devices)
  sizes = np.diff(bounds, axis=1)
  assert np.all(bounds[:, 0] == 0) and np.all(sizes >= 0)
  np.testing.assert_array_equal(bounds[:, -1], counts)
  np.testing.assert_array_equal(workers[:, 0], owner)
  used = workers[:, 1:] >= 0
  assert np.all(used[:, :-1] >= used[:, 1:])  # helpers fill the slots in order
  assert np.all(sizes[:, 1:][used] > 0) and np.all(sizes[:, 1:][~used] == 0)
  assert used.sum(1).max(initial=0) <= max_helpers
  for e in range(counts.size):
    helpers = workers[e, 1:][used[e]]
    assert len(set(helpers) | {owner[e]}) == len(helpers) + 1  # distinct, never the owner
    assert np.all(helpers // per_host == owner[e] // per_host)  # on the owner's host
  assert np.all((sizes % tile != 0).sum(1) <= 1)  # splitting adds no partial tile
  before = np.bincount(owner, counts, num_devices)
  after = np.zeros(num_devices)
  np.add.at(after, np.where(workers >= 0, workers, owner[:, None]), sizes)
  np.testing.assert_array_equal(plan.loads_before, before)
  np.testing.assert_array_equal(plan.loads_after, after)
  for host in range(num_devices // per_host):
    devices = slice(host * per_host, (host + 1) * per_host)
    mean = before[devices].mean()
    # Nothing moves from a device within threshold of its host's mean.
    quiet = np.flatnonzero(before <= threshold * mean)
    quiet = quiet[(quiet >= devices.start) & (quiet < devices.stop)]
    experts = np.isin(owner, quiet)
    np.testing.assert_array_equal(sizes[experts, 0], counts[experts])
    if max_helpers == per_host - 1:
      assert _within_bound(after[devices], threshold, tile), (host, after)


@pytest.mark.slow
@settings(derandomize=True, max_examples=300, deadline=None)
@given(data=st.data())
def test_any_routing_ends_within_the_bound(data):
  """Any skew, E from 2 to 256, 1 to a million rows, one or two hosts: every plan is valid and,
  with every helper allowed, the busiest device ends within max(threshold * mean, mean + tile)."""
  num_hosts, per_host, experts_local = data.draw(st.sampled_from(LAYOUTS))
  num_experts = num_hosts * per_host * experts_local
  p = data.draw(skewed_probabilities(num_experts, experts_local))
  rows = data.draw(st.one_of(st.integers(1, 100), st.integers(1000, 1 << 20)))
  counts = np.random.default_rng(rows).multinomial(rows, p).astype(np.int32)
  threshold = data.draw(st.sampled_from([1.0, 1.1, 1.5]))
  tile = data.draw(st.sampled_from([1, 8, 32]))
  full = _planner(num_hosts, per_host, per_host - 1)(counts, threshold, tile)
  _check_plan(full, counts, per_host, per_host - 1, threshold, tile)
  if per_host > 2:
    # Fewer helpers: an expert keeps its largest slices; while none needed more, nothing changes.
    fewer = per_host // 2
    limited = _planner(num_hosts, per_host, fewer)(counts, threshold, tile)
    _check_plan(limited, counts, per_host, fewer, threshold, tile)
    if (np.asarray(full.workers)[:, 1:] >= 0).sum(1).max() <= fewer:
      np.testing.assert_array_equal(limited.loads_after, full.loads_after)


@pytest.mark.parametrize("counts", [[1] + [0] * 15, [5, 0, 3, 0, 0, 2, 0, 9, 1, 0, 0, 0, 4, 0, 0, 7]],
                         ids=["one-row", "total-not-split"])
def test_plans_at_the_edges_keep_every_invariant(counts):
  """What the random (slow) tests reach by chance, every run: one row in all, and a total the
  devices do not split, where the per-device target must round up (rounded down, the owner of
  the one row became its own helper)."""
  counts = np.asarray(counts, np.int32)
  for threshold, tile in [(1.0, 1), (1.1, 8)]:
    _check_plan(_planner(1, 8, 7)(counts, threshold, tile), counts, 8, 7, threshold, tile)


def test_the_threshold_and_a_kept_plans_bound_are_exact():
  """A device at exactly threshold x mean keeps its rows; a kept plan is kept while its busiest
  device is within the bound, ceil(mean) + tile - 1, and no further."""
  split = Split(1, 2, False, ())
  plan = functools.partial(_plan, split=split, max_helpers=1, tile=1)
  at_threshold = plan(jnp.int32([[6, 2]]), threshold=1.5, previous=None)
  np.testing.assert_array_equal(at_threshold.loads_after, [6, 2])
  first = plan(jnp.int32([[10, 0]]), threshold=1.0, previous=None)
  np.testing.assert_array_equal(first.loads_after, [5, 5])
  # Kept, the slices would give [5, 7]: one past the bound of 6 + 1 - 1, so a fresh plan.
  second = plan(jnp.int32([[10, 2]]), threshold=1.0, previous=first)
  np.testing.assert_array_equal(second.loads_after, [6, 6])


def test_a_plan_is_not_kept_once_it_does_worse_than_a_new_one():
  """The hot expert cooled until every device held the mean: the kept slices still moved its
  rows to helpers, leaving the busiest device above the mean where a new plan moves nothing."""
  plan = functools.partial(_plan, split=Split(1, 4, False, ()), max_helpers=3, threshold=1.1,
                           tile=1)
  first = plan(jnp.int32([[40, 2, 6, 6, 6, 6, 6, 8]]), previous=None)
  assert np.any(np.asarray(first.workers)[:, 1:] >= 0)
  cooled = plan(jnp.int32([[1, 19, 10, 10, 10, 10, 10, 10]]), previous=first)
  np.testing.assert_array_equal(cooled.loads_before, [20, 20, 20, 20])
  np.testing.assert_array_equal(cooled.loads_after, [20, 20, 20, 20])
  assert np.all(np.asarray(cooled.workers)[:, 1:] < 0)  # no helpers left computing 0 rows
  # Per host: host 0 cooled while host 1 is still hot; host 0's part goes, host 1's is kept.
  hot, even = [40, 2, 6, 6, 6, 6, 6, 8], [1, 19, 10, 10, 10, 10, 10, 10]
  two_hosts = functools.partial(_plan, split=Split(2, 4, False, ()), max_helpers=3,
                                threshold=1.1, tile=1)
  first = two_hosts(jnp.int32([hot + hot]), previous=None)
  cooled = two_hosts(jnp.int32([even + hot]), previous=first)
  np.testing.assert_array_equal(cooled.loads_after[:4], [20, 20, 20, 20])
  assert np.all(np.asarray(cooled.workers)[:8, 1:] < 0)
  np.testing.assert_array_equal(cooled.workers[8:], first.workers[8:])


def test_a_plan_kept_over_drifting_routing_cuts_at_its_first_shares():
  """Kept over several steps whose counts drift, a plan cuts each step's rows at the shares it
  was made with (scaled and rounded), not at shares recomputed from the last step's cuts, which
  drift a row at a time."""
  plan = functools.partial(jax.jit(_plan, static_argnames=("split", "max_helpers", "tile")),
                           split=Split(1, 4, False, ()), max_helpers=3, threshold=1.1, tile=8)
  steps = [[189, 204, 302, 380, 13, 57, 329, 379], [187, 203, 305, 379, 11, 59, 327, 378],
           [190, 204, 299, 377, 16, 59, 331, 379]]
  first = plan(jnp.int32([steps[0]]), previous=None)
  assert np.any(np.asarray(first.workers)[:, 1:] >= 0)
  kept = first
  for counts in steps[1:]:
    kept = plan(jnp.int32([counts]), previous=kept)
    np.testing.assert_array_equal(kept.workers, first.workers)  # kept, not made afresh
    counts = np.asarray(counts, np.int32)[:, None]
    cuts = np.round(np.cumsum(np.asarray(first.shares), 1, dtype=np.float32) * counts)
    np.testing.assert_array_equal(np.asarray(kept.bounds)[:, 1:], np.minimum(cuts, counts))


def test_a_kept_plan_gives_every_row_to_a_slot_in_use():
  """A kept plan's rows end in its slots in use, and its loads_after are the rows each device
  computes: an expert that had no rows when the plan was made (shares all 0) gives its new rows
  to its owner, and float32 shares that add up to just under 1 (here for 4M rows) leave no row
  past the last helper (both once fell to unused slots: the owner's count, a helper's rows)."""
  plan = functools.partial(jax.jit(_plan, static_argnames=("split", "max_helpers", "tile")),
                           split=Split(1, 4, False, ()), max_helpers=3, threshold=1.1)
  for tile, first_counts, counts in [
      (4, [48, 10, 12, 12, 14, 0, 16, 16], [46, 12, 13, 14, 14, 2, 18, 9]),
      (32, [4076042, 459555, 2250059, 458068], [4076043, 459555, 2250059, 458068])]:
    first = plan(jnp.int32([first_counts]), tile=tile, previous=None)
    kept = plan(jnp.int32([counts]), tile=tile, previous=first)
    np.testing.assert_array_equal(kept.workers, first.workers)  # kept, not made afresh
    workers, sizes = np.asarray(kept.workers), np.diff(np.asarray(kept.bounds), axis=1)
    np.testing.assert_array_equal(sizes.sum(1), counts)
    assert np.all(sizes[workers < 0] == 0), (workers, sizes)
    computed = np.zeros(4, np.int64)
    np.add.at(computed, workers[workers >= 0], sizes[workers >= 0])
    np.testing.assert_array_equal(kept.loads_after, computed)


def test_host_shares_cut_at_the_nearest_tile():
  """110 rows of host 0's expert over two hosts: the level is 55, whose nearest tile of 8 is 56
  (not 48 below it)."""
  shares = jax.jit(_host_shares, static_argnums=(2, 3))(jnp.int32([110, 0, 0, 0]),
                                                        jnp.int32([0]), 2, 8)
  np.testing.assert_array_equal(shares, [[0, 56, 110]])


# fused_moe shapes and tiles: tiny T, E=256 with K=8, and T large enough for whole tiles.
FUSED_CASES = [(Case(devices=8, tokens=1, k=2), 1),
               (Case(devices=8, tokens=48, k=2), 32),
               (Case(devices=8, tokens=4, hidden=8, ffn=8, experts_local=32, k=8), 8),
               (Case(devices=8, tokens=160, k=2), 32)]


@pytest.mark.parametrize("case,tile", FUSED_CASES, ids=["T1", "T48", "E256-K8", "T160"])
@settings(derandomize=True, max_examples=3, deadline=None)
@given(data=st.data())
def test_any_plan_keeps_outputs_and_gradients(case, tile, data):
  """fused_moe with a plan for skewed routing equals fused_moe without one: outputs and the
  gradients of x, expert_weights, w_in and w_out, on fresh random inputs."""
  case = dataclasses.replace(case, seed=data.draw(st.integers(0, 2**32 - 1)))
  p = data.draw(skewed_probabilities(case.num_experts, case.experts_local))
  x, _, weights, w_in, w_out = make_inputs(case)
  rng = np.random.default_rng(case.seed)
  ids = jnp.asarray(rng.choice(case.num_experts, (x.shape[0], case.k), p=p), jnp.int32)
  proj = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  plan = _same_with_and_without_plan(case, tile, (x, ids, weights, w_in, w_out), proj)
  assert _within_bound(plan.loads_after, tile=tile)


def test_previous_plan_is_kept_per_host():
  """Across hosts a previous plan is judged by each host's own mean: a hot host keeps it."""
  counts = jnp.asarray([400, 10, 300, 10, 20, 20, 20, 20] + [5] * 8, jnp.int32)
  plan = functools.partial(jax.jit(_plan, static_argnames=("split", "max_helpers", "tile")),
                           counts[None], split=Split(2, 4, False, ()), max_helpers=3, threshold=1.1)
  fine = plan(tile=1, previous=None)
  coarse = plan(tile=32, previous=None)
  assert not np.array_equal(np.asarray(fine.bounds), np.asarray(coarse.bounds))
  # The tile-1 slices are within the tile-32 bound of each host: kept, though host 0 holds
  # 800 of the 840 rows, far over the mean of all 8 devices.
  kept = plan(tile=32, previous=fine)
  np.testing.assert_array_equal(kept.workers, fine.workers)
  np.testing.assert_array_equal(kept.bounds, fine.bounds)  # the same counts: the same slices


def test_a_kept_plan_does_not_drift():
  """Kept step after step for the same routing, a plan stays itself, whole tiles whole (its
  slices were once rebuilt from float32 shares with a floor: a row a helper a step moved to the
  owner, here expert 4's slices 65 64 64 56 -> 68 63 63 55 -> 71 62 62 54, then a fresh plan).
  For routing that comes and goes (counts A, B, A) the cuts scale and round from the first
  plan's fractions, so they come back exactly, and every slice is within a row of them."""
  plan = functools.partial(jax.jit(_plan, static_argnames=("split", "max_helpers", "tile")),
                           split=Split(1, 4, False, ()), max_helpers=3, threshold=1.1, tile=8)
  counts = jnp.asarray([3, 2, 1, 2, 249, 1, 1, 5], jnp.int32)
  first = plan(counts[None], previous=None)
  assert (np.diff(np.asarray(first.bounds[4])) % 8 != 0).sum() == 1
  kept = first
  for _ in range(4):
    kept = plan(counts[None], previous=kept)
    for field in ("workers", "bounds", "shares", "loads_after"):
      np.testing.assert_array_equal(getattr(kept, field), getattr(first, field))
  rng = np.random.default_rng(0)
  kept_both = 0
  for _ in range(20):
    a = jnp.asarray(rng.integers(0, 400, 8), jnp.int32)
    b = (a + jnp.asarray(rng.integers(0, 3, 8), jnp.int32)).astype(jnp.int32)
    start = plan(a[None], previous=None)
    middle = plan(b[None], previous=start)
    back = plan(a[None], previous=middle)
    if bool(np.array_equal(np.asarray(middle.workers), np.asarray(start.workers))) and bool(
        np.array_equal(np.asarray(back.workers), np.asarray(start.workers))):
      kept_both += 1
      np.testing.assert_array_equal(back.bounds, start.bounds)
      cut = np.cumsum(np.asarray(start.shares), 1) * np.asarray(b)[:, None]
      assert np.abs(np.asarray(middle.bounds)[:, 1:] - cut).max() <= 0.5 + 1e-3
      np.testing.assert_array_equal(np.asarray(middle.bounds)[:, -1], b)
  assert kept_both >= 10, kept_both


# Across hosts with replicas: (hosts, devices per host, experts per device).
HOST_LAYOUTS = [(2, 2, 2), (2, 4, 1), (4, 2, 2), (3, 2, 4), (2, 8, 32)]


@functools.cache
def _replicating_planner(num_hosts, per_host, replicas):
  split = Split(num_hosts, per_host, False, ())
  return jax.jit(lambda source, threshold, tile: _plan(
      source, split, max_helpers=per_host - 1, threshold=threshold, tile=tile, previous=None,
      replicas=replicas))


def _check_replication(plan, source, num_hosts, per_host, replicas, threshold, tile):
  """A replicating plan's invariants (what fused_moe relies on) and its balance of hosts."""
  counts = source.sum(0)
  num_devices = num_hosts * per_host
  experts_local = counts.size // num_devices
  rep = plan.replication
  experts, shares = np.asarray(rep.experts), np.asarray(rep.shares)
  host_rows = lambda loads: np.asarray(loads).reshape(num_hosts, -1).sum(1)
  before = host_rows(plan.loads_before)
  hot = before > threshold * before.mean()
  owners = np.arange(num_devices).reshape(num_hosts, per_host, 1)
  used = experts >= 0
  # Exports: a hot host's devices, their own experts, each at most once, with rows.
  assert np.all(used.any(2) <= hot[:, None]), (experts, before)
  assert np.all(np.where(used, experts // experts_local == owners, True))
  for o, c in np.ndindex(num_hosts, per_host):
    mine = experts[o, c][used[o, c]]
    assert len(set(mine)) == len(mine) and np.all(counts[mine] > 0)
  # Shares: from 0 to the expert's rows, in host order, each boundary at a tile or the end.
  rows = np.where(used, counts[np.maximum(experts, 0)], 0)
  assert np.all(shares[..., 0] == 0) and np.all(shares[..., -1] == rows)
  on_host = np.diff(shares, axis=-1)
  inner = shares[..., 1:-1]
  assert np.all(on_host >= 0) and np.all((inner % tile == 0) | (inner == rows[..., None]))
  # Offsets: where each source's rows of the exported expert start.
  per_source = np.where(used, source[:, np.maximum(experts, 0)], 0)
  np.testing.assert_array_equal(rep.offsets, np.cumsum(per_source, 0) - per_source)
  # The owner's host computes its share; each other host its own, in its guest slot.
  own = counts.copy()
  flat = experts.reshape(-1)
  own[flat[flat >= 0]] = on_host.reshape(-1, num_hosts)[flat >= 0, flat[flat >= 0] // (
      experts_local * per_host)]
  np.testing.assert_array_equal(np.asarray(plan.bounds)[:, -1], own)
  guest_rows = np.asarray(rep.bounds)[..., -1]  # [N, P, (N - 1) R]
  for b, c, q in np.ndindex(*guest_rows.shape):
    o = (b + 1 + q // replicas) % num_hosts
    assert guest_rows[b, c, q] == on_host[o, c, q % replicas, b]
  after = host_rows(plan.loads_after)
  assert after.sum() == before.sum() == counts.sum()
  np.testing.assert_array_equal(after, own.reshape(num_hosts, -1).sum(1) + guest_rows.sum((1, 2)))
  if replicas == experts_local:
    # Every expert of a hot host can move: the busiest host ends at the hosts' mean or its
    # own load (when not hot), up to a tile at each end of its share and a row of rounding.
    mean = before.mean()
    assert after.max() <= max(threshold * mean, mean) + tile + 1, (before, after)
  # Within each host, its own and guest experts are balanced as `reassign` promises.
  for host in np.asarray(plan.loads_after).reshape(num_hosts, -1):
    assert _within_bound(host, threshold, tile), plan.loads_after


@pytest.mark.slow
@settings(derandomize=True, max_examples=150, deadline=None)
@given(data=st.data())
def test_replicated_experts_even_out_hosts(data):
  """Any skew over 2 to 4 hosts: every replicating plan is valid, and with every expert of a
  device allowed to move, the busiest host ends within the hosts' mean (or threshold * mean)
  and a tile."""
  num_hosts, per_host, experts_local = data.draw(st.sampled_from(HOST_LAYOUTS))
  num_devices = num_hosts * per_host
  num_experts = num_devices * experts_local
  p = data.draw(skewed_probabilities(num_experts, experts_local))
  rows = data.draw(st.one_of(st.integers(1, 100), st.integers(1000, 1 << 18)))
  rng = np.random.default_rng(rows)
  source = rng.multinomial(rows, p, size=num_devices).astype(np.int32)
  threshold = data.draw(st.sampled_from([1.0, 1.1, 1.5]))
  tile = data.draw(st.sampled_from([1, 8, 32]))
  replicas = data.draw(st.sampled_from(sorted({1, experts_local})))
  plan = _replicating_planner(num_hosts, per_host, replicas)(source, threshold, tile)
  _check_replication(plan, source, num_hosts, per_host, replicas, threshold, tile)


def test_hosts_within_threshold_export_nothing():
  source = np.full((4, 8), 5, np.int32)
  plan = _replicating_planner(2, 2, 2)(source, 1.1, 1)
  assert np.all(np.asarray(plan.replication.experts) == -1)
  np.testing.assert_array_equal(plan.loads_after, plan.loads_before)


def test_pairs_are_ranked_within_their_source_and_expert():
  """A pair's place among its source's pairs of its expert, in (token, k) order: where a host's
  share of an exported expert starts and ends."""
  ids = jnp.int32([[3, 1, 3, 3, 1], [0, 3, 2, 0, 3]])
  np.testing.assert_array_equal(jax.jit(jax.vmap(rank_within_expert))(ids),
                                [[0, 0, 1, 2, 1], [0, 0, 0, 1, 1]])


def test_a_hot_host_exports_only_experts_with_rows():
  """Every row on host 0's expert 0: that expert is exported, and none of the experts without
  rows, which would cost a guest slot and its weights for nothing."""
  source = np.zeros((4, 8), np.int32)
  source[:, 0] = 50
  plan = _replicating_planner(2, 2, 2)(source, 1.1, 1)
  np.testing.assert_array_equal(plan.replication.experts,
                                [[[0, -1], [-1, -1]], [[-1, -1], [-1, -1]]])
  _check_replication(plan, source, 2, 2, 2, 1.1, 1)


def test_replicas_are_checked():
  mesh = ep_mesh(4)
  ids = jnp.zeros((16, 2), jnp.int32)

  def plan_counts(**options):
    body = lambda ids: ccf.reassign(ids, 16, axis_name="ep", **options).counts[None]
    # Under jit: an eager shard_map compiles each of the plan's operations on its own.
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(ids)
  with pytest.raises(ValueError, match=r"replicas must be in \[0, 4\]"):
    plan_counts(replicas=5)
  for option in ("replicas", "max_helpers", "tile"):  # 1.0 hashes as 1: traces would mix them
    with pytest.raises(ValueError, match=rf"{option} must be an int, got 1.0"):
      plan_counts(**{option: 1.0})
  # One host: nothing crosses hosts, so the option changes nothing.
  np.testing.assert_array_equal(plan_counts(replicas=2), plan_counts())
  split = Split(2, 2, False, ())
  previous = _plan(jnp.ones((1, 8), jnp.int32), split, max_helpers=1, threshold=1.1, tile=1,
                   previous=None)
  with pytest.raises(ValueError, match="previous and replicas do not combine"):
    _plan(jnp.ones((4, 8), jnp.int32), split, max_helpers=1, threshold=1.1, tile=1,
          previous=previous, replicas=1)


def test_a_plan_for_other_hosts_is_rejected():
  """A plan that replicates over 2 hosts of 2 devices, given to a call on one host of 4."""
  source = np.zeros((4, 8), np.int32)
  source[:, 0] = 50
  plan = _replicating_planner(2, 2, 1)(source, 1.1, 1)
  x, ids, weights, w_in, w_out = make_inputs(Case(devices=4, tokens=4))
  layer = lambda *args, **kw: ccf.fused_moe(*args, **kw, plan=plan)
  with pytest.raises(ValueError, match="plan replicates experts over 2 hosts of 2 devices; "
                                       "this call spans 1 of 4"):
    sharded(layer, 4)(x, ids, weights, w_in, w_out)
