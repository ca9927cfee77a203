"""reference_moe against an independent numpy loop over (token, k) pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from jax_ccfuser import all_to_all_moe, fused_moe, reference_moe
from jax_ccfuser._ffn import expert_ffn
from moe_cases import Case, assert_close, ep_mesh, make_inputs, sharded

_NUMPY_ACTIVATIONS = {
    "swiglu": (lambda v: v / (1 + np.exp(-v)), True),
    "geglu": (lambda v: 0.5 * v * (1 + scipy.special.erf(v / np.sqrt(2))), True),
    "gelu": (lambda v: 0.5 * v * (1 + scipy.special.erf(v / np.sqrt(2))), False),
    "relu": (lambda v: np.maximum(v, 0), False),
    "silu": (lambda v: v / (1 + np.exp(-v)), False),
}


def numpy_moe(x, expert_ids, expert_weights, w_in, w_out, activation):
  """One (token, k) pair at a time in float64; the arrays are global (all experts)."""
  fn, gated = _NUMPY_ACTIVATIONS[activation]
  x, expert_weights, w_in, w_out = (np.asarray(a, np.float64)
                                    for a in (x, expert_weights, w_in, w_out))
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(expert_ids.shape[1]):
      e = int(expert_ids[t, k])
      h = x[t] @ w_in[e]
      if gated:
        gate, up = np.split(h, 2)
        a = fn(gate) * up
      else:
        a = fn(h)
      y[t] += expert_weights[t, k] * (a @ w_out[e])
  return y


@pytest.mark.parametrize("activation", sorted(_NUMPY_ACTIVATIONS))
def test_matches_numpy_loop(activation):
  case = Case(devices=1, tokens=11, experts_local=6, k=3, activation=activation, seed=3)
  x, ids, weights, w_in, w_out = make_inputs(case)
  y = jax.jit(reference_moe, static_argnames="activation")(x, ids, weights, w_in, w_out,
                                                           activation=activation)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  assert_close(y, numpy_moe(x, np.asarray(ids), weights, w_in, w_out, activation), jnp.float32)


def test_repeated_id_counts_twice():
  case = Case(devices=1, tokens=5, experts_local=4, k=2, seed=4)
  x, ids, weights, w_in, w_out = make_inputs(case)
  twice = jnp.stack([ids[:, 0], ids[:, 0]], axis=1)
  once = ids[:, :1]
  y_twice = reference_moe(x, twice, weights, w_in, w_out)
  y_once = reference_moe(x, once, weights.sum(axis=1, keepdims=True), w_in, w_out)
  assert_close(y_twice, y_once, jnp.float32)
  assert_close(y_twice, numpy_moe(x, np.asarray(twice), weights, w_in, w_out, "swiglu"),
               jnp.float32)
  # Not deduplicated: one copy alone gives a different result.
  y_first = reference_moe(x, once, weights[:, :1], w_in, w_out)
  assert not np.allclose(y_twice, y_first, rtol=1e-2)


def test_bfloat16_in_bfloat16_out():
  case = Case(devices=1, tokens=9, experts_local=4, k=2, dtype=jnp.bfloat16, seed=5)
  x, ids, weights, w_in, w_out = make_inputs(case)
  y = reference_moe(x, ids, weights, w_in, w_out)
  assert y.dtype == jnp.bfloat16
  up = lambda a: a.astype(jnp.float32)
  assert_close(y, numpy_moe(up(x), np.asarray(ids), weights, up(w_in), up(w_out), "swiglu"),
               jnp.bfloat16)
  # Rounded once, at the end: each pair's float32 FFN, combined as if exactly, then to bfloat16
  # (a combine in bfloat16 rounds every term, within the tolerance above).
  per_k = np.stack([[np.asarray(expert_ffn(x[t][None], w_in[e], w_out[e], "swiglu"))[0]
                     for e in np.asarray(ids[t])] for t in range(case.tokens)])
  exact = np.einsum("tk,tkh->th", np.asarray(up(weights), np.float64), per_k.astype(np.float64))
  np.testing.assert_array_equal(y, jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16))


def test_sharded_equals_global():
  case = Case(devices=4, k=2, seed=6)
  inputs = make_inputs(case)
  y = sharded(reference_moe, case.devices)(*inputs)
  assert_close(y, reference_moe(*inputs), jnp.float32)


def test_check_grads():
  case = Case(devices=1, tokens=3, hidden=4, ffn=5, experts_local=2, k=2, seed=7)
  x, ids, weights, w_in, w_out = make_inputs(case)

  def f(x, weights, w_in, w_out):
    # check_grads perturbs numpy copies of the arguments; reference_moe wants jax arrays.
    x, weights, w_in, w_out = map(jnp.asarray, (x, weights, w_in, w_out))
    return reference_moe(x, ids, weights, w_in, w_out)

  check_grads(f, (x, weights, w_in, w_out), order=1, modes=("rev",), eps=1e-2)



@pytest.mark.parametrize("check_vma", [True, False])
def test_zero_tokens_under_shard_map_differentiate(check_vma):
  """Devices with no tokens: an empty result and zero gradients for the weights and for a
  router kernel the combine weights come from, as fused_moe gives (XLA fails to compile the
  gradient of the weights' gather, or of all_to_all_moe's dispatch, with zero tokens under
  shard_map)."""
  case = Case(devices=4, tokens=0, seed=8)
  _, ids, _, w_in, w_out = make_inputs(case)
  x = jnp.zeros((0, w_in.shape[1]))
  kernel = jax.random.normal(jax.random.key(8), (w_in.shape[1], ids.shape[1]))
  grads = {}
  for fn in (reference_moe, fused_moe, all_to_all_moe):
    def body(x, ids, kernel, w_in, w_out, fn=fn):
      return fn(x, ids, x @ kernel, w_in, w_out, axis_name="ep")

    layer = jax.jit(jax.shard_map(body, mesh=ep_mesh(case.devices),
                                  in_specs=(P("ep"), P("ep"), P(), P("ep"), P("ep")),
                                  out_specs=P("ep"), check_vma=check_vma))
    y = layer(x, ids, kernel, w_in, w_out)
    assert y.shape == (0, w_in.shape[1])
    loss = lambda kernel, w_in, w_out: (jnp.sum(layer(x, ids, kernel, w_in, w_out))
                                        + jnp.sum(w_in * w_out.mean()) + jnp.sum(kernel ** 2))
    grads[fn] = jax.jit(jax.grad(loss, (0, 1, 2)))(kernel, w_in, w_out)
  for fn in (reference_moe, all_to_all_moe):
    for want, got in zip(grads[fused_moe], grads[fn]):
      assert_close(got, want, jnp.float32)
