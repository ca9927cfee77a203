"""The single-device GPU baselines: sort by expert, a grouped matmul, unsort.

This is what a JAX user writes today on one GPU holding all experts (MaxText's and Flax's
"sparse matmul" MoE path). It is dropless and computes exactly the routed rows. The grouped
matmul is `jax.lax.ragged_dot` (in jaxlib 0.10.x it expands its groups into zero-padded dense
products) or tokamax's `ragged_dot` (Pallas kernels: Mosaic GPU on
Hopper, Triton elsewhere, XLA on CPU), which `tokamax_ragged_dot` imports only when traced.
"""

import jax
import jax.numpy as jnp

from jax_ccfuser._ffn import ACTIVATIONS


def tokamax_ragged_dot(lhs, rhs, group_sizes, **kwargs):
  """`tokamax.ragged_dot`, imported when traced: the GPU machine gets tokamax as a carried
  wheel, and a benchmark program records its absence as that program's error."""
  import tokamax  # noqa: PLC0415
  from absl import flags  # noqa: PLC0415 (tokamax's dependency)
  # tokamax reads its options as absl flags and parses sys.argv on first use, which fails on
  # any other program's arguments (pytest's, bench's): its defaults it is.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax.ragged_dot(lhs, rhs, group_sizes, **kwargs)


def ragged_dot_moe(x, expert_ids, expert_weights, w_in, w_out, *, activation="swiglu",
                   ragged_dot=jax.lax.ragged_dot):
  """`y[t] = sum_k expert_weights[t, k] * FFN_{expert_ids[t, k]}(x[t])` over all experts.

  Args:
    x: `[T, H]` float, the tokens.
    expert_ids: `[T, K]` int32 in `[0, E)`.
    expert_weights: `[T, K]`, x's dtype or float32.
    w_in: `[E, H, 2F]` (gated) or `[E, H, F]`.
    w_out: `[E, F, H]`.
    activation: a `jax_ccfuser` activation name.
    ragged_dot: the grouped matmul, `jax.lax.ragged_dot`'s signature (`tokamax_ragged_dot`).

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
  h = ragged_dot(rows, w_in, group_sizes, preferred_element_type=jnp.float32)
  if act.gated:
    gate, up = jnp.split(h, 2, axis=-1)
    a = act.fn(gate) * up
  else:
    a = act.fn(h)
  out = ragged_dot(a.astype(w_out.dtype), w_out, group_sizes,
                           preferred_element_type=jnp.float32)  # [T*K, H], sorted
  per_pair = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)
  y = jnp.einsum("tk,tkh->th", expert_weights.astype(jnp.float32), per_pair)
  return y.astype(x.dtype)
