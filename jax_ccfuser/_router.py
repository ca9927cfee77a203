"""`route`: top-k softmax routing with the Switch/GShard load-balancing and router z-losses."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RouterAux(NamedTuple):
  """Router statistics and auxiliary losses (unscaled: multiply by your own coefficients)."""
  load_balancing_loss: jax.Array  # [] float32
  z_loss: jax.Array               # [] float32
  counts: jax.Array               # [E] int32, (token, k) assignments per expert


def route(logits, k: int, *, renormalize: bool = True, axis_name=None):
  """Picks each token's top-k experts from `softmax(logits)` and computes the auxiliary losses.

  With `p[t, e] = softmax(logits[t])[e]` (float32), `N = T * K` assignments and `E` experts:

  - `f_e = count_e / N`, where `count_e` is the number of (token, k) assignments to expert `e`
    (no gradient flows through `f_e`);
  - `P_e = (1 / T) * sum_t p[t, e]`, the mean router probability of expert `e`;
  - `load_balancing_loss = E * sum_e f_e * P_e` (1 when routing and probabilities are uniform);
  - `z_loss = (1 / T) * sum_t logsumexp(logits[t])^2`.

  With `axis_name`, `f_e`, `P_e` and the z-loss mean are each averaged over that axis with
  `jax.lax.pmean` before the product, so every device gets the loss of the global batch
  (the shards have equal `T`), and `counts` is summed over it.

  Args:
    logits: `[T, E]`, any float dtype; computed on in float32.
    k: experts per token, `1 <= k <= E`.
    renormalize: rescale each token's k weights to sum to 1; otherwise they are the raw
      probabilities.
    axis_name: a mesh axis of the enclosing `jax.shard_map` that splits the tokens, or `None`.

  Returns:
    `(expert_ids, expert_weights, aux)`: expert_ids `[T, K]` int32 in decreasing probability
    (ties to the lower id), expert_weights `[T, K]` float32, and a `RouterAux`. Gradients reach
    `logits` through `expert_weights` and both losses.

  Examples:
    >>> ids, weights, aux = route(x @ w_router, 2)
    >>> loss = task_loss + 1e-2 * aux.load_balancing_loss + 1e-3 * aux.z_loss
  """
  if np.ndim(logits) != 2:
    raise ValueError(f"logits must have rank 2 ([T, E]), got shape {tuple(np.shape(logits))}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be a float array, got {np.dtype(logits.dtype).name}")
  t, e = logits.shape
  if not 1 <= k <= e:
    raise ValueError(f"k={k} must be between 1 and the number of experts {e}")

  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  expert_weights, expert_ids = jax.lax.top_k(probs, k)
  if renormalize:
    expert_weights = expert_weights / jnp.sum(expert_weights, axis=-1, keepdims=True)

  counts = jnp.bincount(expert_ids.reshape(-1), length=e).astype(jnp.int32)
  fraction = counts.astype(jnp.float32) / (t * k)
  mean_prob = jnp.mean(probs, axis=0)
  z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
  if axis_name is not None:
    fraction, mean_prob, z = jax.lax.pmean((fraction, mean_prob, z), axis_name)
    counts = jax.lax.psum(counts, axis_name)
  aux = RouterAux(load_balancing_loss=e * jnp.sum(fraction * mean_prob), z_loss=z, counts=counts)
  return expert_ids.astype(jnp.int32), expert_weights, aux
