"""Jittable expert reassignment: idle devices take over slices of hot experts' rows.

An equivalent graph transformation (CCFuser section 4): no token is dropped and no capacity is
imposed; a helper device computes a slice of an expert's rows with the weights it reads from the
owner's memory, and the owner adds the helper's partial weight gradients in a fixed order. With
a plan, `fused_moe` gives the same results as without one, up to float reassociation.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ccfuser import _topology
from jax_ccfuser._validation import axis_size, check_num_experts


class Plan(NamedTuple):
  """Which device computes which rows of each expert; identical on every device of the group.

  The rows of expert e are ordered (source device, token, k). Worker slot s of e computes rows
  `[bounds[e, s], bounds[e, s + 1])`; slot 0 is the owner, unused slots are -1.
  """
  workers: jax.Array       # [E, S + 1] int32: slot 0 the owner, then helpers; -1 unused
  bounds: jax.Array        # [E, S + 2] int32: row boundaries of the slots
  shares: jax.Array        # [E, S + 1] float32: each slot's fraction of e's rows (for reuse)
  counts: jax.Array        # [E] int32: rows per expert the plan was made for
  loads_before: jax.Array  # [D] int32: rows each device computes without the plan
  loads_after: jax.Array   # [D] int32: ... and with it


def plan_loads(plan: Plan):
  """Rows each device computes without and with `plan`.

  Returns:
    `(loads_before, loads_after)`, each int32 `[D]`.
  """
  return plan.loads_before, plan.loads_after


def identity_workers(num_experts: int, num_devices: int):
  """The trivial plan's `(workers [E, 1], bounds [E, 2])`: every expert's rows on its owner."""
  owner = np.arange(num_experts, dtype=np.int32) // (num_experts // num_devices)
  bounds = np.zeros((num_experts, 2), np.int32)
  bounds[:, 1] = np.iinfo(np.int32).max
  return jnp.asarray(owner[:, None]), jnp.asarray(bounds)


def _expert_counts(expert_ids, num_experts, axis_name):
  """Global rows per expert, `[E]` int32; ids outside `[0, E)` are not counted."""
  ids = expert_ids.reshape(-1)
  valid = (ids >= 0) & (ids < num_experts)
  counts = jnp.bincount(jnp.where(valid, ids, num_experts), length=num_experts + 1)[:-1]
  counts = counts.astype(jnp.int32)
  return counts if axis_name is None else jax.lax.psum(counts, axis_name)


def _device_loads(sizes, owner, workers, num_devices):
  """Rows per device: `sizes [E, S + 1]` rows of each slot, computed by `workers [E, S + 1]`."""
  dev = jnp.where(workers >= 0, workers, owner[:, None])
  return jnp.zeros(num_devices, jnp.int32).at[dev.reshape(-1)].add(sizes.reshape(-1))


def _sizes_from_shares(shares, counts):
  """Rows per slot for `counts` split by `shares`; rounding remainders stay with the owner."""
  sizes = jnp.floor(shares * counts[:, None]).astype(jnp.int32)
  return sizes.at[:, 0].add(counts - sizes.sum(1))


def _balance(counts, num_devices, max_helpers, threshold, tile):
  """Greedy: hottest experts first, an overloaded owner hands slices to the least-loaded devices.

  Returns:
    `(workers [E, S + 1], sizes [E, S + 1])`.
  """
  e_total = counts.shape[0]
  owner = jnp.arange(e_total, dtype=jnp.int32) // (e_total // num_devices)
  load = jnp.zeros(num_devices, jnp.int32).at[owner].add(counts)
  mean = counts.sum() / num_devices
  target = jnp.ceil(mean).astype(jnp.int32)
  workers = jnp.full((e_total, max_helpers + 1), -1, jnp.int32).at[:, 0].set(owner)
  sizes = jnp.zeros((e_total, max_helpers + 1), jnp.int32).at[:, 0].set(counts)
  order = jnp.argsort(-counts, stable=True)

  def move(i, state):
    load, workers, sizes = state
    e = order[i]
    d = owner[e]
    used = jnp.int32(0)
    for _ in range(max_helpers):
      h = jnp.argmin(load).astype(jnp.int32)  # ties: the lowest device id
      kept = sizes[e, 0]
      amount = jnp.minimum(jnp.minimum(load[d] - target, target - load[h]), kept)
      # Slices are whole tiles, except one that takes all the owner still keeps.
      amount = jnp.where(amount < kept, amount // tile * tile, amount)
      ok = (load[d] > threshold * mean) & (h != d) & (amount > 0)
      amount = jnp.where(ok, amount, 0)
      slot = used + 1  # helpers fill the slots in order, so the first -1 ends the list
      workers = workers.at[e, slot].set(jnp.where(ok, h, workers[e, slot]))
      sizes = sizes.at[e, slot].add(amount).at[e, 0].add(-amount)
      load = load.at[h].add(amount).at[d].add(-amount)
      used = used + ok
    return load, workers, sizes

  _, workers, sizes = jax.lax.fori_loop(0, e_total, move, (load, workers, sizes))
  return workers, sizes


def reassign(expert_ids, num_experts: int, *, axis_name=None, max_helpers: int | None = None,
             threshold: float = 1.1, tile: int = 32, previous: Plan | None = None) -> Plan:
  """Plans which devices compute which rows of each expert so device loads even out.

  Call it where `fused_moe` is called (inside the same `shard_map`), with the same
  `expert_ids`; every device derives the same plan from the global per-expert counts (one
  `[E]` int32 all-reduce). Jittable; static shapes.

  Args:
    expert_ids: `[T, K]` int32, this device's routing.
    num_experts: E, a multiple of the axis size D.
    axis_name: the expert-parallel mesh axis, or `None` (one device: nothing to move).
    max_helpers: the most devices that may help one expert (S); default D - 1. Across hosts
      only the devices of the expert's host help (at most their number - 1).
    threshold: nothing moves from a device whose load is at most `threshold` times the mean.
    tile: helpers' slices are whole multiples of this many rows (the kernels' tile).
    previous: a plan from an earlier step; its slices (as fractions of each expert's rows) are
      kept while they hold every device within `threshold` of the mean, so plans change only
      when the routing has moved.

  Returns:
    A `Plan` (a pytree of arrays) for `fused_moe(..., plan=plan)`.

  Examples:
    >>> plan = jax_ccfuser.reassign(ids, 64, axis_name="ep")
    >>> y = jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out, axis_name="ep", plan=plan)
    >>> before, after = jax_ccfuser.plan_loads(plan)
  """
  num_devices = axis_size(axis_name)
  experts_local = check_num_experts(num_experts, num_devices)
  if expert_ids.ndim != 2 or expert_ids.dtype != jnp.int32:
    raise ValueError(f"expert_ids must be [T, K] int32, got {expert_ids.dtype} {expert_ids.shape}")
  max_helpers = num_devices - 1 if max_helpers is None else max_helpers
  if not 0 <= max_helpers <= num_devices - 1:
    raise ValueError(f"max_helpers must be in [0, {num_devices - 1}] (the other devices), "
                     f"got {max_helpers}")
  if tile < 1 or threshold < 1.0:
    raise ValueError(f"tile must be >= 1 and threshold >= 1.0, got {tile} and {threshold}")
  counts = _expert_counts(expert_ids, num_experts, axis_name)
  owner = jnp.arange(num_experts, dtype=jnp.int32) // experts_local
  loads_before = jnp.zeros(num_devices, jnp.int32).at[owner].add(counts)
  split = _topology.split(axis_name, num_devices)
  if split.num_hosts > 1:
    # A helper reads the owner's weights from memory: only devices of the owner's host can help,
    # so each host balances its own experts.
    max_helpers = min(max_helpers, split.per_host - 1)
    workers, sizes = jax.vmap(lambda c: _balance(c, split.per_host, max_helpers, threshold, tile))(
        counts.reshape(split.num_hosts, -1))
    first = (jnp.arange(split.num_hosts, dtype=jnp.int32) * split.per_host)[:, None, None]
    workers = jnp.where(workers >= 0, workers + first, -1).reshape(num_experts, -1)
    sizes = sizes.reshape(num_experts, -1)
  else:
    workers, sizes = _balance(counts, num_devices, max_helpers, threshold, tile)
  if previous is not None:
    if previous.workers.shape != workers.shape:
      raise ValueError(f"previous plan has shape {previous.workers.shape}, this one "
                       f"{workers.shape}: same num_experts and max_helpers are needed")
    kept = _sizes_from_shares(previous.shares, counts)
    kept_loads = _device_loads(kept, owner, previous.workers, num_devices)
    reuse = kept_loads.max() <= threshold * counts.sum() / num_devices
    workers = jnp.where(reuse, previous.workers, workers)
    sizes = jnp.where(reuse, kept, sizes)
  bounds = jnp.concatenate([jnp.zeros((num_experts, 1), jnp.int32), jnp.cumsum(sizes, 1)], 1)
  shares = sizes / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)
  return Plan(workers=workers, bounds=bounds.astype(jnp.int32), shares=shares.astype(jnp.float32),
              counts=counts, loads_before=loads_before,
              loads_after=_device_loads(sizes, owner, workers, num_devices))
