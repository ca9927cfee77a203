"""all_to_all_moe (the baseline) against reference_moe: dropless, unsharded, capacity dropping."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ccfuser import all_to_all_moe, reference_moe
from moe_cases import Case, assert_close, make_inputs, sharded

_GRAD_ARGNUMS = (0, 2, 3, 4)
_GRAD_NAMES = ("x", "expert_weights", "w_in", "w_out")


def _value_and_grads(moe_fn, probe):
  """Jitted `(y, grads)` of the random projection loss `sum(moe_fn(...) * probe)`.

  Returns:
    A function of the global `make_inputs` arrays giving `(y, (dx, dweights, dw_in, dw_out))`.
  """
  def loss(*args):
    y = moe_fn(*args)
    return jnp.sum(y.astype(jnp.float32) * probe), y
  grad_fn = jax.grad(loss, argnums=_GRAD_ARGNUMS, has_aux=True)

  @jax.jit
  def value_and_grads(*args):
    grads, y = grad_fn(*args)
    return y, grads
  return value_and_grads


def _probe(case: Case):
  rng = np.random.default_rng(case.seed + 1000)
  return jnp.asarray(rng.standard_normal((case.devices * case.tokens, case.hidden)), jnp.float32)


def _to_float32(inputs):
  return tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
               for a in inputs)


def _check_against_reference(case: Case, inputs, moe_fn, *, reference_weights=None):
  """Asserts `moe_fn`'s output and gradients equal reference_moe's (in float32 on the same values).

  `reference_weights` replaces expert_weights in the reference (dropped pairs zeroed); the
  expert_weights gradient of such pairs must then be exactly zero.
  """
  probe = _probe(case)
  y, grads = _value_and_grads(moe_fn, probe)(*inputs)
  ref_inputs = list(_to_float32(inputs))
  if reference_weights is not None:
    ref_inputs[2] = reference_weights
  reference = functools.partial(reference_moe, activation=case.activation)
  y_ref, grads_ref = _value_and_grads(reference, probe)(*ref_inputs)
  assert y.dtype == case.dtype and y.shape == inputs[0].shape
  assert_close(y, y_ref, case.dtype)
  for name, argnum, g, g_ref in zip(_GRAD_NAMES, _GRAD_ARGNUMS, grads, grads_ref):
    assert g.dtype == inputs[argnum].dtype, name
    if name == "expert_weights" and reference_weights is not None:
      kept = np.asarray(reference_weights) != 0
      assert np.all(np.asarray(g)[~kept] == 0), "a dropped pair received a gradient"
      g, g_ref = np.where(kept, g, 0), np.where(kept, g_ref, 0)
    # bfloat16 weight gradients accumulate every routed row's rounding error: twice the slack.
    assert_close(g, g_ref, case.dtype, scale=2.0 if case.dtype == jnp.bfloat16 else 1.0)


def _route_all_to(inputs, expert: int):
  x, ids, *rest = inputs
  return (x, jnp.full_like(ids, expert), *rest)


# Covers devices 1/2/4/8, K 1/2/4/8, skews 0/0.9, each activation, float32 and bfloat16;
# `one_expert` sends every (token, k) pair of every device to that expert.
DROPLESS = [
    (Case(devices=1, tokens=13, k=1, experts_local=3), None),
    (Case(devices=2, tokens=5, k=2, skew=0.9, activation="gelu", seed=1), None),
    (Case(devices=4, tokens=13, k=4, seed=2), None),
    (Case(devices=8, tokens=3, k=8, experts_local=1, skew=0.9, seed=3), None),
    (Case(devices=8, tokens=11, k=2, activation="relu", seed=4), None),
    (Case(devices=2, tokens=7, k=4, experts_local=3, activation="silu", seed=5), None),
    (Case(devices=4, tokens=9, k=2, activation="geglu", skew=0.9, seed=6), None),
    (Case(devices=4, tokens=13, k=2, dtype=jnp.bfloat16, seed=7), None),
    (Case(devices=8, tokens=6, k=4, dtype=jnp.bfloat16, skew=0.9, seed=8), None),
    (Case(devices=4, tokens=10, k=2, seed=9), 5),
    (Case(devices=8, tokens=5, k=4, seed=10), 0),
    (Case(devices=1, tokens=6, k=8, experts_local=4, seed=11), 2),
]


@pytest.mark.parametrize("case,one_expert", DROPLESS,
                         ids=[f"{c.devices}dev-k{c.k}-{c.activation}-{jnp.dtype(c.dtype).name}"
                              f"-skew{c.skew if e is None else 'one'}" for c, e in DROPLESS])
def test_dropless_matches_reference(case, one_expert):
  inputs = make_inputs(case)
  if one_expert is not None:
    inputs = _route_all_to(inputs, one_expert)
  _check_against_reference(
      case, inputs, sharded(all_to_all_moe, case.devices, activation=case.activation))


def test_unsharded_matches_reference():
  case = Case(devices=1, tokens=11, experts_local=6, k=3, activation="geglu", seed=12)
  moe = functools.partial(all_to_all_moe, activation="geglu")
  _check_against_reference(case, make_inputs(case), moe)


def test_deterministic():
  case = Case(devices=4, tokens=9, k=4, skew=0.9, seed=13)
  inputs = make_inputs(case)
  fn = _value_and_grads(sharded(all_to_all_moe, case.devices), _probe(case))
  first, second = fn(*inputs), fn(*inputs)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


def kept_pairs(expert_ids, *, devices: int, capacity: int):
  """Which (token, k) pairs survive capacity `C`, simulated pair by pair (the documented rule).

  Args:
    expert_ids: `[D * T, K]` int, global (device d holds the d-th block of rows).
    devices: D.
    capacity: C.

  Returns:
    `[D * T, K]` bool.
  """
  expert_ids = np.asarray(expert_ids)
  keep = np.zeros(expert_ids.shape, bool)
  for block in np.split(np.arange(expert_ids.shape[0]), devices):
    used = {}
    for k in range(expert_ids.shape[1]):  # first choices of all tokens before second choices
      for t in block:
        e = expert_ids[t, k]
        keep[t, k] = used.get(e, 0) < capacity
        used[e] = used.get(e, 0) + 1
  return keep


def test_capacity_drops_exactly_the_documented_pairs():
  # D=2, E=4, T=6, K=2 and capacity factor 1: C = ceil(1 * 6 * 2 / 4) = 3 rows per
  # (source device, expert).
  case = Case(devices=2, tokens=6, experts_local=2, k=2, seed=14)
  ids = np.array([
      # device 0: expert 1 gets k=0 from tokens 0-3, then k=1 from tokens 2 and 4
      [1, 0], [1, 2], [1, 1], [1, 3], [3, 1], [0, 2],
      # device 1: expert 0 (remote) gets k=0 from tokens 0, 1, 4, then k=1 from 0, 2, 3
      [0, 0], [0, 3], [3, 0], [2, 0], [0, 1], [1, 2]], np.int32)
  dropped = [(3, 0), (2, 1), (4, 1), (6 + 0, 1), (6 + 2, 1), (6 + 3, 1)]
  keep = np.ones(ids.shape, bool)
  for t, k in dropped:
    keep[t, k] = False
  np.testing.assert_array_equal(kept_pairs(ids, devices=2, capacity=3), keep)

  x, _, weights, w_in, w_out = make_inputs(case)
  inputs = (x, jnp.asarray(ids), weights, w_in, w_out)
  moe = sharded(all_to_all_moe, case.devices, capacity_factor=1.0)
  _check_against_reference(case, inputs, moe, reference_weights=jnp.where(keep, weights, 0))
  # Rows without a dropped pair are exactly the dropless result; the others are not.
  y_capped = moe(*inputs)
  y_dropless = sharded(all_to_all_moe, case.devices)(*inputs)
  touched = ~keep.all(axis=1)
  assert_close(y_capped[~touched], y_dropless[~touched], jnp.float32)
  assert np.all(np.abs(np.asarray(y_capped - y_dropless))[touched].max(axis=1) > 1e-3)


@pytest.mark.parametrize("case,capacity_factor", [
    (Case(devices=4, tokens=13, k=2, skew=0.9, seed=15), 1.25),
    (Case(devices=8, tokens=10, k=4, experts_local=1, skew=0.5, seed=16), 1.0),
    (Case(devices=2, tokens=12, k=2, experts_local=3, activation="relu", seed=17), 0.5),
])
def test_capacity_matches_reference_with_dropped_pairs_zeroed(case, capacity_factor):
  x, ids, weights, w_in, w_out = make_inputs(case)
  capacity = int(np.ceil(capacity_factor * case.tokens * case.k / case.num_experts))
  keep = kept_pairs(ids, devices=case.devices, capacity=capacity)
  assert 0 < keep.sum() < keep.size, "the routing should drop some pairs and keep others"
  y = sharded(all_to_all_moe, case.devices, activation=case.activation,
              capacity_factor=capacity_factor)(x, ids, weights, w_in, w_out)
  y_ref = reference_moe(x, ids, jnp.where(keep, weights, 0), w_in, w_out,
                        activation=case.activation)
  assert_close(y, y_ref, jnp.float32)


def test_capacity_beyond_worst_case_is_dropless():
  case = Case(devices=1, tokens=7, experts_local=4, k=4, seed=18)
  inputs = _route_all_to(make_inputs(case), 3)  # the worst case: T * K rows for one expert
  y_ref = reference_moe(*inputs)
  for capacity_factor in (float(case.num_experts), float("inf")):
    y = jax.jit(functools.partial(all_to_all_moe, capacity_factor=capacity_factor))(*inputs)
    assert_close(y, y_ref, jnp.float32)


def test_out_of_range_ids_contribute_zero():
  case = Case(devices=2, tokens=5, k=2, seed=19)
  x, ids, weights, w_in, w_out = make_inputs(case)
  bad = np.zeros(ids.shape, bool)
  bad[1, 0] = bad[7, 1] = bad[8, 0] = True
  bad_ids = jnp.where(bad, jnp.array([[-1, case.num_experts]] * ids.shape[0]), ids)
  y = sharded(all_to_all_moe, case.devices)(x, bad_ids, weights, w_in, w_out)
  assert_close(y, reference_moe(x, ids, jnp.where(bad, 0, weights), w_in, w_out), jnp.float32)
  # Zero whatever their weight: not the weight times a zero row (inf or NaN times 0 is NaN).
  for weight in (jnp.inf, jnp.nan):
    y_weighted = sharded(all_to_all_moe, case.devices)(x, bad_ids, jnp.where(bad, weight, weights),
                                                       w_in, w_out)
    np.testing.assert_array_equal(y_weighted, y)


def test_capacity_dropped_pairs_contribute_zero_whatever_their_weight():
  case = Case(devices=1, tokens=6, experts_local=4, k=1, seed=20)
  x, _, weights, w_in, w_out = make_inputs(case)
  ids = jnp.zeros((6, 1), jnp.int32)  # C = ceil(0.5 * 6 / 4) = 1: tokens 1-5 are dropped
  moe = jax.jit(functools.partial(all_to_all_moe, capacity_factor=0.5))
  y = moe(x, ids, weights, w_in, w_out)
  assert np.all(np.asarray(y)[1:] == 0) and np.all(np.asarray(y)[0] != 0)
  np.testing.assert_array_equal(moe(x, ids, weights.at[3, 0].set(jnp.nan), w_in, w_out), y)


def test_under_x64_the_same_results_without_warnings():
  """With jax_enable_x64 the pair ranks' sums are int64; what is written into int32 arrays is
  cast, not left to a scatter's implicit cast (a FutureWarning, an error to come)."""
  case = Case(devices=2, tokens=6, k=2, seed=21)
  inputs = make_inputs(case)
  moe = functools.partial(all_to_all_moe, capacity_factor=1.0)
  y = sharded(moe, case.devices)(*inputs)
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(sharded(moe, case.devices)(*inputs), y)

