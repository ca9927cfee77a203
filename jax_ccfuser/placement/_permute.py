"""Applying a placement to plain pytrees: parameters and optimizer state, Linen, Optax or NNX."""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

# The variables of an MoE layer that are indexed by expert, relative to the layer's path: the
# axis of each that counts experts (the expert weights and the expert bias along their first,
# the router's outputs along their last), and its rank in one layer.
_EXPERT_AXES = {("w_in",): (0, 3), ("w_out",): (0, 3), ("expert_bias",): (0, 1),
                ("router", "kernel"): (-1, 2), ("router", "bias"): (-1, 1)}


def check_perms(perms, num_layers: int, num_experts: int | None = None) -> np.ndarray:
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


def layer_paths(layers: Sequence) -> list[tuple]:
  """Each layer path as a tuple of keys; a bare string is a path of one key, not its letters."""
  return [(layer,) if isinstance(layer, str) else tuple(layer) for layer in layers]


def _take(leaf, order: np.ndarray, axis: int):
  """`leaf` in `order` along `axis`. An array sharded over an Explicit mesh axis keeps its
  sharding: JAX asks such a gather for its result's sharding (`jnp.take` cannot say it)."""
  if isinstance(leaf, (jax.Array, jax.core.Tracer)):
    sharding = jax.typeof(leaf).sharding
    if jax.sharding.AxisType.Explicit in getattr(sharding.mesh, "axis_types", ()):
      index = (slice(None),) * (axis % leaf.ndim) + (order,)
      return leaf.at[index].get(out_sharding=sharding)
  return jnp.take(leaf, order, axis=axis)


def permute_with_moves(tree, perms: np.ndarray, layers: Sequence[str | tuple],
                       others: Sequence = ()):
  """`permute`, also returning the set of (layer, parameter) pairs it moved. `others`: paths of
  MoE layers that stay as they are, whose leaves no layer of `layers` may take."""
  layers = layer_paths(layers)
  claims = layers + layer_paths(others)
  moved = set()

  def find(path):
    """(layer, parameter, axis, rank, the steps after the name) of the leaf at `path`, or None
    when it lies in no layer's expert-indexed variable. A leaf in two layers' (one path ends the
    other's: "moe" and "block/moe") belongs to the longer."""
    keys = tuple(_key(k) for k in path)
    hits = []
    for index, layer in enumerate(claims):
      for parameter, (axis, rank) in _EXPERT_AXES.items():
        pattern = layer + parameter
        for start in range(len(keys) - len(pattern) + 1):
          if keys[start:start + len(pattern)] == pattern:
            hits.append((len(layer), index, parameter, axis, rank, path[start + len(pattern):]))
    longest = [hit for hit in hits if hit[0] == max(h[0] for h in hits)]
    if len({hit[1] for hit in longest}) > 1:
      raise ValueError(f"{jax.tree_util.keystr(path)} belongs to more than one of the layers "
                       f"{claims}")
    return longest[0][1:] if longest else None

  def move(path, leaf):
    hit = find(path)
    if hit is None or hit[0] >= len(layers):
      return leaf
    index, parameter, axis, rank, rest = hit
    name = jax.tree_util.keystr(path)
    # Only attribute steps into a box (an NNX Variable's value) may follow the name: anything
    # else is state kept in pieces (one accumulator per axis), which no take along one axis moves.
    if not all(isinstance(k, jax.tree_util.GetAttrKey) for k in rest):
      raise ValueError(f"{name} is a piece of {'/'.join(map(str, parameter))}'s state, not an "
                       f"array of its shape")
    if np.ndim(leaf) != rank or np.shape(leaf)[axis] != perms.shape[1]:
      raise ValueError(f"{name} has shape {list(np.shape(leaf))}; one layer's has rank {rank} "
                       f"and its axis {axis} counts the {perms.shape[1]} experts (layers "
                       f"stacked on a leading axis, as by nnx.vmap or nnx.scan, are not taken)")
    moved.add((index, parameter))
    return _take(leaf, perms[index], axis)

  return jax.tree_util.tree_map_with_path(move, tree), moved


def permute(tree: Any, perms: npt.ArrayLike, *, layers: Sequence[str | tuple]) -> Any:
  """Permutes the experts of MoE layers in any pytree of parameters or of optimizer state.

  Every leaf whose key path contains `layers[l] + ("w_in",)`, `("w_out",)` or `("expert_bias",)`
  (followed by nothing but attribute steps, such as an NNX Variable's `.value`) is taken along
  its first axis, and every leaf under `layers[l] + ("router", "kernel")` or `("router", "bias")`
  along its last, in the order `perms[l]`. Because the layer path may appear anywhere in the key
  path, this moves an Optax state's per-parameter entries (Adam's `mu` and `nu`) with their
  parameters; other leaves are returned as they are. A leaf in two layers' variables (one path
  ends the other's, as `("moe",)` and `("block", "moe")`) belongs to the longer path: list every
  MoE layer of such a tree. State kept in pieces under a parameter (SM3's accumulator per axis),
  or of another rank than one layer's (layers stacked by `nnx.vmap`), is refused. Pure, and
  jittable with `perms` concrete (a static value, not a traced argument).

  A Linen layer keeps its expert bias in the `"expert_bias"` collection: its layer path there,
  e.g. `("expert_bias", "moe")`, moves it. Group-limited routing groups experts by id, so a
  permutation that moves experts between groups changes such a layer's function.

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
    >>> import optax
    >>> from jax_ccfuser import placement
    >>> params = {"moe": {"w_in": jnp.arange(4.0)[:, None, None] * jnp.ones((4, 2, 6)),
    ...                   "w_out": jnp.ones((4, 3, 2)), "router": {"kernel": jnp.eye(2, 4)}}}
    >>> opt_state = optax.adam(1e-3).init(params)
    >>> perms = [[3, 2, 1, 0]]  # one layer: slot s gets old expert 3 - s
    >>> params = placement.permute(params, perms, layers=[("moe",)])
    >>> opt_state = placement.permute(opt_state, perms, layers=[("moe",)])  # mu, nu too
    >>> params["moe"]["w_in"][:, 0, 0].tolist()
    [3.0, 2.0, 1.0, 0.0]
    >>> params["moe"]["router"]["kernel"].tolist()  # the router's output columns move with them
    [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
  """
  return permute_with_moves(tree, check_perms(perms, len(layers)), layers)[0]
