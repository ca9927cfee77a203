"""The single-device GPU baseline: sort by expert, `jax.lax.ragged_dot`, unsort.

This is what a JAX user writes today on one GPU holding all experts (MaxText's and Flax's
"sparse matmul" MoE path). It is dropless and computes exactly the routed rows, but in jaxlib
0.10.x `ragged_dot` expands its groups into zero-padded dense products (DESIGN.md section 5),
which is what the benchmark measures.
"""

import jax
import jax.numpy as jnp

from jax_ccfuser._ffn import ACTIVATIONS


def ragged_dot_moe(x, expert_ids, expert_weights, w_in, w_out, *, activation="swiglu"):
  """`y[t] = sum_k expert_weights[t, k] * FFN_{expert_ids[t, k]}(x[t])` over all experts.

  Args:
    x: `[T, H]` float, the tokens.
    expert_ids: `[T, K]` int32 in `[0, E)`.
    expert_weights: `[T, K]`, x's dtype or float32.
    w_in: `[E, H, 2F]` (gated) or `[E, H, F]`.
    w_out: `[E, F, H]`.
    activation: a `jax_ccfuser` activation name.

  Returns:
    `[T, H]`, x's dtype.
  """
  t, k = expert_ids.shape
  num_experts = w_out.shape[0]
  act = ACTIVATIONS[activation]
  flat = expert_ids.reshape(-1)                       # [T*K], pair p = t * K + k
  order = jnp.argsort(flat, stable=True)              # pairs grouped by expert
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  rows = x[order // k]                                # [T*K, H]
  h = jax.lax.ragged_dot(rows, w_in, group_sizes, preferred_element_type=jnp.float32)
  if act.gated:
    gate, up = jnp.split(h, 2, axis=-1)
    a = act.fn(gate) * up
  else:
    a = act.fn(h)
  out = jax.lax.ragged_dot(a.astype(w_out.dtype), w_out, group_sizes,
                           preferred_element_type=jnp.float32)  # [T*K, H], sorted
  per_pair = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)
  y = jnp.einsum("tk,tkh->th", expert_weights.astype(jnp.float32), per_pair)
  return y.astype(x.dtype)
