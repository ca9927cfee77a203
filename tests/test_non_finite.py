"""Non-finite values stay with the token that carries them."""

import jax
import numpy as np
import pytest

import jax_ccfuser as ccf
from hardening_cases import forward_and_grads, peer_args
from moe_cases import Case


@pytest.mark.parametrize("where,value", [("x", np.nan), ("x", np.inf), ("expert_weights", np.nan)])
def test_non_finite_token_stays_in_its_rows(where, value):
  """A NaN/Inf in token t's input reaches y[t], and may reach dx[t], d_weights[t] and the
  weight gradients of t's experts, but nothing else: every other row and expert is finite and
  bitwise the clean run's."""
  case = Case(devices=4, tokens=16, k=2, skew=0.5, seed=51)
  x, ids, weights, w_in, w_out, dy = peer_args(case)
  token = case.tokens + 5  # device 1's token 5
  if where == "x":
    x_bad, weights_bad = x.at[token, 3].set(value), weights
  else:
    x_bad, weights_bad = x, weights.at[token, 0].set(value)
  step = forward_and_grads(ccf.fused_moe, 4)
  clean = jax.tree.map(np.asarray, step(x, ids, weights, w_in, w_out, dy))
  dirty = jax.tree.map(np.asarray, step(x_bad, ids, weights_bad, w_in, w_out, dy))
  others = np.arange(x.shape[0]) != token
  experts = np.setdiff1d(np.arange(case.num_experts), np.asarray(ids[token]))
  (y, (dx, d_weights, dw_in, dw_out)), (y0, (dx0, d_weights0, dw_in0, dw_out0)) = dirty, clean
  assert not np.all(np.isfinite(y[token]))
  for name, got, want in (("y", y[others], y0[others]), ("dx", dx[others], dx0[others]),
                          ("d_weights", d_weights[others], d_weights0[others]),
                          ("dw_in", dw_in[experts], dw_in0[experts]),
                          ("dw_out", dw_out[experts], dw_out0[experts])):
    assert np.all(np.isfinite(got)), name
    np.testing.assert_array_equal(got, want, err_msg=name)
