"""`all_to_all_moe`: the baseline users have today (sort, all-to-all, grouped FFN, all-to-all).

Per device, with `N = T * K` (token, k) pairs, `E = D * E_local` experts and `C` rows of capacity
per (source device, expert):

1. Order the pairs by priority `q = k * T + t` (every first choice before any second choice) and
   stable-sort them by expert; a pair's rank among its expert's pairs is its buffer slot.
2. Gather the tokens into a send buffer `[D, E_local, C, H]`, block `d` holding the rows for the
   experts of device `d`; a pair whose rank is `C` or more is dropped.
3. `all_to_all` (dispatch): device `d` now holds `[D (source), E_local, C, H]`.
4. Each local expert runs its FFN over all `D * C` received rows (padding rows included).
5. `all_to_all` back (combine), gather each pair's result from its slot, and sum over k in
   float32 times `expert_weights`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_ccfuser._broadcasting import numpy_broadcasting
from jax_ccfuser._expert_order import rank_within_expert
from jax_ccfuser._ffn import expert_ffn, no_tokens
from jax_ccfuser._reassign import Plan
from jax_ccfuser._validation import Operand, check_moe_args


def check_capacity_factor(capacity_factor) -> None:
  """`capacity_factor` must be None (dropless) or a positive number."""
  if capacity_factor is not None and (isinstance(capacity_factor, (bool, np.bool_))
                                      or not capacity_factor > 0):
    raise ValueError(f"capacity_factor must be a positive float or None (dropless), "
                     f"got {capacity_factor!r}")


def expert_capacity(capacity_factor, *, tokens: int, k: int, num_experts: int) -> int:
  """Rows per (source device, expert): the worst case `T * K`, or `ceil(c * T * K / E)`."""
  check_capacity_factor(capacity_factor)
  worst = tokens * k
  if capacity_factor is None:
    return worst
  # Beyond the worst case more capacity only adds padding rows (clamping c first keeps an
  # infinite factor finite).
  return math.ceil(min(capacity_factor, num_experts) * worst / num_experts)


def _pair_slots(expert_ids: jax.Array, *, num_experts: int, capacity: int) -> jax.Array:
  """Send-buffer slot of every (token, k) pair, in priority order.

  Args:
    expert_ids: `[T, K]` int32, global expert ids.
    num_experts: E.
    capacity: C.

  Returns:
    `[K * T]` int32: for pair `q = k * T + t`, its row `e * C + rank` of the flattened
    `[E * C]` buffer, or `E * C` (one past the end) when the pair is dropped.
  """
  ids = expert_ids.T.reshape(-1)  # [K*T], priority order
  valid = (ids >= 0) & (ids < num_experts)
  # Ids outside [0, E) sort after every real expert and are dropped, so no index leaves a buffer.
  key = jnp.where(valid, ids, num_experts)
  rank = rank_within_expert(key)
  keep = valid & (rank < capacity)
  return jnp.where(keep, key * capacity + rank, num_experts * capacity)


@numpy_broadcasting
@jax.named_call
def all_to_all_moe(x: Operand, expert_ids: Operand, expert_weights: Operand,
                   w_in: Operand, w_out: Operand, *, axis_name: str | None = None,
                   activation: str = "swiglu", plan: Plan | None = None,
                   capacity_factor: float | None = None) -> jax.Array:
  """MoE layer the usual way: sort by expert, `all_to_all` dispatch, grouped FFN, `all_to_all` back.

  Same math as `fused_moe`, `y[t] = sum_k expert_weights[t, k] * FFN_{expert_ids[t, k]}(x[t])`,
  but for pairs it drops (below) and ids out of range, which it drops where `fused_moe` raises.
  Every (source device, expert) pair gets a fixed `C` rows in the exchanged buffers:

  - `capacity_factor=None` (dropless): `C = T * K`, the worst case (all of a device's pairs may
    pick the same expert). Each device then runs its FFN over `E_local * D * T * K = E * T * K`
    rows, about `E` times the `T * K` rows of useful work, and moves as many bytes.
  - `capacity_factor=c` (GShard-style dropping): `C = min(T * K, ceil(c * T * K / E))`. On each
    source device, the pairs routed to one expert are served in priority order `(k, t)`: all
    first choices (`k = 0`) in token order, then all second choices, and so on; a pair whose
    position in that order is `C` or more is dropped and contributes zero to `y` (and receives no
    gradient). The rule is deterministic and depends only on this device's `expert_ids`.

  Ids outside `[0, E)` are treated as dropped (they contribute zero); no buffer is read or written
  out of bounds.

  Args:
    x: `[T, H]` float32/bfloat16/float16, this device's tokens.
    expert_ids: `[T, K]` int32, global expert ids in `[0, D * E_local)`.
    expert_weights: `[T, K]`, x's dtype or float32.
    w_in: `[E_local, H, 2F]` (gated) or `[E_local, H, F]`; device `d` owns experts
      `d * E_local ... (d + 1) * E_local - 1`.
    w_out: `[E_local, F, H]`.
    axis_name: the expert-parallel mesh axis of the enclosing `jax.shard_map`, or `None` (no
      collectives; this device holds all experts).
    activation: "swiglu", "geglu", "gelu", "relu" or "silu".
    plan: accepted for signature parity with `fused_moe` and ignored.
    capacity_factor: `None` for dropless, or a positive float.

  Returns:
    `[T, H]`, x's dtype.

  Examples:
    GShard's dropping when every token picks expert 0 (K = 1, E = 16, 64 tokens a device):
    each device sends it `C = ceil(1.25 * 64 / 16) = 5` rows, its first 5 tokens', and the
    other tokens get zeros.

    >>> import functools
    >>> from jax.sharding import AxisType, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("ep",), axis_types=(AxisType.Auto,))
    >>> kx, ki, ko = jax.random.split(jax.random.key(0), 3)
    >>> x = jax.random.normal(kx, (512, 16))
    >>> ids, weights = jnp.zeros((512, 1), jnp.int32), jnp.ones((512, 1))
    >>> w_in = jax.random.normal(ki, (16, 16, 64)) / 4
    >>> w_out = jax.random.normal(ko, (16, 32, 16)) / 6
    >>> moe = functools.partial(jax_ccfuser.all_to_all_moe, axis_name="ep", capacity_factor=1.25)
    >>> y = jax.jit(jax.shard_map(moe, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(
    ...     x, ids, weights, w_in, w_out)
    >>> computed = (y != 0).any(axis=1).reshape(8, 64)
    >>> computed.sum(axis=1).tolist(), bool(computed[:, :5].all())
    ([5, 5, 5, 5, 5, 5, 5, 5], True)
    >>> exact = jax_ccfuser.reference_moe(x, ids, weights, w_in, w_out)
    >>> bool(jnp.allclose(y.reshape(8, 64, 16)[:, :5], exact.reshape(8, 64, 16)[:, :5],
    ...                   rtol=1e-5, atol=1e-5))
    True
  """
  del plan
  (x, expert_ids, expert_weights, w_in, w_out), dims = check_moe_args(
      x, expert_ids, expert_weights, w_in, w_out, activation=activation, axis_name=axis_name)
  t, h, k = dims.tokens, dims.hidden, dims.k
  d, e_local, e = dims.num_devices, dims.experts_local, dims.num_experts
  c = expert_capacity(capacity_factor, tokens=t, k=k, num_experts=e)
  if t == 0:
    return no_tokens(x)

  slots = _pair_slots(expert_ids, num_experts=e, capacity=c)  # [K*T]
  # Which token fills each buffer row; empty rows read the zero row appended at index T.
  token_of_slot = jnp.full(e * c, t, jnp.int32).at[slots].set(
      jnp.tile(jnp.arange(t, dtype=jnp.int32), k), mode="drop")
  x_padded = jnp.concatenate([x, jnp.zeros((1, h), x.dtype)])
  send = x_padded[token_of_slot].reshape(d, e_local, c, h)

  recv = send if axis_name is None else jax.lax.all_to_all(send, axis_name, 0, 0)
  rows = recv.transpose(1, 0, 2, 3).reshape(e_local, d * c, h)
  out = jax.vmap(expert_ffn, in_axes=(0, 0, 0, None))(rows, w_in, w_out, activation)
  # Results travel back in x's dtype, as a production all-to-all would send them.
  out = out.astype(x.dtype).reshape(e_local, d, c, h).transpose(1, 0, 2, 3)
  back = out if axis_name is None else jax.lax.all_to_all(out, axis_name, 0, 0)

  back_padded = jnp.concatenate([back.reshape(e * c, h), jnp.zeros((1, h), x.dtype)])
  per_pair = back_padded[slots].reshape(k, t, h)
  # A dropped pair's weight is zeroed, not multiplied by its zero row: inf or NaN times 0 is NaN.
  kept = (slots < e * c).reshape(k, t).T
  weights = jnp.where(kept, expert_weights.astype(jnp.float32), 0)
  y = jnp.einsum("tk,kth->th", weights, per_pair.astype(jnp.float32))
  return y.astype(x.dtype)
