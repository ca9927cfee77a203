"""Where a routed pair falls among its expert's pairs: the order both dispatches fill rows in."""

import jax
import jax.numpy as jnp


def rank_within_expert(keys: jax.Array) -> jax.Array:
  """Each pair's place among the earlier pairs of its expert.

  Args:
    keys: `[N]` int32, the pairs' expert ids in the order that ranks them (an id out of range
      mapped to a key of its own by the caller).

  Returns:
    `[N]` int32.

  Examples:
    >>> from jax_ccfuser._expert_order import rank_within_expert
    >>> rank_within_expert(jnp.array([2, 0, 2, 2, 0]))
    Array([0, 0, 1, 2, 1], dtype=int32)
  """
  order = jnp.argsort(keys, stable=True)
  ranked = keys[order]
  first = jnp.searchsorted(ranked, ranked, side="left").astype(jnp.int32)
  place = jnp.arange(keys.shape[0], dtype=jnp.int32) - first
  return jnp.zeros(keys.shape, jnp.int32).at[order].set(place)
