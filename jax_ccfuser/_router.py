"""`route`: top-k routing (softmax or sigmoid scores, optional expert groups and bias) with the
Switch/GShard load-balancing and router z-losses; `update_expert_bias`: auxiliary-loss-free
balancing."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jax_ccfuser._broadcasting import numpy_broadcasting
from jax_ccfuser._validation import Operand, as_operand, check_int, known_now

SCORES = ("softmax", "sigmoid")

# A group's score is the sum of this many of its best biased expert scores (DeepSeek-V3).
_GROUP_SCORE_EXPERTS = 2


class RouterAux(NamedTuple):
  """Router statistics and auxiliary losses (unscaled: multiply by your own coefficients).

  Attributes:
    load_balancing_loss: `[]` float32, the Switch/GShard auxiliary loss (`route` says how).
    z_loss: `[]` float32, the router z-loss.
    counts: `[E]` int32, the (token, k) assignments per expert.
  """
  load_balancing_loss: jax.Array
  z_loss: jax.Array
  counts: jax.Array


def check_router_options(num_experts: int, k: int, *, score: str = "softmax",
                         num_groups: int = 1, top_groups: int | None = None,
                         scale: float | jax.Array = 1.0) -> None:
  """Raises a ValueError naming the offending values when the router options do not fit."""
  for name, value in (("k", k), ("num_groups", num_groups), ("top_groups", top_groups)):
    if value is not None:
      check_int(name, value)
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}; expected one of {list(SCORES)}")
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} must be between 1 and the number of experts {num_experts}")
  if num_groups < 1 or num_experts % num_groups:
    raise ValueError(f"num_groups={num_groups} must be positive and divide the number of "
                     f"experts {num_experts}")
  top_groups = num_groups if top_groups is None else top_groups
  if not 1 <= top_groups <= num_groups:
    raise ValueError(f"top_groups={top_groups} must be between 1 and num_groups={num_groups}")
  reachable = top_groups * (num_experts // num_groups)
  if k > reachable:
    raise ValueError(f"k={k} is more than the {reachable} experts of top_groups={top_groups} "
                     f"groups of {num_experts // num_groups}")
  if np.ndim(scale) != 0:
    raise ValueError(f"scale must be a scalar, got shape {tuple(np.shape(scale))}")
  # A traced scale (learned, or scheduled) is the caller's to keep positive.
  known = known_now(scale)
  if known is not None and not (np.isfinite(known) and known > 0):
    raise ValueError(f"scale={scale} must be a positive finite number")


def _top_k(choice, tiebreak, k: int):
  """The `k` largest entries of `choice` along its last axis, as `jax.lax.top_k` picks them (NaN
  first) but for ties, which the larger `tiebreak` breaks before the lower index: float32 scores
  round equal where the logits differ (a sigmoid is 1.0 past a logit of about 17, a softmax 0
  far below a row's largest logit).

  Returns:
    `(choice, tiebreak, indices)` of the chosen entries, `[..., k]` each, best first.
  """
  def by_sort():
    keys = [jnp.where(jnp.isnan(a), -jnp.inf, -a) for a in (choice, tiebreak)]  # ascending
    index = jax.lax.broadcasted_iota(jnp.int32, choice.shape, choice.ndim - 1)
    return jax.lax.sort((*keys, index), dimension=choice.ndim - 1, num_keys=3)[2][..., :k]

  # top_k where none of the k + 1 best tie (a tie past them changes nothing): 10-20x less work
  # than the sort, which runs only where they do. (Its values are gathered again: comparing
  # top_k's own values kept XLA:CPU from its top-k kernel, which then sorted every row.)
  index = jax.lax.top_k(choice, min(k + 1, choice.shape[-1]))[1]
  best = jnp.take_along_axis(choice, index, -1)
  tied = jnp.any(best[..., 1:] == best[..., :-1])
  index = jax.lax.cond(tied, by_sort, lambda: index[..., :k])
  return (jnp.take_along_axis(choice, index, -1), jnp.take_along_axis(tiebreak, index, -1), index)


def _limit_to_top_groups(choice, logits, score: str, num_groups: int, top_groups: int):
  """`choice` `[T, E]` with the experts outside each token's `top_groups` best groups at -inf.

  Groups are consecutive runs of `E / num_groups` experts; a group's score is the sum of its
  best two entries of `choice` (its best one when groups have a single expert).
  """
  t, e = choice.shape
  grouped = lambda a: a.reshape(t, num_groups, e // num_groups)
  best, _, index = _top_k(grouped(choice), grouped(logits),
                          min(_GROUP_SCORE_EXPERTS, e // num_groups))
  # Sums of scores that round equal are ordered exactly by how far their scores are from where
  # float32 rounds them: log(s) for softmax (0 far below), -log(1 - s) for sigmoid (1 above).
  if score == "softmax":
    far = jnp.take_along_axis(grouped(jax.nn.log_softmax(logits)), index, -1)
    tiebreak = jax.nn.logsumexp(far, -1)                           # log(s_a + s_b)
  else:
    far = jnp.take_along_axis(grouped(jax.nn.softplus(logits)), index, -1)
    tiebreak = -jax.nn.logsumexp(-far, -1)                         # -log(2 - s_a - s_b)
  _, _, groups = _top_k(best.sum(-1), tiebreak, top_groups)                 # [T, top_groups]
  keep = jnp.any(groups[:, :, None] == jnp.arange(num_groups)[None, None], axis=1)  # [T, G]
  return jnp.where(keep[:, :, None], grouped(choice), -jnp.inf).reshape(t, e)


@numpy_broadcasting
@jax.named_call
def route(logits: Operand, k: int, *, renormalize: bool | None = None,
          axis_name: str | None = None, score: str = "softmax", num_groups: int = 1,
          top_groups: int | None = None, scale: float | jax.Array = 1.0,
          expert_bias: Operand | None = None) -> tuple[jax.Array, jax.Array, RouterAux]:
  """Picks each token's top-k experts and computes the auxiliary losses.

  Scores `s[t, e]` (float32) are `softmax(logits[t])[e]` (`score="softmax"`) or
  `sigmoid(logits[t, e])` (`score="sigmoid"`, DeepSeek-V3). The experts are chosen by
  `s[t] + expert_bias` (the bias shifts the choice only): with `num_groups > 1` the experts are
  split into `num_groups` groups of consecutive ids, a group scores the sum of its two best
  biased scores (DeepSeek-V3's rule; its one score when a group has a single expert), and each
  token picks among the experts of its `top_groups` best groups only. Scores that tie in float32
  (a sigmoid is 1.0 past a logit of about 17) are told apart by their logits (a group's sum by
  its scores' distances to 0 or 1), then go to the lower id (group). The combine weights are the
  chosen experts' unbiased scores, rescaled to sum to 1 when `renormalize`, then times `scale`
  (the routed scaling factor). With `num_groups` the size of the expert-parallel axis, a group
  is one device's experts and each token reaches at most `top_groups` devices. `num_groups=1`,
  `top_groups=None`, `scale=1` and no bias route exactly as plain softmax (or sigmoid) top-k.

  With `N = T * K` assignments and `E` experts:

  - `f_e = count_e / N`, where `count_e` is the number of (token, k) assignments to expert `e`
    (no gradient flows through `f_e`);
  - `P_e = (1 / T) * sum_t p[t, e]`, the mean router probability of expert `e`, with
    `p[t] = s[t] / sum_e s[t, e]` (for softmax, `p = s`);
  - `load_balancing_loss = E * sum_e f_e * P_e` (1 when routing and probabilities are uniform);
  - `z_loss = (1 / T) * sum_t logsumexp(logits[t])^2`.

  With `axis_name`, `f_e`, `P_e` and the z-loss mean are each averaged over that axis with
  `jax.lax.pmean` before the product, so every device gets the loss of the global batch
  (the shards have equal `T`), and `counts` is summed over it.

  Args:
    logits: `[T, E]`, any float dtype; computed on in float32.
    k: experts per token, `1 <= k <= E` (and at most the experts of `top_groups` groups).
    renormalize: rescale each token's k weights to sum to 1; otherwise they are the raw scores.
      `None` (the default): when `k > 1`. With `k = 1` a rescaled weight is 1 whatever the
      router says, so no gradient of the layer's output reaches the router (only the auxiliary
      losses train it); Switch Transformers keep the raw score there.
    axis_name: the mesh axis (or tuple of axes) of the enclosing `jax.shard_map` that splits
      the tokens, or `None`.
    score: "softmax" or "sigmoid".
    num_groups: groups of experts for group-limited routing; divides E. 1: no groups.
    top_groups: groups each token may use, `1 <= top_groups <= num_groups`; `None`: all.
    scale: the routed scaling factor, multiplied into the combine weights: a positive number,
      or a traced scalar (a learned or scheduled factor; gradients reach it).
    expert_bias: `[E]` float, added to the scores for the choice of experts only (and no
      gradient reaches it), or `None`; see `update_expert_bias`.

  Returns:
    `(expert_ids, expert_weights, aux)`: expert_ids `[T, K]` int32 in decreasing biased score
    (ties as above), expert_weights `[T, K]` float32, and a `RouterAux`. Gradients reach
    `logits` through `expert_weights` and both losses.

  Examples:
    >>> logits = jax.random.normal(jax.random.key(0), (6, 8))  # [T, E]
    >>> ids, weights, aux = jax_ccfuser.route(logits, 2)
    >>> ids.shape, weights.shape, int(aux.counts.sum())
    ((6, 2), (6, 2), 12)
    >>> bool(jnp.allclose(weights.sum(-1), 1.0))
    True
    >>> aux_loss = 1e-2 * aux.load_balancing_loss + 1e-3 * aux.z_loss  # added to the task loss

    DeepSeek-V3's router: sigmoid scores, 4 groups of 4 experts of which each token uses its best
    2, the routed scaling factor, and a bias that shifts the choice only:

    >>> logits = jax.random.normal(jax.random.key(1), (6, 16))
    >>> ids, weights, aux = jax_ccfuser.route(logits, 4, score="sigmoid", num_groups=4,
    ...                                       top_groups=2, scale=2.5, expert_bias=jnp.zeros(16))
    >>> (ids // 4).tolist()  # the groups of each token's experts: 2 at most
    [[1, 1, 1, 3], [0, 0, 2, 2], [1, 0, 0, 1], [0, 0, 3, 3], [3, 0, 3, 3], [2, 2, 1, 1]]
    >>> bool(jnp.allclose(weights.sum(-1), 2.5))
    True
  """
  logits = as_operand("logits", logits)
  if expert_bias is not None:
    expert_bias = as_operand("expert_bias", expert_bias)
  if np.ndim(logits) != 2:
    raise ValueError(f"logits must have rank 2 ([T, E]), got shape {tuple(np.shape(logits))}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be a float array, got {np.dtype(logits.dtype).name}")
  t, e = logits.shape
  check_router_options(e, k, score=score, num_groups=num_groups, top_groups=top_groups,
                       scale=scale)
  if expert_bias is not None and np.shape(expert_bias) != (e,):
    raise ValueError(f"expert_bias must have shape [E] = ({e},), got "
                     f"{tuple(np.shape(expert_bias))}")

  logits = logits.astype(jnp.float32)
  # Normalised scores as softmaxes of log scores: a ratio of sigmoids underflows to 0/0 (and its
  # gradient overflows first) where a token's logits are all very negative.
  log_scores = (jax.nn.log_softmax if score == "softmax" else jax.nn.log_sigmoid)(logits)
  scores = jnp.exp(log_scores)
  probs = jax.nn.softmax(log_scores, axis=-1)
  # The choice moves no gradient; the bias is moved by `update_expert_bias` from the loads.
  choice, exact = jax.lax.stop_gradient((scores, logits))
  if expert_bias is not None:
    choice = choice + jax.lax.stop_gradient(expert_bias.astype(jnp.float32))
  if expert_bias is None and (top_groups is None or top_groups == num_groups):
    # The scores rise with the logits, so the logits order them exactly: top_k alone, with no
    # tie check to compile (it was a third of the router's compile time). top_k ranks -0.0
    # below 0.0, which tie (a zero router's logits are both).
    expert_ids = jax.lax.top_k(jnp.where(exact == 0, 0.0, exact), k)[1]
  else:
    if top_groups is not None and top_groups < num_groups:
      choice = _limit_to_top_groups(choice, exact, score, num_groups, top_groups)
    # Scores that round equal are told apart by their logits, which order them exactly.
    _, _, expert_ids = _top_k(choice, exact, k)
  expert_weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
  if renormalize is None:  # Switch's raw score at k = 1, where a rescaled weight is always 1
    renormalize = k > 1
  if renormalize:
    expert_weights = jax.nn.softmax(jnp.take_along_axis(log_scores, expert_ids, axis=-1), axis=-1)
  expert_weights = expert_weights * jnp.asarray(scale, expert_weights.dtype)  # x * 1 is x

  counts = jnp.bincount(expert_ids.reshape(-1), length=e).astype(jnp.int32)
  # Means over this device's tokens; none (T = 0) give losses of 0, not 0 / 0.
  fraction = counts.astype(jnp.float32) / max(t * k, 1)
  mean_prob = jnp.sum(probs, axis=0) / max(t, 1)
  z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))) / max(t, 1)
  if axis_name is not None:
    fraction, mean_prob, z = jax.lax.pmean((fraction, mean_prob, z), axis_name)
    counts = jax.lax.psum(counts, axis_name)
  aux = RouterAux(load_balancing_loss=e * jnp.sum(fraction * mean_prob), z_loss=z, counts=counts)
  return expert_ids.astype(jnp.int32), expert_weights, aux


@numpy_broadcasting
@jax.named_call
def update_expert_bias(expert_bias: Operand, counts: ArrayLike, *,
                       rate: float | jax.Array) -> jax.Array:
  """One step of auxiliary-loss-free load balancing (DeepSeek-V3).

  `expert_bias + rate * sign(mean(counts) - counts)`: an overloaded expert's bias falls by
  `rate`, an underloaded one's rises by `rate`, so `route(..., expert_bias=...)` sends it fewer
  (more) tokens at the next step; the combine weights never see the bias. Pure and jittable; it
  runs outside the gradient, on the loads the forward pass reports (`RouterAux.counts`,
  `MoEAux.counts`: whole-batch counts, the same on every device, so a replicated bias stays
  replicated). Stacked layers (`nnx.vmap`, `nnx.scan`) update together, each row on its own
  mean; for other trees of layers, `jax.tree.map` it over matching trees of biases and counts.

  Args:
    expert_bias: `[..., E]` float32, the bias `route` adds to the scores to choose experts
      (`[L, E]` for L stacked layers).
    counts: `[..., E]`, the same shape: (token, k) assignments per expert at this step, int (or
      float, such as loads averaged over steps).
    rate: the bias update speed (DeepSeek-V3 uses 1e-3).

  Returns:
    The new bias, `[..., E]`, expert_bias's dtype.

  Examples:
    >>> bias = jnp.zeros(4)
    >>> counts = jnp.array([6, 2, 2, 2])  # expert 0 took half of the 12 rows
    >>> print(jax_ccfuser.update_expert_bias(bias, counts, rate=1e-3))
    [-0.001  0.001  0.001  0.001]

    In a training step, from the counts the router reports:

    >>> logits = jax.random.normal(jax.random.key(0), (6, 4))
    >>> ids, weights, aux = jax_ccfuser.route(logits, 2, expert_bias=bias)
    >>> bias = jax_ccfuser.update_expert_bias(bias, aux.counts, rate=1e-3)

    Two stacked layers, each evened out on its own loads:

    >>> print(jax_ccfuser.update_expert_bias(jnp.zeros((2, 4)), jnp.array([[6, 2, 2, 2],
    ...                                                                    [3, 3, 3, 3]]),
    ...                                      rate=1e-3))
    [[-0.001  0.001  0.001  0.001]
     [ 0.     0.     0.     0.   ]]
  """
  if np.shape(expert_bias) != np.shape(counts) or np.ndim(counts) < 1:
    raise ValueError(f"expert_bias and counts must have one shape, [E] or [..., E], got "
                     f"{tuple(np.shape(expert_bias))} and {tuple(np.shape(counts))}")
  # A traced rate (scheduled) is the caller's to keep finite and non-negative.
  known = known_now(rate)
  if known is not None and not (known.ndim == 0 and np.isfinite(known) and known >= 0):
    raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
  counts = jnp.asarray(counts)
  if jnp.issubdtype(counts.dtype, jnp.integer):
    # sign(mean - c) in integers (float32 rounds counts past 2^24): with mean = q + r / E,
    # 0 <= r < E, c < q is under the mean, c > q over it, and c == q under it unless r == 0.
    # q and r come from the counts' quotients and remainders by E, never from their total,
    # which can overflow where each count fits (accumulated counts).
    if counts.dtype.itemsize < 4:
      counts = counts.astype(jnp.uint32 if jnp.issubdtype(counts.dtype, jnp.unsignedinteger)
                             else jnp.int32)
    e = counts.shape[-1]
    spare = jnp.sum(counts % e, axis=-1, keepdims=True, dtype=counts.dtype)  # < E * E
    q = jnp.sum(counts // e, axis=-1, keepdims=True, dtype=counts.dtype) + spare // e
    r = spare % e
    sign = jnp.where(counts < q, 1, jnp.where(counts > q, -1, (r > 0).astype(jnp.int32)))
  else:
    # sign(sum - E * c), not of a rounded mean: counts at the mean (averaged loads) stay put.
    counts = counts.astype(jnp.float32)
    sign = jnp.sign(jnp.sum(counts, axis=-1, keepdims=True) - counts.shape[-1] * counts)
  bias = jnp.asarray(expert_bias)
  return bias + (rate * sign.astype(jnp.float32)).astype(bias.dtype)
