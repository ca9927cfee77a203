"""The NNX adapter: recording an `nnx.Module`'s routing and moving its experts in place.

Imports Flax, an optional dependency; `jax_ccfuser.placement` loads this module only when one of
its names is used.
"""

from typing import Callable, Sequence

import jax
import numpy.typing as npt
from flax import nnx

from jax_ccfuser.nnx import MoE
from jax_ccfuser.placement._permute import check_perms, layer_paths, permute_with_moves

# What every MoE layer of a model must have for its function to survive a permutation.
_REQUIRED = (("w_in",), ("w_out",), ("router", "kernel"))


def _moe_modules(model) -> list:
  """`(path, module)` of every `jax_ccfuser.nnx.MoE` in `model`, in `nnx.iter_modules` order; a
  module holding layers stacked on a leading axis (built by `nnx.vmap`, for `nnx.scan`) is
  refused: its layers' routing and experts are not one layer's."""
  modules = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, MoE)]
  for path, m in modules:
    if m.w_in.ndim != 3:
      raise ValueError(f"the MoE layer at {path} holds layers stacked on a leading axis (w_in "
                       f"{list(m.w_in.shape)}, as nnx.vmap builds them for nnx.scan): placement "
                       f"takes MoE layers one by one")
  return modules


def moe_layers(model) -> tuple[tuple, ...]:
  """Paths of the `jax_ccfuser.nnx.MoE` layers of an NNX model, in `nnx.iter_modules` order.

  That is sorted attribute names (as NNX visits a module's attributes: `down` before `up`,
  `layer_10` before `layer_2`) and list order (blocks held in an `nnx.List`: block 0 first), and
  the layer order of `capture_expert_ids`, `apply` and the `layers` of `permute`. The
  cross-layer transitions of `routing_stats` pair consecutive entries, so they describe the
  model only where this is the order its layers run: keep the layers in an `nnx.List`, or name
  them so that they sort in that order.

  Examples:
    >>> from flax import nnx
    >>> from jax_ccfuser import placement
    >>> from jax_ccfuser.nnx import MoE
    >>> model = nnx.List([MoE(16, 32, 4, axis_name=None, rngs=nnx.Rngs(i)) for i in range(2)])
    >>> placement.moe_layers(model)
    ((0,), (1,))
  """
  return tuple(path for path, _ in _moe_modules(model))


def capture_expert_ids(fn: Callable) -> Callable:
  """Wraps `fn(model, *args, **kwargs)` to also return the experts every MoE layer chose.

  The wrapped function returns `(fn's result, expert_ids)`, expert_ids a tuple with one `[N, K]`
  int32 array per `moe_layers(model)` entry: the ids of the layer's N tokens (its input's leading
  dimensions, flattened), exactly as the layer routed them. They are recomputed from the
  router's output (captured with `nnx.capture`) and the expert bias as `fn` found it (a step may
  move the bias after its forward pass), so the layers need no change; under `jax.jit` the
  extra work is one top-k per layer. Each layer must run exactly once per call, and `fn` must
  not change a bias before its layer runs.
  Usable inside `nnx.jit` and `nnx.grad` (the ids are then part of the auxiliary output).

  Examples:
    >>> from flax import nnx
    >>> from jax_ccfuser import placement
    >>> from jax_ccfuser.nnx import MoE
    >>> model = nnx.List([MoE(16, 32, 4, axis_name=None, rngs=nnx.Rngs(i)) for i in range(2)])
    >>> def loss_fn(model, x):
    ...   for layer in model:
    ...     x, aux = layer(x)
    ...   return jnp.mean(x ** 2)
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    >>> loss, ids = nnx.jit(placement.capture_expert_ids(loss_fn))(model, x)
    >>> [i.shape for i in ids]  # [N, K] a layer, N = 2 * 6 tokens
    [(12, 2), (12, 2)]
    >>> stats = placement.RoutingStats.zeros(2, 1, 4).update(ids)
  """
  def wrapped(model, *args, **kwargs):
    layers = _moe_modules(model)
    # The biases the layers route with: `fn` may step them after (a training step does).
    biases = [None if moe.expert_bias is None else moe.expert_bias[...] for _, moe in layers]
    result, captured = nnx.capture(fn, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        model, *args, **kwargs)
    outputs = dict(nnx.to_flat_state(captured))
    ids = []
    for (path, moe), bias in zip(layers, biases):
      calls = outputs.get(path + ("router", "__call__"))
      calls = () if calls is None else calls.get_value()
      if len(calls) != 1:
        raise ValueError(f"the MoE layer at {path} ran {len(calls)} times; "
                         f"capture_expert_ids needs each layer to run exactly once")
      logits = calls[0].reshape(-1, moe.spec.num_experts)
      ids.append(moe.spec.route(logits, bias)[0])
    return result, tuple(ids)

  return wrapped


def apply(model, optimizer, perms: npt.ArrayLike, *,
          layers: Sequence[str | tuple] | None = None) -> None:
  """Moves the experts of a live NNX model, and of its optimizer state, to a new placement.

  In place: each MoE layer's `w_in`, `w_out`, router output columns (kernel, and bias when
  there is one) and expert bias are permuted together with `perms`, and so are the matching
  entries of
  `optimizer`'s state (Adam's moments, ...), so the model computes exactly the same function and
  the next training step is the permuted image of the step it would have taken. What the layers
  report per expert (`MoEAux.counts`, and ids from `capture_expert_ids`) is then in the new
  order. Every array keeps its sharding: an expert whose slot moved to another device has its
  weights and moments copied there.

  Args:
    model: an `nnx.Module` holding `jax_ccfuser.nnx.MoE` layers.
    optimizer: the model's `nnx.Optimizer` (or any NNX object holding its state), or `None`.
    perms: `[L, E]` integer, one permutation per layer of `layers` (`Solution.perms`).
    layers: paths of the MoE layers in `model`; `None`: `moe_layers(model)`.

  Raises:
    ValueError: with nothing moved, for layers with group-limited routing (their groups are
      runs of expert ids), layers stacked on a leading axis (`nnx.vmap`), permutations that are
      not one `[E]` permutation per layer, a layer missing its weights, or an optimizer state
      that does not mirror the parameters' shapes (Adafactor's factored moments).

  Examples:
    >>> from flax import nnx
    >>> from jax_ccfuser import placement
    >>> from jax_ccfuser.nnx import MoE
    >>> model = nnx.List([MoE(16, 32, 4, axis_name=None, rngs=nnx.Rngs(i)) for i in range(2)])
    >>> def loss_fn(model, x):
    ...   for layer in model:
    ...     x, aux = layer(x)
    ...   return jnp.mean(x ** 2)
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    >>> import optax
    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    >>> before = loss_fn(model, x)
    >>> placement.apply(model, optimizer, jnp.array([[3, 2, 1, 0], [1, 0, 3, 2]]))
    >>> bool(jnp.allclose(loss_fn(model, x), before))  # the same function, experts moved
    True

    After a placement from `solve`, the counts restart in the new ids:
    `stats = placement.RoutingStats.zeros(*stats.rows.shape)`.
  """
  layers = moe_layers(model) if layers is None else layer_paths(layers)
  perms = check_perms(perms, len(layers))
  grouped = [path for path, m in _moe_modules(model) if path in layers and m.spec.group_limited]
  if grouped:
    raise ValueError(f"the MoE layers at {grouped} use group-limited routing, whose groups are "
                     f"runs of expert ids: moving experts would change their function")
  others = [path for path in moe_layers(model) if path not in layers]
  targets = [(model, nnx.state(model))]
  if optimizer is not None:
    # An optimizer may hold the model itself (nnx.ModelAndOptimizer): those variables move once.
    own = {id(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    targets.append((optimizer, nnx.state(optimizer, lambda _, v: id(v) not in own)))
  updates = []
  for target, state in targets:
    try:
      new, moved = permute_with_moves(state, perms, layers, others)
    except ValueError as e:
      if target is model:
        raise
      raise ValueError(f"the optimizer's state cannot move with its parameters: {e}. apply "
                       f"moves states that mirror the parameters' shapes (Adam's, Lion's, SGD "
                       f"momentum's, ...), not factored ones (Adafactor's); nothing was moved"
                       ) from e
    if target is model:
      missing = [(layers[i], p) for i in range(len(layers)) for p in _REQUIRED
                 if (i, p) not in moved]
      if missing:
        raise ValueError(f"the model has no parameter at these (layer, name) paths: {missing}")
    # A permuted array is a gather's output; give it back the sharding its variable had.
    updates.append((target, jax.tree.map(
        lambda n, o: jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n,
        new, state)))
  for target, new in updates:  # all or nothing: a refused state leaves the model as it was
    nnx.update(target, new)
