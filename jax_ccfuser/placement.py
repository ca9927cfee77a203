"""Expert placement: which device holds which expert, chosen from recorded routing statistics.

Three steps, each usable on its own:

1. **Record.** `RoutingStats` counts, per MoE layer, the (token, k) rows each source device sends
   to each expert, and across consecutive layers the expert(l) -> expert(l + 1) transitions of
   every token. `routing_stats` counts one step (jittable); `RoutingStats.update` adds a step to
   running totals; `capture_expert_ids` gets the ids out of an NNX model's
   `jax_ccfuser.nnx.MoE` layers inside a jitted training step.
2. **Solve.** `solve` picks a permutation of each layer's experts, by an integer linear program
   over load balance, rows that leave their device and the cross-layer term (MoETuner), or
   greedily, each expert near the devices that send it most rows (CCFuser). `score` measures any
   placement on statistics.
3. **Apply.** `apply` moves the experts of a live NNX model and of its optimizer state, and the
   router's output columns with them, so the model computes exactly the same function; `permute`
   does the same to plain pytrees (Linen params, Optax states, `nnx.State`).

Layout: a layer's expert (slot) `s` lives on device `s // E_local`, `E_local = E / D`, as in
`jax_ccfuser.fused_moe`. A permutation `perm` `[E]` says which old expert goes to each new slot:
`new_w_in[s] = old_w_in[perm[s]]`.

Examples:
  >>> stats = placement.RoutingStats.zeros(num_layers=4, num_devices=8, num_experts=64)
  >>> stats = stats.update(expert_ids_per_layer)  # in the training step; [N, K] int32 each
  >>> solution = placement.solve(stats, 8, method="ilp", time_limit=5.0)
  >>> placement.apply(model, optimizer, solution.perms)
"""

import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_ccfuser._router import route

# The parameters of an MoE layer that are indexed by expert, relative to the layer's path, and the
# axis of each that counts experts: the expert weights along their first, the router's outputs
# along their last.
_EXPERT_AXES = {("w_in",): 0, ("w_out",): 0, ("router", "kernel"): -1, ("router", "bias"): -1}
# What every MoE layer of a model must have for its function to survive a permutation.
_REQUIRED = (("w_in",), ("w_out",), ("router", "kernel"))

METHODS = ("ilp", "greedy")


class RoutingStats(NamedTuple):
  """Routing counts of L consecutive MoE layers, summed over the steps recorded so far.

  A pytree of two int32 arrays (exact up to 2**31 - 1 per entry), so it can be carried through a
  jitted training loop and summed across steps with `update`.
  """
  rows: jax.Array         # [L, D, E] int32: (token, k) rows source device d sent to expert e
  transitions: jax.Array  # [L - 1, E, E] int32: (token, k, k') pairs, expert i in l, j in l + 1

  @classmethod
  def zeros(cls, num_layers: int, num_devices: int, num_experts: int) -> "RoutingStats":
    """Empty totals for `num_layers` layers of `num_experts` experts over `num_devices` devices."""
    if num_layers < 1 or num_devices < 1 or num_experts < 1:
      raise ValueError(f"need at least one layer, device and expert, got num_layers="
                       f"{num_layers}, num_devices={num_devices}, num_experts={num_experts}")
    return cls(rows=jnp.zeros((num_layers, num_devices, num_experts), jnp.int32),
               transitions=jnp.zeros((num_layers - 1, num_experts, num_experts), jnp.int32))

  @property
  def num_layers(self) -> int:
    return self.rows.shape[0]

  @property
  def num_devices(self) -> int:
    return self.rows.shape[1]

  @property
  def num_experts(self) -> int:
    return self.rows.shape[2]

  def update(self, expert_ids: Sequence[jax.Array], *,
             source: jax.Array | None = None) -> "RoutingStats":
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
      >>> stats = RoutingStats.zeros(2, 4, 8)
      >>> stats = stats.update([ids_layer0, ids_layer1])  # [N, 2] int32 each
    """
    if len(expert_ids) != self.num_layers:
      raise ValueError(f"these statistics have {self.num_layers} layers, got expert ids of "
                       f"{len(expert_ids)}")
    step = routing_stats(expert_ids, num_experts=self.num_experts, num_devices=self.num_devices,
                         source=source)
    return RoutingStats(rows=self.rows + step.rows, transitions=self.transitions + step.transitions)


def routing_stats(expert_ids: Sequence[jax.Array], *, num_experts: int, num_devices: int,
                  source: jax.Array | None = None) -> RoutingStats:
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
      `t // (N / D)` (N divisible by D), the split of `jax_ccfuser.nnx.MoE` over its expert axis.

  Returns:
    A `RoutingStats` with rows `[L, D, E]` and transitions `[L - 1, E, E]`, int32.

  Examples:
    >>> ids = [jnp.array([[0, 1], [2, 3]]), jnp.array([[1, 2], [3, 0]])]
    >>> s = routing_stats(ids, num_experts=4, num_devices=2)
    >>> s.rows[0]  # [[1, 1, 0, 0], [0, 0, 1, 1]]: device 0 sent experts 0, 1 a row each
    >>> s.transitions[0, 0, 1]  # 1: token 0 went from expert 0 in layer 0 to expert 1 in layer 1
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
  if source is None:
    if n % d:
      raise ValueError(f"{n} tokens do not split evenly over {d} devices; pass source=")
    source = jnp.arange(n, dtype=jnp.int32) // (n // d)
  source = jnp.asarray(source)
  if source.shape != (n,):
    raise ValueError(f"source must be [N={n}], got {list(source.shape)}")

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


def _moe_modules(model) -> list:
  """`(path, module)` of every `jax_ccfuser.nnx.MoE` in `model`, in `nnx.iter_modules` order."""
  from flax import nnx  # Flax is an optional dependency: only the NNX helpers need it.

  from jax_ccfuser.nnx import MoE
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, MoE)]


def moe_layers(model) -> tuple[tuple, ...]:
  """Paths of the `jax_ccfuser.nnx.MoE` layers of an NNX model, in `nnx.iter_modules` order.

  That is attribute and list order (for `models.moe_lm.MoeLM`, block 0 first), and the layer
  order of `capture_expert_ids`, `apply` and the `layers` of `permute`.

  Examples:
    >>> moe_layers(model)
    (('blocks', 0, 'ffn'), ('blocks', 1, 'ffn'))
  """
  return tuple(path for path, _ in _moe_modules(model))


def capture_expert_ids(fn: Callable) -> Callable:
  """Wraps `fn(model, *args, **kwargs)` to also return the experts every MoE layer chose.

  The wrapped function returns `(fn's result, expert_ids)`, expert_ids a tuple with one `[N, K]`
  int32 array per `moe_layers(model)` entry: the ids of the layer's N tokens (its input's leading
  dimensions, flattened), exactly as the layer routed them. They are recomputed from the
  router's output (captured with `nnx.capture`), so the layers need no change; under `jax.jit`
  the extra work is one top-k per layer. Each layer must run exactly once per call.
  Usable inside `nnx.jit` and `nnx.grad` (the ids are then part of the auxiliary output).

  Examples:
    >>> def loss_fn(model, tokens): ...
    >>> loss, ids = capture_expert_ids(loss_fn)(model, tokens)
    >>> stats = stats.update(ids)
  """
  from flax import nnx  # optional dependency, as in `_moe_modules`

  def wrapped(model, *args, **kwargs):
    layers = _moe_modules(model)
    result, captured = nnx.capture(fn, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        model, *args, **kwargs)
    outputs = dict(nnx.to_flat_state(captured))
    ids = []
    for path, moe in layers:
      calls = outputs.get(path + ("router", "__call__"))
      calls = () if calls is None else calls.get_value()
      if len(calls) != 1:
        raise ValueError(f"the MoE layer at {path} ran {len(calls)} times; "
                         f"capture_expert_ids needs each layer to run exactly once")
      logits = calls[0].reshape(-1, moe.spec.num_experts)
      ids.append(route(logits, moe.spec.k, renormalize=moe.spec.renormalize)[0])
    return result, tuple(ids)

  return wrapped


class Solution(NamedTuple):
  """A placement of every layer's experts, from `solve`."""
  perms: np.ndarray             # [L, E] int32: perms[l, s] = the old expert that new slot s gets
  methods: tuple[str, ...]      # [L] "ilp", "ilp (time limit)" or "greedy" (see `solve`)
  seconds: tuple[float, ...]    # [L] wall time spent placing each layer


class Score(NamedTuple):
  """How a placement fares on routing statistics, per layer."""
  remote_fraction: np.ndarray  # [L] float64: share of rows computed on another device than theirs
  max_load: np.ndarray         # [L] float64: rows of the busiest device over the mean (1: even)
  cross_fraction: np.ndarray   # [L - 1] float64: share of transitions that change device


def _devices_of(perm: np.ndarray, num_devices: int) -> np.ndarray:
  """`[E]`: the device that holds each old expert under `perm`."""
  devices = np.empty_like(perm)
  devices[perm] = np.arange(len(perm)) // (len(perm) // num_devices)
  return devices


def _share(part, whole) -> float:
  return float(part / whole) if whole else 0.0


def score(stats: RoutingStats, perms: np.ndarray | None = None) -> Score:
  """Measures a placement on `stats`: remote rows, device load and separated transitions.

  Args:
    stats: `RoutingStats` with `[L, D, E]` rows.
    perms: `[L, E]` integer, `perms[l, s]` the old expert placed at slot s (`Solution.perms`);
      `None`: the identity (the placement the statistics were recorded under).

  Returns:
    A `Score` (per-layer numpy arrays).

  Examples:
    >>> before, after = score(stats), score(stats, solve(stats, 8).perms)
    >>> print(before.remote_fraction.mean(), after.remote_fraction.mean())
  """
  rows, transitions = np.asarray(stats.rows, np.float64), np.asarray(stats.transitions, np.float64)
  num_layers, d, e = rows.shape
  perms = (np.tile(np.arange(e), (num_layers, 1)) if perms is None
           else _check_perms(perms, num_layers, e))
  devices = [_devices_of(p, d) for p in perms]
  remote, max_load, cross = [], [], []
  for layer in range(num_layers):
    r = rows[layer]
    local = r[devices[layer], np.arange(e)].sum()
    remote.append(1.0 - _share(local, r.sum()))
    loads = np.bincount(devices[layer], weights=r.sum(axis=0), minlength=d)
    max_load.append(_share(loads.max(), loads.mean()))
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
  busiest = np.bincount(devices, weights=load, minlength=d).max()
  return float(cost[np.arange(len(devices)), devices].sum() + balance_weight * d * busiest)


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
  a placement no single layer can improve, not necessarily the joint optimum.

  HiGHS stops once it proves a placement within `gap` (relative) of the optimum of the layer's
  program. Where it reaches `time_limit` first, the layer gets HiGHS's best placement so far if
  that costs less than the greedy one, and the greedy one otherwise (also when HiGHS found
  none); `Solution.methods` says which.

  `method="greedy"` (CCFuser-style): hottest expert first, each onto the device with a free slot
  that sends it most rows (ties to the least loaded). It ignores the balance and cross-layer
  weights.

  Within a device, experts keep their old order, so the identity is returned where nothing moves.

  Args:
    stats: `RoutingStats` recorded under the current placement, over `num_devices` devices.
    num_devices: D, the expert-parallel group; must equal the statistics' and divide E.
    method: "ilp" or "greedy".
    time_limit: seconds HiGHS may spend on each layer's program.
    gap: relative optimality gap at which HiGHS stops (proving the last fraction of a percent
      of a min-max objective can take orders of magnitude longer than finding it).
    balance_weight: weight of D times the busiest device's rows.
    transition_weight: weight of each cross-layer transition that changes device (counted once
      per (k, k') pair of a token); 0 makes the layers independent.
    sweeps: passes over the layers after the first (only with the cross-layer term).

  Returns:
    A `Solution`: `perms` `[L, E]` int32 (`perms[l, s]` the old expert for new slot s, slot s on
    device `s // E_local`); per layer, the method that placed it ("ilp": proven within `gap`;
    "ilp (time limit)": HiGHS's best when time ran out; "greedy") and the seconds spent on it.

  Examples:
    >>> solution = solve(stats, 8, method="ilp", time_limit=5.0)
    >>> solution.methods  # ("ilp", "ilp", ...); "greedy" where a layer fell back
    >>> score(stats, solution.perms).remote_fraction
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  num_layers, d, e = stats.rows.shape
  if num_devices != d:
    raise ValueError(f"the statistics were recorded over {d} devices, not num_devices="
                     f"{num_devices}")
  if e % d:
    raise ValueError(f"{e} experts do not split evenly over {d} devices")
  if time_limit <= 0 or gap < 0 or balance_weight < 0 or transition_weight < 0 or sweeps < 0:
    raise ValueError(f"need time_limit > 0 and a non-negative gap, weights and sweeps, got "
                     f"time_limit={time_limit}, gap={gap}, balance_weight={balance_weight}, "
                     f"transition_weight={transition_weight}, sweeps={sweeps}")
  rows, transitions = np.asarray(stats.rows, np.float64), np.asarray(stats.transitions, np.float64)
  experts_local = e // d
  devices = [None] * num_layers  # [E] each: the device of every expert, once placed
  methods, seconds = ["greedy"] * num_layers, [0.0] * num_layers
  passes = 1 + (sweeps if method == "ilp" and transition_weight and num_layers > 1 else 0)
  for sweep in range(passes):
    changed = False
    for layer in range(num_layers):
      began = time.perf_counter()
      load = rows[layer].sum(axis=0)
      if devices[layer] is None:
        devices[layer], changed = _greedy(rows[layer], experts_local), True
      if method == "ilp":
        cost = _layer_cost(rows, transitions, devices, layer, transition_weight=transition_weight)
        value = lambda p: _objective(cost, load, p, balance_weight=balance_weight)
        found, optimal = _ilp(cost, load, experts_local, balance_weight=balance_weight,
                              time_limit=time_limit, gap=gap)
        # The first pass takes a proven placement outright; later ones only a cheaper one.
        take = optimal and sweep == 0
        if found is not None and (take or value(found) < value(devices[layer])):
          devices[layer], changed = found, True
          methods[layer] = "ilp" if optimal else "ilp (time limit)"
      seconds[layer] += time.perf_counter() - began
    if not changed:
      break
  # Sorting by device keeps the old order within a device (a stable sort).
  perms = np.stack([np.argsort(p, kind="stable") for p in devices]).astype(np.int32)
  return Solution(perms=perms, methods=tuple(methods), seconds=tuple(seconds))


def _check_perms(perms, num_layers: int, num_experts: int | None = None) -> np.ndarray:
  """`perms` as an `[L, E]` int32 array of permutations, or a ValueError."""
  perms = np.asarray(perms)
  if perms.ndim != 2 or perms.shape[0] != num_layers or not np.issubdtype(perms.dtype, np.integer):
    raise ValueError(f"perms must be an integer [L={num_layers}, E] array, got "
                     f"{perms.dtype.name}{list(perms.shape)}")
  if num_experts is not None and perms.shape[1] != num_experts:
    raise ValueError(f"perms has {perms.shape[1]} experts per layer, expected {num_experts}")
  for layer, p in enumerate(perms):
    if not np.array_equal(np.sort(p), np.arange(len(p))):
      raise ValueError(f"perms[{layer}] is not a permutation of 0..{len(p) - 1}: {p.tolist()}")
  return perms.astype(np.int32)


def _key(entry):
  """A pytree key path entry (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey) as a value."""
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  raise TypeError(f"unsupported pytree key {entry!r}")


def _permute(tree, perms: np.ndarray, layers: Sequence[tuple]):
  """`permute`, also returning the set of (layer, parameter) pairs it moved."""
  layers = [tuple(layer) for layer in layers]
  moved = set()

  def find(path):
    """(layer, parameter, axis) of the leaf at `path`, or None when no expert axis is in it."""
    keys = tuple(_key(k) for k in path)
    hits = []
    for index, layer in enumerate(layers):
      for parameter, axis in _EXPERT_AXES.items():
        pattern = layer + parameter
        for start in range(len(keys) - len(pattern) + 1):
          rest = path[start + len(pattern):]
          # Only attribute steps into a box (an NNX Variable's value) may follow the name.
          if (keys[start:start + len(pattern)] == pattern
              and all(isinstance(k, jax.tree_util.GetAttrKey) for k in rest)):
            hits.append((index, parameter, axis))
    if len(hits) > 1:
      raise ValueError(f"{jax.tree_util.keystr(path)} belongs to more than one of the layers "
                       f"{layers}")
    return hits[0] if hits else None

  def move(path, leaf):
    hit = find(path)
    if hit is None:
      return leaf
    index, parameter, axis = hit
    if np.ndim(leaf) == 0 or np.shape(leaf)[axis] != perms.shape[1]:
      raise ValueError(f"{jax.tree_util.keystr(path)} has shape {list(np.shape(leaf))}; its "
                       f"axis {axis} should count the {perms.shape[1]} experts")
    moved.add((index, parameter))
    return jnp.take(leaf, perms[index], axis=axis)

  return jax.tree_util.tree_map_with_path(move, tree), moved


def permute(tree, perms, *, layers: Sequence[tuple]):
  """Permutes the experts of MoE layers in any pytree of parameters or of optimizer state.

  Every leaf whose key path contains `layers[l] + ("w_in",)` or `("w_out",)` (followed by nothing
  but attribute steps, such as an NNX Variable's `.value`) is taken along its first axis, and
  every leaf under `layers[l] + ("router", "kernel")` or `("router", "bias")` along its last, in
  the order `perms[l]`. Because the layer path may appear anywhere in the key path, this moves an
  Optax state's per-parameter entries (Adam's `mu` and `nu`) with their parameters; other leaves
  are returned as they are. Pure and jittable.

  Args:
    tree: a pytree: Linen `params`, an `nnx.State`, an Optax state, a dict of them.
    perms: `[L, E]` integer, `perms[l, s]` the old expert that slot s of layer l gets
      (`Solution.perms`).
    layers: the key path of each MoE layer's parameters, e.g. `("blocks", 0, "ffn")` for an
      `nnx.State` or `("params", "Block_0", "MoE_0")` for Linen; `moe_layers(model)` lists an
      NNX model's.

  Returns:
    The tree with the same structure and the expert axes permuted.

  Examples:
    >>> params = permute(params, solution.perms, layers=[("params", "moe")])
    >>> opt_state = permute(opt_state, solution.perms, layers=[("params", "moe")])  # mu, nu too
  """
  return _permute(tree, _check_perms(perms, len(layers)), layers)[0]


def apply(model, optimizer, perms, *, layers: Sequence[tuple] | None = None) -> None:
  """Moves the experts of a live NNX model, and of its optimizer state, to a new placement.

  In place: each MoE layer's `w_in`, `w_out` and router output columns (kernel, and bias when
  there is one) are permuted together with `perms`, and so are the matching entries of
  `optimizer`'s state (Adam's moments, ...), so the model computes exactly the same function and
  the next training step is the permuted image of the step it would have taken. What the layers
  report per expert (`RouterAux.counts`, and ids from `capture_expert_ids`) is then in the new
  order. Every array keeps its sharding: an expert whose slot moved to another device has its
  weights and moments copied there.

  Args:
    model: an `nnx.Module` holding `jax_ccfuser.nnx.MoE` layers.
    optimizer: the model's `nnx.Optimizer` (or any NNX object holding its state), or `None`.
    perms: `[L, E]` integer, one permutation per layer of `layers` (`Solution.perms`).
    layers: paths of the MoE layers in `model`; `None`: `moe_layers(model)`.

  Examples:
    >>> solution = placement.solve(stats, 8)
    >>> placement.apply(model, optimizer, solution.perms)
    >>> stats = placement.RoutingStats.zeros(*stats.rows.shape)  # counts restart in the new ids
  """
  from flax import nnx  # optional dependency, as in `_moe_modules`

  layers = moe_layers(model) if layers is None else [tuple(layer) for layer in layers]
  perms = _check_perms(perms, len(layers))
  for target in (model, optimizer):
    if target is None:
      continue
    state = nnx.state(target)
    new, moved = _permute(state, perms, layers)
    if target is model:
      missing = [(layers[i], p) for i in range(len(layers)) for p in _REQUIRED
                 if (i, p) not in moved]
      if missing:
        raise ValueError(f"the model has no parameter at these (layer, name) paths: {missing}")
    # A permuted array is a gather's output; give it back the sharding its variable had.
    nnx.update(target, jax.tree.map(
        lambda n, o: jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n,
        new, state))
