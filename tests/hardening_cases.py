"""What the stress tests of fused_moe share: a bound on every peer wait, the forward and
backward step under `shard_map`, its comparison with reference_moe, the 4-device problem the
peer tests perturb, and where a non-finite input may show."""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

import jax_ccfuser as ccf
from moe_cases import Case, assert_close, make_inputs, shard_ep

# A missing or failing peer must surface within this many seconds of wall time (the peer timeout
# of these tests is 1 s; the rest is slack for compiling on busy cores). Only a hang exceeds it.
NO_HANG_S = 30.0
TEST_PEER_TIMEOUT_S = 1.0


def bounded(fn):
  """`fn()`, traced under the tests' peer timeout, run on a daemon thread.

  Returns what `fn` returns and raises what it raises; fails the test if `fn` still runs after
  `NO_HANG_S` seconds, so a hang is a failure, not a stuck test run.
  """
  outcome = {}

  def target():
    try:
      with ccf.peer_timeout(TEST_PEER_TIMEOUT_S):
        outcome["value"] = fn()
    except Exception as e:  # noqa: BLE001 (raised again in the test's thread)
      outcome["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(NO_HANG_S)
  assert not thread.is_alive(), f"still running after {NO_HANG_S} s: a peer wait hangs"
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def error_of(result):
  """The run-time error computing `result` raised, or None."""
  try:
    jax.block_until_ready(result)
  except jax.errors.JaxRuntimeError as e:
    return e
  return None


def make_forward_and_grads(moe_fn, devices: int, activation: str = "swiglu",
                           with_plan: bool = False):
  """A jitted `(x, ids, weights, w_in, w_out, dy) -> (y, (dx, d_weights, dw_in, dw_out))`.

  It traces again where called under another peer timeout (see `ccf.peer_timeout`).
  """
  def moe(x, ids, weights, w_in, w_out, axis_name):
    plan = None
    if with_plan:
      num_experts = w_out.shape[0] * jax.lax.axis_size(axis_name)
      plan = ccf.reassign(ids, num_experts, axis_name=axis_name, tile=4)
    return moe_fn(x, ids, weights, w_in, w_out, axis_name=axis_name, activation=activation,
                  plan=plan)

  layer = shard_ep(moe, devices)

  def run(x, ids, weights, w_in, w_out, dy):
    y, pullback = jax.vjp(lambda x, w, a, b: layer(x, ids, w, a, b), x, weights, w_in, w_out)
    return y, pullback(dy.astype(y.dtype))

  return jax.jit(run)


# One per static configuration, traced under the default peer timeout: jit then keeps one
# executable per shape, so repeated shapes compile once.
forward_and_grads = functools.lru_cache(maxsize=None)(make_forward_and_grads)


def _float32(*arrays):
  """The float arrays cast to float32 (the reference's precision), int32 ids as they are."""
  return [a if a.dtype == jnp.int32 else a.astype(jnp.float32) for a in arrays]


def _assert_grads_close(grads, grads_ref, dtype, names):
  """Each gradient against the reference's, named in the failure message."""
  for name, a, b in zip(names, grads, grads_ref, strict=True):
    try:
      # Gradients sum over many rows: the tolerance grows with the reference's magnitude.
      assert_close(a, b, dtype, max(1.0, float(jnp.max(jnp.abs(b))) / 4))
    except AssertionError as e:
      raise AssertionError(f"{name}: {e}") from None


def assert_loss_and_grads_close(out, out_ref, names):
  """`(loss, grads)` of a float32 step against the reference step's."""
  assert_close(out[0], out_ref[0], jnp.float32, 10.0)
  _assert_grads_close(out[1], out_ref[1], jnp.float32, names)


def assert_matches_reference(fused_out, args, devices, activation, dtype):
  """`fused_out` (y and grads of `forward_and_grads`) against reference_moe in float32."""
  y, grads = fused_out
  y_ref, grads_ref = forward_and_grads(ccf.reference_moe, devices, activation)(*_float32(*args))
  assert y.dtype == args[0].dtype
  assert_close(y, y_ref, dtype)
  _assert_grads_close(grads, grads_ref, dtype, ("dx", "d_weights", "dw_in", "dw_out"))


PEER_CASE = Case(devices=4, tokens=12, seed=21)


def peer_args(case=PEER_CASE):
  """`make_inputs(case)` and a cotangent dy `[D*T, H]` float32."""
  x, ids, weights, w_in, w_out = make_inputs(case)
  dy = jnp.asarray(np.random.default_rng(case.seed).standard_normal(x.shape), jnp.float32)
  return x, ids, weights, w_in, w_out, dy


# The non-finite inputs a token may carry: (operand, value).
NON_FINITE = [("x", np.nan), ("x", np.inf), ("expert_weights", np.nan)]


def assert_non_finite_stays_in_its_rows(step, case: Case, where: str, value: float):
  """A NaN/Inf in token t's `where` reaches y[t], and may reach dx[t], d_weights[t] and the
  weight gradients of t's experts, but nothing else: every other row and expert is finite and
  bitwise the clean run's. `step` maps `peer_args(case)` to `(y, (dx, d_weights, dw_in,
  dw_out))`."""
  x, ids, weights, w_in, w_out, dy = peer_args(case)
  token = case.tokens + 5  # device 1's token 5
  if where == "x":
    x_bad, weights_bad = x.at[token, 3].set(value), weights
  else:
    x_bad, weights_bad = x, weights.at[token, 0].set(value)
  clean = jax.tree.map(np.asarray, step(x, ids, weights, w_in, w_out, dy))
  dirty = jax.tree.map(np.asarray, step(x_bad, ids, weights_bad, w_in, w_out, dy))
  others = np.arange(x.shape[0]) != token
  experts = np.setdiff1d(np.arange(case.num_experts), np.asarray(ids[token]))
  (y, (dx, d_weights, dw_in, dw_out)), (y0, (dx0, d_weights0, dw_in0, dw_out0)) = dirty, clean
  assert not np.all(np.isfinite(np.asarray(y[token], np.float32)))
  for name, got, want in (("y", y[others], y0[others]), ("dx", dx[others], dx0[others]),
                          ("d_weights", d_weights[others], d_weights0[others]),
                          ("dw_in", dw_in[experts], dw_in0[experts]),
                          ("dw_out", dw_out[experts], dw_out0[experts])):
    assert np.all(np.isfinite(np.asarray(got, np.float32))), name
    np.testing.assert_array_equal(got, want, err_msg=name)


def assert_relu_nan_as_reference(step, reference_step, case: Case):
  """jax.nn.relu's gradient selects 0 where h <= 0, so one token's NaN combine weight is NaN
  only in the dw_in units the token switched on, not in every unit of its experts (as a
  multiply by relu'(h) = 0 gives): every output's non-finite entries are the reference's.
  `step` and `reference_step` map `peer_args(case)` to `(y, (dx, d_weights, dw_in, dw_out))`."""
  x, ids, weights, w_in, w_out, dy = peer_args(case)
  token = case.tokens + 5  # device 1's token 5
  args = (x, ids, weights.at[token, 0].set(np.nan), w_in, w_out, dy)
  got, want = (jax.tree.leaves(jax.tree.map(lambda a: np.asarray(a, np.float32), fn(*args)))
               for fn in (step, reference_step))
  for name, a, b in zip(("y", "dx", "d_weights", "dw_in", "dw_out"), got, want, strict=True):
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
  its_experts = np.isin(np.arange(case.num_experts), np.asarray(ids[token]))
  assert 0 < np.sum(~np.isfinite(got[3])) < np.sum(its_experts) * w_in[0].size
