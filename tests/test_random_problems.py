"""fused_moe against reference_moe on random problems: sizes, dtypes, activations, skewed and
degenerate routing, with and without a plan."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ccfuser as ccf
from hardening_cases import assert_matches_reference, forward_and_grads
from moe_cases import Case, make_inputs


_ROUTINGS = ("sampled", "repeated", "one_device")


@st.composite
def _problems(draw):
  """A `Case`, a routing rewrite, the combine weights' dtype and whether to use a plan."""
  size = st.integers(1, 8)
  case = Case(devices=draw(st.sampled_from([1, 2, 4, 8])), tokens=draw(size), hidden=draw(size),
              ffn=draw(size), experts_local=draw(size), k=draw(size),
              dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
              activation=draw(st.sampled_from(["swiglu", "geglu", "gelu", "relu", "silu"])),
              skew=draw(st.sampled_from([0.0, 0.5, 1.0])), seed=draw(st.integers(0, 2**16)))
  routing, float32_weights, with_plan = (draw(st.sampled_from(_ROUTINGS)), draw(st.booleans()),
                                         draw(st.booleans()))
  return case, routing, float32_weights, with_plan and case.devices > 1


def _route(ids, routing: str, case: Case):
  """`ids` rewritten: "repeated" gives every row K copies of one id (each counts), "one_device"
  sends every row to the last device's experts; "sampled" keeps the (possibly skewed) draw."""
  if routing == "repeated":
    return jnp.broadcast_to(ids[:, :1], ids.shape)
  if routing == "one_device":
    return (case.devices - 1) * case.experts_local + ids % case.experts_local
  return ids


@pytest.mark.slow
@hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(_problems())
# Corners a dozen random draws may miss: 8 devices, K=8 and a plan moving a hot expert's rows;
# bfloat16 with bfloat16 combine weights; every row to one device.
@hypothesis.example((Case(devices=8, tokens=8, hidden=8, ffn=8, experts_local=2, k=8, skew=1.0,
                          seed=1), "sampled", True, True))
@hypothesis.example((Case(devices=4, tokens=8, hidden=6, ffn=5, experts_local=8, k=3,
                          dtype=jnp.bfloat16, activation="geglu", skew=0.5, seed=2), "repeated",
                     False, True))
@hypothesis.example((Case(devices=2, tokens=3, hidden=8, ffn=2, experts_local=1, k=8,
                          activation="relu", seed=3), "one_device", True, True))
def test_random_problems_match_reference(problem):
  case, routing, float32_weights, with_plan = problem
  x, ids, weights, w_in, w_out = make_inputs(case)
  ids = _route(ids, routing, case)
  if not float32_weights:
    weights = weights.astype(case.dtype)
  dy = jnp.asarray(np.random.default_rng(case.seed).standard_normal(x.shape), case.dtype)
  args = (x, ids, weights, w_in, w_out, dy)
  out = forward_and_grads(ccf.fused_moe, case.devices, case.activation, with_plan)(*args)
  assert out[1][1].dtype == weights.dtype
  assert_matches_reference(out, args, case.devices, case.activation, case.dtype)
