"""Choosing a placement from statistics: the per-layer ILP (HiGHS), greedy, and their score."""

import time
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from jax_ccfuser._validation import check_num_experts
from jax_ccfuser.placement._permute import check_perms
from jax_ccfuser.placement._stats import RoutingStats

METHODS = ("ilp", "greedy")


class Solution(NamedTuple):
  """A placement of every layer's experts, from `solve`.

  Attributes:
    perms: `[L, E]` int32, `perms[l, s]` the old expert that new slot s of layer l gets.
    methods: `L` strings, how each layer was placed: "ilp", "ilp (time limit)", "greedy" or
      "identity" (see `solve`).
    seconds: `L` floats, the wall time spent placing each layer.
  """
  perms: np.ndarray
  methods: tuple[str, ...]
  seconds: tuple[float, ...]


class Score(NamedTuple):
  """How a placement fares on routing statistics, per layer (a layer without rows or
  transitions: 0 remote and crossing, load 1).

  Attributes:
    remote_fraction: `[L]` float64, the share of rows computed on another device than theirs.
    max_load: `[L]` float64, the rows of the busiest device over the mean (1: even).
    cross_fraction: `[L - 1]` float64, the share of transitions that change device.
  """
  remote_fraction: np.ndarray
  max_load: np.ndarray
  cross_fraction: np.ndarray


def _counts(stats: RoutingStats) -> tuple[np.ndarray, np.ndarray]:
  """`stats`' rows `[L, D, E]` and transitions `[L - 1, E, E]` as float64, checked."""
  rows, transitions = np.asarray(stats.rows, np.float64), np.asarray(stats.transitions, np.float64)
  if rows.ndim != 3:
    raise ValueError(f"stats.rows must be [L, D, E], got {list(rows.shape)}")
  num_layers, _, e = rows.shape
  if transitions.shape != (num_layers - 1, e, e):
    raise ValueError(f"stats.transitions must be [L - 1, E, E] = {[num_layers - 1, e, e]} for "
                     f"rows {list(rows.shape)}, got {list(transitions.shape)}")
  if not (np.isfinite(rows).all() and np.isfinite(transitions).all()
          and (rows == np.round(rows)).all() and (transitions == np.round(transitions)).all()):
    raise ValueError("stats must hold whole counts (NaN, infinite or fractional ones found)")
  if (rows < 0).any() or (transitions < 0).any():
    raise ValueError("stats hold negative counts: an int32 total that passed 2**31 - 1 wraps "
                     "around (start new totals more often)")
  return rows, transitions


def _devices_of(perm: np.ndarray, experts_local: int) -> np.ndarray:
  """`[E]`: the device that holds each old expert under `perm`."""
  devices = np.empty_like(perm)
  devices[perm] = np.arange(len(perm)) // experts_local
  return devices


def _device_loads(devices: np.ndarray, load: np.ndarray, d: int) -> np.ndarray:
  """`[D]`: the summed `load` `[E]` of each device's experts, at the placement `devices` `[E]`."""
  return np.bincount(devices, weights=load, minlength=d)


def _share(part, whole, empty: float = 0.0) -> float:
  return float(part / whole) if whole else empty


def score(stats: RoutingStats, perms: npt.ArrayLike | None = None) -> Score:
  """Measures a placement on `stats`: remote rows, device load and separated transitions.

  Args:
    stats: `RoutingStats` with `[L, D, E]` rows.
    perms: `[L, E]` integer, `perms[l, s]` the old expert placed at slot s (`Solution.perms`);
      `None`: the identity (the placement the statistics were recorded under).

  Returns:
    A `Score` (per-layer numpy arrays).

  Examples:
    >>> from jax_ccfuser import placement
    >>> ids = jnp.array([[2, 3]] * 4 + [[0, 1]] * 4)  # device 0's 4 tokens, then device 1's
    >>> stats = placement.routing_stats([ids, ids], num_experts=4, num_devices=2)
    >>> placement.score(stats)  # every row computed on the other device
    Score(remote_fraction=array([1., 1.]), max_load=array([1., 1.]), cross_fraction=array([0.]))
    >>> placement.score(stats, placement.solve(stats, 2).perms).remote_fraction
    array([0., 0.])
  """
  rows, transitions = _counts(stats)
  num_layers, d, e = rows.shape
  experts_local = check_num_experts(e, d)
  perms = (np.tile(np.arange(e), (num_layers, 1)) if perms is None
           else check_perms(perms, num_layers, e))
  devices = [_devices_of(p, experts_local) for p in perms]
  remote, max_load, cross = [], [], []
  for layer in range(num_layers):
    r = rows[layer]
    local = r[devices[layer], np.arange(e)].sum()
    remote.append(_share(r.sum() - local, r.sum()))
    loads = _device_loads(devices[layer], r.sum(axis=0), d)
    max_load.append(_share(loads.max(), loads.mean(), empty=1.0))
  for layer in range(num_layers - 1):
    separated = devices[layer][:, None] != devices[layer + 1][None, :]
    cross.append(_share(transitions[layer][separated].sum(), transitions[layer].sum()))
  return Score(np.asarray(remote), np.asarray(max_load), np.asarray(cross))


def _greedy(rows: np.ndarray, experts_local: int) -> np.ndarray:
  """CCFuser's placement: hottest expert first, onto the open device that sends it most rows.

  Args:
    rows: `[D, E]` float64, rows per (source device, expert).
    experts_local: how many experts each device holds.

  Returns:
    `[E]`: each expert's device.
  """
  d, e = rows.shape
  devices, free, load = np.empty(e, np.int64), np.full(d, experts_local), np.zeros(d)
  for expert in np.argsort(-rows.sum(axis=0), kind="stable"):
    candidates = np.flatnonzero(free)
    # Most rows first; ties to the least loaded device, then the lowest index.
    best = candidates[np.lexsort((candidates, load[candidates], -rows[candidates, expert]))[0]]
    devices[expert] = best
    free[best] -= 1
    load[best] += rows[:, expert].sum()
  return devices


def _objective(cost: np.ndarray, load: np.ndarray, devices: np.ndarray, *,
               balance_weight: float) -> float:
  """The ILP's objective (`_ilp`) at a placement `devices` `[E]`."""
  d = cost.shape[1]
  busiest = _device_loads(devices, load, d).max()
  return float(cost[np.arange(len(devices)), devices].sum() + balance_weight * d * busiest)


def _total(rows: np.ndarray, transitions: np.ndarray, devices: list, *, balance_weight: float,
           transition_weight: float) -> float:
  """`solve`'s whole objective at the placements `devices` (`[E]` each, every layer's)."""
  d = rows.shape[1]
  total = 0.0
  for r, p in zip(rows, devices):
    busiest = _device_loads(p, r.sum(axis=0), d).max()
    total += r.sum() - r[p, np.arange(len(p))].sum() + balance_weight * d * busiest
  for t, p, q in zip(transitions, devices, devices[1:]):
    total += transition_weight * t[p[:, None] != q[None, :]].sum()
  return float(total)


def _ilp(cost: np.ndarray, load: np.ndarray, experts_local: int, *, balance_weight: float,
         time_limit: float, gap: float) -> tuple[np.ndarray | None, bool]:
  """Solves one layer's placement with HiGHS.

  Binary `x[e, d]` (expert e on device d) with `sum_d x[e, d] = 1` and
  `sum_e x[e, d] = E_local`; continuous `z >= sum_e load[e] * x[e, d]` for every d. Minimises
  `sum cost[e, d] * x[e, d] + balance_weight * D * z`.

  Args:
    cost: `[E, D]` float64, what putting expert e on device d costs.
    load: `[E]` float64, rows per expert.
    experts_local: E_local.
    balance_weight: weight of `D * z`.
    time_limit: seconds HiGHS may take.
    gap: relative optimality gap at which HiGHS may stop.

  Returns:
    `(devices, optimal)`: each expert's device `[E]` (`None` when HiGHS found no placement in
    time) and whether HiGHS proved it within `gap` of the optimum.
  """
  # scipy.optimize takes about a second to import; only this solver needs it.
  from scipy import optimize, sparse

  e, d = cost.shape
  n = e * d  # x[e, d] is variable e * d + d; z is variable n
  scale = max(load.sum(), 1.0)  # objective in units of the layer's rows, near 1
  objective = np.append(cost.ravel(), balance_weight * d) / scale
  experts, devices = np.divmod(np.arange(n), d)
  once = sparse.csr_array((np.ones(n), (experts, np.arange(n))), shape=(e, n + 1))
  per_device = sparse.csr_array((np.ones(n), (devices, np.arange(n))), shape=(d, n + 1))
  device_load = sparse.csr_array(
      (np.append(load[experts], -np.ones(d)), (np.append(devices, np.arange(d)),
                                               np.append(np.arange(n), np.full(d, n)))),
      shape=(d, n + 1))
  result = optimize.milp(
      objective, integrality=np.append(np.ones(n), 0),
      bounds=optimize.Bounds(np.zeros(n + 1), np.append(np.ones(n), np.inf)),
      constraints=[optimize.LinearConstraint(once, 1, 1),
                   optimize.LinearConstraint(per_device, experts_local, experts_local),
                   optimize.LinearConstraint(device_load, -np.inf, 0)],
      options={"time_limit": time_limit, "mip_rel_gap": gap, "disp": False})
  # Status 0: solved within the gap; 1: stopped at the time limit, with the best placement found
  # so far in `x` if it found one. The model is always feasible and bounded.
  if result.x is None:
    return None, False
  return np.argmax(result.x[:n].reshape(e, d), axis=1), result.status == 0


def _no_worse(unmoved: np.ndarray, placed: np.ndarray, rows: np.ndarray, value,
              method: str) -> bool:
  """Whether the placement `unmoved` does as well as `placed` (each `[E]`, an expert's device) by
  the method's measure: the ILP's objective `value`; greedy's remote rows (of `rows` `[D, E]`),
  then its busiest device (its rule for ties)."""
  if method == "ilp":
    return value(unmoved) <= value(placed) * (1 + 1e-9)  # the objective is >= 0
  d = rows.shape[0]
  local = lambda p: rows[p, np.arange(len(p))].sum()
  busiest = lambda p: _device_loads(p, rows.sum(axis=0), d).max()
  return (-local(unmoved), busiest(unmoved)) <= (-local(placed), busiest(placed))


def _layer_cost(rows: np.ndarray, transitions: np.ndarray, devices: list, layer: int, *,
                transition_weight: float) -> np.ndarray:
  """`[E, D]` float64: what putting each expert of `layer` on each device costs, given the
  placements `devices` (`[E]` or `None` each) of the other layers: its rows that start elsewhere,
  plus `transition_weight` times its transitions from and to placed neighbours that would change
  device."""
  r = rows[layer]
  d = r.shape[0]
  cost = r.sum(axis=0)[:, None] - r.T
  if layer > 0 and devices[layer - 1] is not None:
    t = transitions[layer - 1]  # [E_prev, E]
    staying = (np.eye(d)[devices[layer - 1]].T @ t).T  # [E, D]: from experts on d into e
    cost += transition_weight * (t.sum(axis=0)[:, None] - staying)
  if layer + 1 < len(devices) and devices[layer + 1] is not None:
    t = transitions[layer]  # [E, E_next]
    staying = t @ np.eye(d)[devices[layer + 1]]  # [E, D]: from e into experts on d
    cost += transition_weight * (t.sum(axis=1)[:, None] - staying)
  return cost


def solve(stats: RoutingStats, num_devices: int, *, method: str = "ilp", time_limit: float = 10.0,
          gap: float = 1e-3, balance_weight: float = 1.0, transition_weight: float = 0.5,
          sweeps: int = 3) -> Solution:
  """Places every layer's experts on the devices from routing statistics.

  `method="ilp"` (MoETuner-style) minimises, over binary `x_l[e, d]` (each expert on exactly one
  device, each device exactly E_local experts),

      sum_l  remote rows                    sum_{e, d} sum_{src != d} rows_l[src, e] * x_l[e, d]
           + balance_weight * D * z_l       (continuous z_l >= sum_e rows_l[:, e].sum() * x_l[e, d])
           + transition_weight * the transitions of l -> l + 1 whose two experts differ in device

  The busiest device's rows count D times because every device waits for it. The cross-layer
  term couples the layers; instead of linearising it with `E * E * D` more variables per layer
  pair, the layers are solved one at a time as integer programs of `E * D` binaries, each given
  the current placement of its neighbours (for which the term is linear): a first pass in
  layer order sees only the layer before, then up to `sweeps` more passes re-solve every layer
  given both neighbours and keep a placement only if it lowers that layer's cost (block
  coordinate descent: the total never rises, it stops when a pass changes nothing). It reaches
  a placement no single layer can improve, not necessarily the joint optimum; where that total
  exceeds the identity's, every layer is left where it was.

  HiGHS stops once it proves a placement within `gap` (relative) of the optimum of the layer's
  program. Where it reaches `time_limit` first (a limit on each of a layer's programs: one per
  pass, so up to `L * (1 + sweeps)` of them in all), the layer gets HiGHS's best placement so far if
  that costs less than the greedy one, and the greedy one otherwise (also when HiGHS found
  none); `Solution.methods` says which. A placement found within the time limit depends on
  the machine's speed and load: in a job of several processes, solve on one and hand its
  `perms` to the others (or use greedy, which depends on the counts alone), so that every
  process moves the same experts.

  `method="greedy"` (CCFuser-style): hottest expert first, each onto the device with a free slot
  that sends it most rows (ties to the least loaded). It ignores the balance and cross-layer
  weights.

  Either method keeps a layer's experts where they are when that costs no more by its measure
  (the ILP's objective; greedy's remote rows, then its busiest device), as where routing is
  uniform or absent and every placement ties. Within a device, experts keep their old order,
  so the identity is returned where nothing moves.

  Args:
    stats: `RoutingStats` recorded under the current placement, over `num_devices` devices.
    num_devices: D, the expert-parallel group; must equal the statistics' and divide E.
    method: "ilp" or "greedy".
    time_limit: seconds HiGHS may spend on each program (a layer's, in each pass).
    gap: relative optimality gap at which HiGHS stops (proving the last fraction of a percent
      of a min-max objective can take orders of magnitude longer than finding it).
    balance_weight: weight of D times the busiest device's rows.
    transition_weight: weight of each cross-layer transition that changes device (counted once
      per (k, k') pair of a token); 0 makes the layers independent.
    sweeps: passes over the layers after the first (only with the cross-layer term).

  Returns:
    A `Solution`: `perms` `[L, E]` int32 (`perms[l, s]` the old expert for new slot s, slot s on
    device `s // E_local`); per layer, the method that placed it ("ilp": proven within `gap`;
    "ilp (time limit)": HiGHS's best when time ran out; "greedy"; "identity": left where it
    was, no placement found costing less) and the seconds spent on it.

  Examples:
    >>> from jax_ccfuser import placement
    >>> ids = jnp.array([[2, 3]] * 4 + [[0, 1]] * 4)  # device 0's 4 tokens, then device 1's
    >>> stats = placement.routing_stats([ids, ids], num_experts=4, num_devices=2)
    >>> solution = placement.solve(stats, 2, method="ilp", time_limit=5.0)
    >>> solution.perms.tolist(), solution.methods  # "greedy" where a layer fell back
    ([[2, 3, 0, 1], [2, 3, 0, 1]], ('ilp', 'ilp'))
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  num_layers, d, e = stats.rows.shape
  if num_devices != d:
    raise ValueError(f"the statistics were recorded over {d} devices, not num_devices="
                     f"{num_devices}")
  experts_local = check_num_experts(e, d)
  # `not x >= 0` refuses NaN too; an infinite weight leaves HiGHS no finite objective.
  if (not time_limit > 0 or not gap >= 0 or not 0 <= balance_weight < np.inf
      or not 0 <= transition_weight < np.inf or not isinstance(sweeps, (int, np.integer))
      or sweeps < 0):
    raise ValueError(f"need time_limit > 0, a non-negative gap, finite non-negative weights and "
                     f"sweeps (an int), "
                     f"got time_limit={time_limit}, gap={gap}, balance_weight={balance_weight}, "
                     f"transition_weight={transition_weight}, sweeps={sweeps}")
  rows, transitions = _counts(stats)
  devices = [None] * num_layers  # [E] each: the device of every expert, once placed
  unmoved = np.arange(e) // experts_local
  methods, seconds = ["greedy"] * num_layers, [0.0] * num_layers
  passes = 1 + (sweeps if method == "ilp" and transition_weight and num_layers > 1 else 0)
  for sweep in range(passes):
    changed = False
    for layer in range(num_layers):
      began = time.perf_counter()
      load = rows[layer].sum(axis=0)
      if devices[layer] is None:
        devices[layer], changed = _greedy(rows[layer], experts_local), True
      cost = _layer_cost(rows, transitions, devices, layer, transition_weight=transition_weight)
      value = lambda p: _objective(cost, load, p, balance_weight=balance_weight)
      if method == "ilp":
        found, optimal = _ilp(cost, load, experts_local, balance_weight=balance_weight,
                              time_limit=time_limit, gap=gap)
        # The first pass takes a proven placement outright; later ones only a cheaper one.
        take = optimal and sweep == 0
        if found is not None and (take or value(found) < value(devices[layer])):
          devices[layer], changed = found, True
          methods[layer] = "ilp" if optimal else "ilp (time limit)"
      # Moving an expert moves its weights and optimizer state: where ties abound (no rows,
      # uniform routing) any placement is optimal, and the one they have costs nothing to keep.
      if (not np.array_equal(devices[layer], unmoved)
          and _no_worse(unmoved, devices[layer], rows[layer], value, method)):
        devices[layer], changed = unmoved, True
        if methods[layer] != "ilp":  # proven: the identity ties an optimum
          methods[layer] = "identity"
      seconds[layer] += time.perf_counter() - began
    if not changed:
      break
  # The first pass places each layer seeing only the one before, and the descent may settle
  # where leaving everything in place costs less: then it does.
  weights = dict(balance_weight=balance_weight, transition_weight=transition_weight)
  if method == "ilp" and (_total(rows, transitions, [unmoved] * num_layers, **weights)
                          <= _total(rows, transitions, devices, **weights) * (1 - 1e-9)):
    devices, methods = [unmoved] * num_layers, ["identity"] * num_layers
  # Sorting by device keeps the old order within a device (a stable sort).
  perms = np.stack([np.argsort(p, kind="stable") for p in devices]).astype(np.int32)
  return Solution(perms=perms, methods=tuple(methods), seconds=tuple(seconds))
