"""Routing statistics: rows per (source device, expert) and cross-layer expert transitions."""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jax_ccfuser._broadcasting import numpy_broadcasting
from jax_ccfuser._validation import check_count


class RoutingStats(NamedTuple):
  """Routing counts of L consecutive MoE layers, summed over the steps recorded so far.

  A pytree of two int32 arrays (exact up to 2**31 - 1 per entry), so it can be carried through a
  jitted training loop and summed across steps with `update`.

  Attributes:
    rows: `[L, D, E]` int32, the (token, k) rows source device d sent to expert e in layer l.
    transitions: `[L - 1, E, E]` int32, the (token, k, k') pairs of a token's expert i in layer
      l and j in layer l + 1.
  """
  rows: jax.Array
  transitions: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, num_devices: int, num_experts: int) -> "RoutingStats":
    """Empty totals for `num_layers` layers of `num_experts` experts over `num_devices` devices.

    Args:
      num_layers: L, positive int.
      num_devices: D, positive int.
      num_experts: E, positive int.

    Returns:
      A `RoutingStats` of zeros: rows `[L, D, E]`, transitions `[L - 1, E, E]`.
    """
    num_layers = check_count("num_layers", num_layers)
    num_devices = check_count("num_devices", num_devices)
    num_experts = check_count("num_experts", num_experts)
    return cls(rows=jnp.zeros((num_layers, num_devices, num_experts), jnp.int32),
               transitions=jnp.zeros((num_layers - 1, num_experts, num_experts), jnp.int32))

  @property
  def num_layers(self) -> int:
    """L, the layers these counts cover."""
    return self.rows.shape[0]

  @property
  def num_devices(self) -> int:
    """D, the source devices."""
    return self.rows.shape[1]

  @property
  def num_experts(self) -> int:
    """E, the experts of each layer."""
    return self.rows.shape[2]

  def update(self, expert_ids: Sequence[ArrayLike], *,
             source: ArrayLike | None = None) -> "RoutingStats":
    """These totals plus the counts of one step (`routing_stats`); jittable.

    Args:
      expert_ids: one `[N, K]` integer array per layer, `L` of them, the same N tokens in the
        same order in every layer.
      source: `[N]` int32, the device each token lives on; `None`: the N tokens split evenly in
        order over the D devices (token `t` on device `t // (N / D)`), as the expert-parallel
        layers split a batch.

    Returns:
      The updated `RoutingStats`.

    Examples:
      >>> from jax_ccfuser.placement import RoutingStats
      >>> stats = RoutingStats.zeros(2, 4, 8)  # 2 layers, 4 devices, 8 experts
      >>> ids_layer0 = jnp.arange(16).reshape(8, 2) % 8  # [N, K]: 2 tokens a device
      >>> stats = stats.update([ids_layer0, (ids_layer0 + 1) % 8])
      >>> stats = stats.update([ids_layer0, (ids_layer0 + 1) % 8])  # the next step
      >>> stats.rows[0]  # layer 0: device 0 sent experts 0 to 3 two rows each
      Array([[2, 2, 2, 2, 0, 0, 0, 0],
             [0, 0, 0, 0, 2, 2, 2, 2],
             [2, 2, 2, 2, 0, 0, 0, 0],
             [0, 0, 0, 0, 2, 2, 2, 2]], dtype=int32)
    """
    if len(expert_ids) != self.num_layers:
      raise ValueError(f"these statistics have {self.num_layers} layers, got expert ids of "
                       f"{len(expert_ids)}")
    step = routing_stats(expert_ids, num_experts=self.num_experts, num_devices=self.num_devices,
                         source=source)
    return RoutingStats(rows=self.rows + step.rows, transitions=self.transitions + step.transitions)


def _as_int32(a: jax.Array, size: int) -> jax.Array:
  """Integer `a` as int32, in which the bins are counted (in a narrower type, uint8 ids at
  E = 256, they would wrap), entries of a wider type clipped to [-1, size]: out of range
  either way."""
  if jnp.iinfo(a.dtype).max > jnp.iinfo(jnp.int32).max:
    a = jnp.clip(a, -1 if jnp.issubdtype(a.dtype, jnp.signedinteger) else 0, size)
  return a.astype(jnp.int32)


@numpy_broadcasting
def routing_stats(expert_ids: Sequence[ArrayLike], *, num_experts: int, num_devices: int,
                  source: ArrayLike | None = None) -> RoutingStats:
  """Counts one step's routing: rows per (source device, expert) and cross-layer transitions.

  Every (token, k) assignment of layer l adds one to `rows[l, source[token], expert]`; every pair
  of a token's k-th expert `i` in layer l and k'-th expert `j` in layer l + 1 adds one to
  `transitions[l, i, j]` (K * K' pairs per token). Ids outside `[0, E)` and sources outside
  `[0, D)` are not counted. Jittable (one `bincount` per layer and per layer pair).

  Args:
    expert_ids: one `[N, K]` integer array per layer (K may differ between layers), the same N
      tokens in the same order in every layer.
    num_experts: E.
    num_devices: D.
    source: `[N]` integer, the device each token lives on; `None`: token `t` on device
      `t // (N / D)` (N divisible by D), the split of `jax_ccfuser.nnx.MoE` over a mesh whose
      only axis of more than one device is the expert axis. Refused under a mesh with more
      such axes (a data axis): there the layers split the tokens over every axis, and the
      devices of the expert axis take them in another order; pass each token's index along
      the expert axis.

  Returns:
    A `RoutingStats` with rows `[L, D, E]` and transitions `[L - 1, E, E]`, int32.

  Examples:
    >>> from jax_ccfuser.placement import routing_stats
    >>> ids = [jnp.array([[0, 1], [2, 3]]), jnp.array([[1, 2], [3, 0]])]
    >>> s = routing_stats(ids, num_experts=4, num_devices=2)
    >>> s.rows[0].tolist()  # device 0 sent experts 0 and 1 a row each
    [[1, 1, 0, 0], [0, 0, 1, 1]]
    >>> int(s.transitions[0, 0, 1])  # token 0 went from expert 0 in layer 0 to expert 1 in layer 1
    1
  """
  ids = [jnp.asarray(i) for i in expert_ids]
  if not ids:
    raise ValueError("expert_ids must hold at least one layer")
  for layer, i in enumerate(ids):
    if i.ndim != 2 or not jnp.issubdtype(i.dtype, jnp.integer):
      raise ValueError(f"expert_ids[{layer}] must be an [N, K] integer array, got "
                       f"{i.dtype.name}{list(i.shape)}")
    if i.shape[0] != ids[0].shape[0]:
      raise ValueError(f"every layer must route the same tokens: expert_ids[0] has "
                       f"{ids[0].shape[0]} rows, expert_ids[{layer}] has {i.shape[0]}")
  n, e, d = ids[0].shape[0], num_experts, num_devices
  ids = [_as_int32(i, e) for i in ids]
  if source is None:
    mesh = jax.sharding.get_abstract_mesh()
    split = [] if mesh.empty else [a for a, size in zip(mesh.axis_names, mesh.axis_sizes)
                                   if size > 1]
    if len(split) > 1:
      raise ValueError(f"the mesh splits the tokens over the axes {split}, not over the expert "
                       f"axis alone: pass source= (each token's index along the expert axis)")
    if n % d:
      raise ValueError(f"{n} tokens do not split evenly over {d} devices; pass source=")
    source = jnp.arange(n, dtype=jnp.int32) // (n // d)
  source = jnp.asarray(source)
  if source.shape != (n,) or not jnp.issubdtype(source.dtype, jnp.integer):
    raise ValueError(f"source must be an [N={n}] integer array, got "
                     f"{source.dtype.name}{list(source.shape)}")
  source = _as_int32(source, d)

  def count(index, valid, length):
    # bincount clips negative values into bin 0, so invalid entries go past the end instead.
    return jnp.bincount(jnp.where(valid, index, length).ravel(), length=length).astype(jnp.int32)

  in_range = lambda a, size: (a >= 0) & (a < size)
  from_device = in_range(source, d)[:, None]
  rows = jnp.stack([count(source[:, None] * e + i, from_device & in_range(i, e), d * e)
                    for i in ids]).reshape(len(ids), d, e)
  pairs = [count(a[:, :, None] * e + b[:, None, :],
                 in_range(a, e)[:, :, None] & in_range(b, e)[:, None, :], e * e)
           for a, b in zip(ids, ids[1:])]
  transitions = (jnp.stack(pairs).reshape(-1, e, e) if pairs
                 else jnp.zeros((0, e, e), jnp.int32))
  return RoutingStats(rows=rows, transitions=transitions)
