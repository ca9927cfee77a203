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
from jax_ccfuser._broadcasting import numpy_broadcasting
from jax_ccfuser._validation import (Operand, as_operand, axis_size, check_int, check_num_experts,
                                     known_now)


class Plan(NamedTuple):
  """Which device computes which rows of each expert; identical on every device of the group.

  The rows of expert e are ordered (source device, token, k). Worker slot s of e computes rows
  `[bounds[e, s], bounds[e, s + 1])`; slot 0 is the owner, unused slots are -1. With
  `replication`, these are the rows of e its own host computes.

  Attributes:
    workers: `[E, S + 1]` int32, slot 0 the owner, then S helpers; -1 unused.
    bounds: `[E, S + 2]` int32, the row boundaries of the slots (an expert without rows, or
      its unused slots, repeat a boundary: empty).
    shares: `[E, S + 1]` float32, each slot's fraction of e's rows (`reassign(previous=...)`).
    counts: `[E]` int32, the rows per expert the plan was made for.
    loads_before: `[D]` int32, the rows each device computes without the plan.
    loads_after: `[D]` int32, the rows each device computes with it.
    replication: hot experts computed on other hosts too (a `Replication`), or `None`.
  """
  workers: jax.Array
  bounds: jax.Array
  shares: jax.Array
  counts: jax.Array
  loads_before: jax.Array
  loads_after: jax.Array
  replication: "Replication | None" = None


class Replication(NamedTuple):
  """Hot experts materialised on the other hosts for one step (`reassign(..., replicas=R)`).

  Each device of a host whose load is over the threshold exports its R busiest experts to every
  other host (Hecate's sparse materialisation): the expert's rows, ordered (source device,
  token, k) over the whole group, are cut into one contiguous share per host, and each host
  computes its share with the expert's weights gathered into a guest slot of the device with
  the same rank. N hosts of P devices; guest slot q of device (b, c) holds the expert exported
  by device (o, c) in slot q % R, o = (b + 1 + q // R) % N. Identical on every device.

  Attributes:
    experts: `[N, P, R]` int32, the expert device (o, c) exports in its slot s; -1: none.
    shares: `[N, P, R, N + 1]` int32, host b computes that expert's rows
      `[shares[o, c, s, b], shares[o, c, s, b + 1])`.
    offsets: `[D, N, P, R]` int32, `offsets[d, o, c, s]` the exported expert's rows that come
      from the source devices before d (where d's own rows start in its order).
    workers: `[N, P, (N - 1) R, S + 1]` int32, who computes each guest slot's rows (as
      `Plan.workers`).
    bounds: `[N, P, (N - 1) R, S + 2]` int32, which of them each computes (as `Plan.bounds`).
  """
  experts: jax.Array
  shares: jax.Array
  offsets: jax.Array
  workers: jax.Array
  bounds: jax.Array


@numpy_broadcasting
def plan_loads(plan: Plan) -> tuple[jax.Array, jax.Array]:
  """Rows each device computes without and with `plan`.

  Args:
    plan: a `Plan` from `reassign`.

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


def _expert_counts(expert_ids, num_experts):
  """Rows per expert of these ids, `[E]` int32; ids outside `[0, E)` are not counted."""
  ids = expert_ids.reshape(-1)
  valid = (ids >= 0) & (ids < num_experts)
  counts = jnp.bincount(jnp.where(valid, ids, num_experts), length=num_experts + 1)[:-1]
  return counts.astype(jnp.int32)


def _device_loads(sizes, owner, workers, num_devices):
  """Rows per device: `sizes [E, S + 1]` rows of each slot, computed by `workers [E, S + 1]`."""
  dev = jnp.where(workers >= 0, workers, owner[:, None])
  return jnp.zeros(num_devices, jnp.int32).at[dev.reshape(-1)].add(
      sizes.reshape(-1).astype(jnp.int32))


def _kept_sizes(previous, counts):
  """Rows per slot for `counts`, `[E, S + 1]`, cut as `previous` cut its rows: its very slices
  where an expert's count is the one it was made for; else its cut points (cumulative shares)
  scaled and rounded, so the slices still ascend and add up to `counts`. Never sizes rebuilt
  from float32 shares one by one: floor(fl(s / n) * n) can be s - 1, and a plan kept step after
  step then drifted a row a helper a step, whole tiles no longer whole. The last slot in use
  ends at the count, as the handlers read a plan: float32 shares may add up to just under 1,
  and an expert with no rows then has none at all, so its rows would fall to unused slots."""
  cuts = jnp.round(jnp.cumsum(previous.shares, 1) * counts[:, None]).astype(jnp.int32)
  slot = jnp.arange(cuts.shape[1])
  last_used = jnp.max(jnp.where(previous.workers >= 0, slot, 0), 1, keepdims=True)
  cuts = jnp.where(slot >= last_used, counts[:, None], jnp.minimum(cuts, counts[:, None]))
  scaled = jnp.diff(cuts, axis=1, prepend=0)
  same = (previous.counts == counts)[:, None]
  return jnp.where(same, jnp.diff(previous.bounds, axis=1), scaled)


def _whole_tiles_from(position, count, tile):
  """The first row position at or after `position` from which `count` rows are whole tiles."""
  return count - (count - position) // tile * tile


def _balance(counts, num_devices, max_helpers, threshold, tile):
  """Water-filling: overloaded devices shed rows down to the mean, idle ones fill up to it.

  Every device with more than `threshold` times the mean keeps its smallest experts whole up to
  `target` (the mean rounded up) and sheds the rest, largest experts first. The shed rows, laid
  end to end (largest shed first), are cut into the spare room of the devices below `target`
  (most room first). Each cut moves to the nearest tile boundary counted from its expert's last
  row, so all of an expert's slices but one are whole tiles and no device ends `tile` or more
  rows over `target`. No loop over experts: sorts and cumulative sums over `[E]`, one `[E, D]`
  overlap.

  Args:
    counts: `[E]` int32, rows per expert; expert e lives on device `e // (E / D)`.

  Returns:
    `(workers [E, S + 1], sizes [E, S + 1])`, S = `max_helpers`: an expert keeps its
    `max_helpers` largest slices; its owner computes the rest.
  """
  e_total = counts.shape[0]
  owner = jnp.arange(e_total, dtype=jnp.int32) // (e_total // num_devices)
  per_device = counts.reshape(num_devices, -1)
  load = per_device.sum(1)
  mean = counts.sum() / num_devices
  target = -(-counts.sum() // num_devices)  # the mean rounded up, in exact integers

  # What each owner keeps: its smaller experts whole, then the one the target cuts up to a tile
  # boundary (at most tile - 1 rows over the target), none of the larger ones.
  smallest_first = jnp.argsort(per_device, axis=1, stable=True)
  ranked = jnp.take_along_axis(per_device, smallest_first, 1)
  keep = jnp.clip(target - (jnp.cumsum(ranked, 1) - ranked), 0, ranked)
  keep = jnp.where((keep > 0) & (keep < ranked), _whole_tiles_from(keep, ranked, tile), keep)
  keep = jnp.where((load > threshold * mean)[:, None], keep, ranked)
  rows = jnp.arange(num_devices)[:, None]
  # (Sums are int64 under jax_enable_x64: each scatter casts what it writes.)
  keep = jnp.zeros_like(per_device).at[rows, smallest_first].set(keep.astype(per_device.dtype))
  keep = keep.reshape(-1)
  shed = counts - keep

  # The shed rows of every expert end to end, and the room of the devices below the target.
  pieces = jnp.argsort(-shed, stable=True)
  piece_end = jnp.cumsum(shed[pieces])
  piece_start = piece_end - shed[pieces]
  room = jnp.maximum(target - load, 0)
  helpers = jnp.argsort(-room, stable=True).astype(jnp.int32)
  cut = jnp.cumsum(room[helpers])  # [D] where each helper's room ends
  # A cut inside an expert's piece moves to the nearest tile boundary of that expert (not before
  # the piece): each helper ends less than a tile over its room, since both its cuts move by at
  # most half a tile.
  i = jnp.minimum(jnp.searchsorted(piece_end, cut, side="left"), e_total - 1)
  e = pieces[i]
  at = keep[e] + cut - piece_start[i]  # the cut's row in expert e
  up = _whole_tiles_from(at, counts[e], tile)
  at = jnp.where(2 * (up - at) <= tile, up, jnp.maximum(up - tile, keep[e]))
  cut = jnp.where(cut < piece_end[-1], piece_start[i] + at - keep[e], piece_end[-1])
  start = jnp.concatenate([jnp.zeros(1, cut.dtype), cut[:-1]])
  overlap = (jnp.minimum(piece_end[:, None], cut[None, :])
             - jnp.maximum(piece_start[:, None], start[None, :]))
  amount = jnp.zeros((e_total, num_devices), jnp.int32).at[pieces].set(
      jnp.maximum(overlap, 0).astype(jnp.int32))

  # Slots: an expert's largest slices, the rest stays with its owner.
  largest = jnp.argsort(-amount, axis=1, stable=True)[:, :max_helpers]
  sizes = jnp.take_along_axis(amount, largest, 1)
  workers = jnp.where(sizes > 0, helpers[largest], -1)
  workers = jnp.concatenate([owner[:, None], workers], 1)
  sizes = jnp.concatenate([(counts - sizes.sum(1))[:, None], sizes], 1)
  return workers, sizes


def _exports(counts, split, replicas, threshold):
  """The experts each device of a host over `threshold` times the hosts' mean load exports: its
  `replicas` busiest with rows, `[N, P, R]` int32 (-1 for none)."""
  per_device = counts.reshape(split.num_hosts, split.per_host, -1)
  hot = per_device.sum((1, 2)) > threshold * counts.sum() / split.num_hosts
  busiest = jnp.argsort(-per_device, axis=2, stable=True)[..., :replicas].astype(jnp.int32)
  rows = jnp.take_along_axis(per_device, busiest, 2)
  first = jnp.arange(split.num_hosts * split.per_host, dtype=jnp.int32).reshape(
      split.num_hosts, split.per_host, 1) * per_device.shape[2]
  return jnp.where(hot[:, None, None] & (rows > 0), busiest + first, -1)


def _host_shares(counts, exported, num_hosts, tile):
  """Where each host's share of each exported expert's rows starts and ends, `[X, N + 1]`.

  Water-filling over hosts: the exported rows, laid end to end, fill the hosts below the level
  at which they are all placed (a host whose other rows are over it takes none), in host order;
  each boundary moves to the nearest tile of its expert, so a host's share is whole tiles.

  Args:
    counts: `[E]` int32 rows per expert.
    exported: `[X]` int32 exported experts, -1 for none.
  """
  rows = jnp.where(exported >= 0, counts[jnp.maximum(exported, 0)], 0)
  host = jnp.where(exported >= 0, exported // (counts.shape[0] // num_hosts), 0)
  fixed = counts.reshape(num_hosts, -1).sum(1) - jnp.zeros(num_hosts, jnp.int32).at[host].add(rows)
  movable = rows.sum()
  # The level: the largest (movable + the k lowest fixed loads) / k that is above the kth.
  lowest = jnp.sort(fixed)
  levels = (movable + jnp.cumsum(lowest)) / jnp.arange(1, num_hosts + 1)
  level = levels[jnp.sum(levels >= lowest) - 1]
  filled = jnp.floor(jnp.cumsum(jnp.maximum(level - fixed, 0)) + 0.5).astype(jnp.int32)
  cuts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.minimum(filled, movable)])
  cuts = cuts.at[-1].set(movable)
  start = jnp.cumsum(rows) - rows
  at = jnp.clip(cuts[None, :] - start[:, None], 0, rows[:, None])
  nearest = jnp.minimum((at + tile // 2) // tile * tile, rows[:, None])
  return jnp.where(at >= rows[:, None], at, nearest).astype(jnp.int32)


def _guest_rows(shares, num_hosts, per_host, replicas):
  """Rows each host computes in each guest slot, `[N, P, (N - 1) R]`, from the hosts' shares
  `[N, P, R, N]` (exporting host o, rank c, slot s, computing host b)."""
  by_host = jnp.moveaxis(shares, 3, 0)  # [b, o, c, s]
  others = (jnp.arange(num_hosts)[:, None] + 1 + jnp.arange(num_hosts - 1)) % num_hosts
  guests = jnp.take_along_axis(by_host, others[:, :, None, None], 1)  # [b, o-slot, c, s]
  return jnp.swapaxes(guests, 1, 2).reshape(num_hosts, per_host, (num_hosts - 1) * replicas)


def _replicate(source_counts, counts, split, replicas, threshold, tile):
  """The cross-host part of a plan: `(Replication without its in-host plan, rows per slot of each
  host's devices [N, P * (E_local + (N - 1) R)])`, own experts first on each device. `counts`:
  `source_counts` summed over the sources, `[E]`."""
  n, p = split.num_hosts, split.per_host
  experts = _exports(counts, split, replicas, threshold)
  flat = experts.reshape(-1)
  shares = _host_shares(counts, flat, n, tile)
  # Rows of exported expert x from the sources before each: where a pair's global order starts.
  per_source = jnp.where(flat >= 0, source_counts[:, jnp.maximum(flat, 0)], 0)
  offsets = (jnp.cumsum(per_source, 0) - per_source).reshape(-1, n, p, replicas)
  on_host = jnp.diff(shares, axis=1)  # [X, N]
  owner_host = jnp.maximum(flat, 0) // (counts.shape[0] // n)
  kept = jnp.take_along_axis(on_host, owner_host[:, None], 1)[:, 0]
  own = counts.at[jnp.where(flat >= 0, flat, counts.shape[0])].set(kept, mode="drop")
  guests = _guest_rows(on_host.reshape(n, p, replicas, n), n, p, replicas)
  slots = jnp.concatenate([own.reshape(n, p, -1), guests], 2).reshape(n, -1)
  empty = jnp.zeros((n, p, (n - 1) * replicas, 0), jnp.int32)
  return Replication(experts, shares.reshape(n, p, replicas, n + 1), offsets.astype(jnp.int32),
                     empty, empty), slots


@numpy_broadcasting
@jax.named_call
def reassign(expert_ids: Operand, num_experts: int, *, axis_name: str | None = None,
             max_helpers: int | None = None, threshold: float | jax.Array = 1.1, tile: int = 32,
             previous: Plan | None = None, replicas: int = 0) -> Plan:
  """Plans which devices compute which rows of each expert so device loads even out.

  Call it where `fused_moe` is called (inside the same `shard_map`), with the same
  `expert_ids`; every device derives the same plan from the global per-expert counts (one
  `[E]` int32 all-reduce). Jittable; static shapes.

  A device computing more than `threshold` times the mean rows sheds rows down to the mean, its
  largest experts first; the devices below the mean take them in slices cut at tile boundaries
  (water-filling, no loop over experts).

  Guarantee: with `max_helpers` at least the number of devices per host - 1 (the default), every
  device computes at most `max(threshold * mean, ceil(mean) + tile - 1)` rows, `mean` being the
  average over the devices of its host; with the defaults that is within
  `max(1.1 * mean, mean + tile)`, for any routing. An expert hands out at most `max_helpers`
  slices (its largest) and its owner computes the rest, so with fewer helpers the bound holds
  only when no expert's shed rows span more helpers than that; no plan at all can meet it when
  an expert has more than `(max_helpers + 1)` times the bound rows.

  Across hosts, helpers read the owner's weights from memory, so only the devices of an
  expert's host help it; `replicas` also moves rows between hosts: each device of a host over
  `threshold` times the hosts' mean exports its `replicas` busiest experts to every other host
  for this step (their weights gathered there, `R` experts per device over the hosts, and their
  weight gradients summed back on the owner), and the exported experts' rows are shared out so
  the hosts' loads even out (water-filling, in whole tiles); within each host the plan above
  then applies to its own and its guest experts. This costs a `[D, E]` int32 all-reduce
  instead of an `[E]` one, and each step moves `N * R` experts' weights to every device and
  their gradients back.

  Args:
    expert_ids: `[T, K]` int32, this device's routing.
    num_experts: E, a multiple of the axis size D.
    axis_name: the expert-parallel mesh axis, or `None` (one device: nothing to move).
    max_helpers: the most devices that may help one expert (S); default D - 1. Across hosts
      only the devices of the expert's host help (at most their number - 1).
    threshold: nothing moves from a device whose load is at most `threshold` times the mean
      (>= 1.0), nor from a host whose load is at most `threshold` times the hosts' mean.
    tile: the kernels' tile: all of an expert's slices but at most one are whole multiples of
      this many rows (splitting an expert adds no partial tile); a device may end up to
      `tile - 1` rows over the mean rounded up.
    previous: a plan from an earlier step; each host's slices (as fractions of each expert's
      rows) are kept while they hold its devices within the bound above, while its routing
      still asks for a plan (a device past the threshold) and while they leave its busiest
      device no more rows than no plan would, so plans change only when the routing has
      moved. Kept for counts other than its own, its slices are those fractions of
      the new counts, rounded: no longer whole tiles. Not with `replicas` across hosts
      (exports are chosen every step).
    replicas: R, the experts each device may export to the other hosts per step, from 0 (rows
      stay on their expert's host) to E_local. Only when the axis spans hosts; ignored on one.

  Returns:
    A `Plan` (a pytree of arrays) for `fused_moe(..., plan=plan)`.

  Examples:
    Every token picks expert 0 first, so device 0 (experts 0 and 1 of 16) computes 288 of the
    512 rows; the plan shares them out:

    >>> from jax.sharding import AxisType, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("ep",), axis_types=(AxisType.Auto,))
    >>> ids = jnp.stack([jnp.zeros(256, jnp.int32), jnp.arange(256, dtype=jnp.int32) % 16], 1)
    >>> def loads(ids):  # per device: ids [32, 2]
    ...   plan = jax_ccfuser.reassign(ids, 16, axis_name="ep")
    ...   return jax_ccfuser.plan_loads(plan)
    >>> before, after = jax.jit(jax.shard_map(loads, mesh=mesh, in_specs=P("ep"),
    ...                                       out_specs=P()))(ids)
    >>> before.tolist(), after.tolist()
    ([288, 32, 32, 32, 32, 32, 32, 32], [64, 64, 64, 64, 64, 64, 64, 64])

    The layer then runs `fused_moe(x, ids, weights, w_in, w_out, axis_name="ep", plan=plan)`
    in the same `shard_map`.
  """
  num_devices = axis_size(axis_name)
  experts_local = check_num_experts(num_experts, num_devices)
  expert_ids = as_operand("expert_ids", expert_ids)
  if expert_ids.ndim != 2 or expert_ids.dtype != jnp.int32:
    raise ValueError(f"expert_ids must be [T, K] int32, got {expert_ids.dtype} {expert_ids.shape}")
  max_helpers = num_devices - 1 if max_helpers is None else check_int("max_helpers", max_helpers)
  check_int("tile", tile)
  check_int("replicas", replicas)
  if not 0 <= max_helpers <= num_devices - 1:
    raise ValueError(f"max_helpers must be in [0, {num_devices - 1}] (the other devices), "
                     f"got {max_helpers}")
  # A traced threshold (scheduled) is the caller's to keep >= 1; the tile is an int32 row count.
  known = known_now(threshold)
  if (not 1 <= tile <= np.iinfo(np.int32).max or isinstance(threshold, bool) or
      (known is not None and not (known.ndim == 0 and known >= 1.0))):  # NaN too
    raise ValueError(f"tile must be in [1, 2^31) and threshold a number >= 1.0, got {tile} and "
                     f"{threshold!r}")
  if not 0 <= replicas <= experts_local:
    raise ValueError(f"replicas must be in [0, {experts_local}] (a device's experts), "
                     f"got {replicas}")
  split = _topology.split(axis_name, num_devices)
  replicas = replicas if split.num_hosts > 1 else 0
  counts = _expert_counts(expert_ids, num_experts)
  if axis_name is None:
    source = counts[None]
  elif replicas:
    # Each device's row of [D, E], summed: the same on every device, as a psum is typed.
    rank = jax.lax.axis_index(axis_name)
    source = jax.lax.psum(jnp.zeros((num_devices, num_experts), jnp.int32).at[rank].set(counts),
                          axis_name)
  else:
    source = jax.lax.psum(counts, axis_name)[None]
  # The planner mixes its int32 counts with float means and thresholds as NumPy would; a
  # caller's jax.numpy_dtype_promotion("strict") is for the caller's own code.
  with jax.numpy_dtype_promotion("standard"):
    return _plan(source, split, max_helpers=max_helpers, threshold=threshold, tile=tile,
                 previous=previous, replicas=replicas)


def _plan(source_counts, split, *, max_helpers, threshold, tile, previous, replicas=0):
  """`reassign`'s plan over the hosts of `split` from the rows per expert of each source device,
  `[D, E]` int32 (or their sum, `[1, E]`, when `replicas` is 0)."""
  counts = source_counts.sum(0, dtype=jnp.int32)
  num_experts = counts.shape[0]
  num_hosts, per_host = split.num_hosts, split.per_host
  num_devices = num_hosts * per_host
  experts_local = num_experts // num_devices
  owner = jnp.arange(num_experts, dtype=jnp.int32) // experts_local
  loads_before = jnp.zeros(num_devices, jnp.int32).at[owner].add(counts)
  if replicas and previous is not None:
    raise ValueError("previous and replicas do not combine: the experts a host exports are "
                     "chosen afresh every step")
  replication = None
  slots = counts.reshape(num_hosts, -1)  # each host's slots: its devices' experts
  if replicas:
    replication, slots = _replicate(source_counts, counts, split, replicas, threshold, tile)
  # A helper reads the owner's weights from memory: only devices of the owner's host can help,
  # so each host balances its own (and guest) experts (one host: the whole axis).
  max_helpers = min(max_helpers, per_host - 1)
  workers, sizes = jax.vmap(lambda c: _balance(c, per_host, max_helpers, threshold, tile))(slots)
  first = (jnp.arange(num_hosts, dtype=jnp.int32) * per_host)[:, None, None]
  workers = jnp.where(workers >= 0, workers + first, -1).reshape(-1, workers.shape[2])
  sizes = sizes.reshape(workers.shape)
  slot_owner = jnp.arange(workers.shape[0], dtype=jnp.int32) // (workers.shape[0] // num_devices)
  if previous is not None:
    if previous.workers.shape != workers.shape or previous.loads_before.shape != (num_devices,):
      raise ValueError(f"previous plan was made for a group of {previous.loads_before.shape[0]} "
                       f"with workers {previous.workers.shape}, this one for {num_devices} with "
                       f"{workers.shape}: the same devices, num_experts and max_helpers are "
                       f"needed")
    kept = _kept_sizes(previous, counts)
    kept_loads = _device_loads(kept, owner, previous.workers, num_devices)
    # Each host's part is kept (its helpers are its own devices) while its devices stay within
    # `reassign`'s bound for the host, while its routing still asks for a plan (a new one would
    # move rows), and never above no plan's busiest device: kept after the routing evened out,
    # a plan once moved rows off devices at the mean, leaving the busiest above it.
    by_host = lambda loads: loads.reshape(num_hosts, per_host)
    fresh, before, kept_loads = map(by_host, (
        _device_loads(sizes, slot_owner, workers, num_devices), loads_before, kept_loads))
    total = kept_loads.sum(1, keepdims=True)
    bound = jnp.maximum(threshold * total / per_host, -(-total // per_host) + tile - 1)
    reuse = (jnp.all(kept_loads <= bound, 1) & jnp.any(fresh != before, 1)
             & (kept_loads.max(1) <= before.max(1)))
    reuse = jnp.repeat(reuse, num_experts // num_hosts)[:, None]  # per expert (row), host-major
    workers = jnp.where(reuse, previous.workers, workers)
    sizes = jnp.where(reuse, kept, sizes)
  loads_after = _device_loads(sizes, slot_owner, workers, num_devices)
  bounds = jnp.concatenate([jnp.zeros((sizes.shape[0], 1), jnp.int32), jnp.cumsum(sizes, 1)],
                           1).astype(jnp.int32)
  if replication is not None:
    # Each device's slots: its own experts, then its guests.
    by_device = lambda a: a.reshape(num_hosts, per_host, -1, a.shape[1])
    workers, bounds, sizes = map(by_device, (workers, bounds, sizes))
    replication = replication._replace(workers=workers[:, :, experts_local:],
                                       bounds=bounds[:, :, experts_local:])
    workers, bounds, sizes = (a[:, :, :experts_local].reshape(num_experts, -1)
                              for a in (workers, bounds, sizes))
  shares = (sizes / jnp.maximum(sizes.sum(1), 1)[:, None]).astype(jnp.float32)
  if previous is not None:  # a kept plan keeps its fractions: roundings never pile up
    shares = jnp.where(reuse, previous.shares, shares)
  return Plan(workers=workers, bounds=bounds, shares=shares, counts=counts,
              loads_before=loads_before, loads_after=loads_after, replication=replication)
