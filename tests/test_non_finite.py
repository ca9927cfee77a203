"""Non-finite values stay with the token that carries them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ccfuser as ccf
from hardening_cases import NON_FINITE, assert_non_finite_stays_in_its_rows, forward_and_grads
from moe_cases import Case, make_inputs, shard_ep


@pytest.mark.parametrize("where,value", NON_FINITE)
def test_non_finite_token_stays_in_its_rows(where, value):
  assert_non_finite_stays_in_its_rows(forward_and_grads(ccf.fused_moe, 4),
                                      Case(devices=4, tokens=16, k=2, skew=0.5, seed=51),
                                      where, value)


@pytest.mark.parametrize("residuals", ["inputs", "hidden"])
def test_debug_nans_finds_none_in_finite_layers(residuals):
  """jax_debug_nans reads every output of every primitive, the h rows the forward keeps for the
  backward among them: rows no tile wrote (the placeholder row where none are kept, those past
  a device's pairs) must hold zeros, not what the memory held before. Eagerly, each call runs
  on memory other calls just freed."""
  case = Case(devices=4, tokens=16, k=2, skew=0.5, seed=52)
  x, ids, weights, w_in, w_out = make_inputs(case)
  eager = shard_ep(functools.partial(ccf.fused_moe, residuals=residuals), case.devices)
  with jax.debug_nans(True):
    for layer in (eager, jax.jit(eager)):  # a jit's outputs: the kept rows under jax.vjp
      loss = lambda *args: jnp.sum(layer(*args) ** 2)
      for _ in range(2):
        grads = jax.grad(loss, (0, 2, 3, 4))(x, ids, weights, w_in, w_out)
        jax.vjp(layer, x, ids, weights, w_in, w_out)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
