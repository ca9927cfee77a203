"""The math the Flax MoE layers share: route, then run one MoE path over the expert-parallel axis.

`jax_ccfuser.nnx.MoE` and `jax_ccfuser.linen.MoE` hold the parameters; both call `MoESpec` with
them, so the two layers compute the same function by construction.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from jax_ccfuser._all_to_all import all_to_all_moe, check_capacity_factor
from jax_ccfuser._broadcasting import numpy_broadcasting
from jax_ccfuser._ffn import ACTIVATIONS, expert_ffn
from jax_ccfuser._fused import check_residuals, fused_moe
from jax_ccfuser._jax_internals import checks_varying_axes, varying_axes
from jax_ccfuser._reassign import plan_loads, reassign
from jax_ccfuser._reference import reference_moe
from jax_ccfuser._router import check_router_options, route
from jax_ccfuser._validation import (check_activation, check_count, check_int,
                                     explicit_split_axes)

DISPATCH = {"fused": fused_moe, "all_to_all": all_to_all_moe, "reference": reference_moe}

# w_in / w_out's default: fan-in scaling per expert (dimension 0 indexes experts, so it counts
# toward neither fan).
default_expert_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
# The shared experts' default: the same fan-in scaling, for one dense `[in, out]` matrix.
default_shared_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)


def expert_axis(axis_name):
  """How a layer with expert axis `axis_name` runs where it is called.

  Returns:
    `None` to call the op on the operands as they come: no mesh set or, without an expert
    axis, a mesh of one device or one inside a `shard_map`; `"manual"` inside a
    `jax.shard_map` that already maps `axis_name`; `"map"` when the layer enters
    `jax.shard_map` over the mesh set (`jax.set_mesh`) itself: one with `axis_name`, or,
    without an expert axis, one of several devices outside any `shard_map` (each device then
    runs every expert on its own tokens).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  if axis_name is None:
    outside = AxisType.Manual not in mesh.axis_types
    return "map" if outside and any(size > 1 for size in mesh.axis_sizes) else None
  if axis_name not in mesh.axis_names:
    raise ValueError(f"the mesh in context has axes {mesh.axis_names}, not the expert axis "
                     f"{axis_name!r}; set a mesh with that axis or pass axis_name=None")
  kind = mesh.axis_types[mesh.axis_names.index(axis_name)]
  if kind == AxisType.Manual:
    return "manual"
  if manual := tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual):
    # The layer's own shard_map would bind those axes again, which XLA refuses (of size 1 too:
    # there the forward runs, its gradient not).
    raise ValueError(f"the layer is called inside a jax.shard_map that is manual over {manual} "
                     f"but not over its expert axis {axis_name!r}: make that shard_map manual "
                     f"over {axis_name!r} too (leave its axis_names unset), or call the layer "
                     f"outside it")
  return "map"


def check_widths(hidden: int, ffn: int) -> None:
  """Refuses a layer without width, before an initializer divides by it."""
  if not (hidden >= 1 and ffn >= 1):
    raise ValueError(f"hidden={hidden} and ffn={ffn} must both be at least 1")


class MoEAux(NamedTuple):
  """What an MoE layer reports besides its output (whole batch, identical on every device).

  Inside a user's `jax.shard_map` the batch is the tokens of every manual axis x varies over;
  with `check_vma=False` JAX does not say which, and every manual axis of size > 1 counts, so
  tokens replicated over one (a tensor-parallel axis) count once for each of its devices.

  Attributes:
    load_balancing_loss: `[]` float32, the Switch/GShard auxiliary loss, unscaled.
    z_loss: `[]` float32, the router z-loss, unscaled.
    counts: `[E]` int32, the (token, k) assignments per expert.
    device_loads: `[2, D]` int32, the rows each device of the expert axis computes without and
      with the reassignment plan (equal rows when `reassign=False`), summed over the groups of
      other mesh axes.
  """
  load_balancing_loss: jax.Array
  z_loss: jax.Array
  counts: jax.Array
  device_loads: jax.Array


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """The static options of an MoE layer, checked once when the layer is built.

  Attributes:
    num_experts: E, all experts of the layer (split evenly over the expert axis).
    k: experts per token.
    activation: "swiglu", "geglu", "gelu", "relu" or "silu".
    dispatch: "fused" (`fused_moe`), "all_to_all" (`all_to_all_moe`) or "reference"
      (`reference_moe`).
    capacity_factor: `None` (dropless) or a positive float; only for dispatch="all_to_all".
    axis_name: the expert-parallel mesh axis, or `None`.
    renormalize: rescale each token's k router weights to sum to 1; `None`: when k > 1
      (`jax_ccfuser.route`'s default).
    reassign: let idle devices take over slices of hot experts (`jax_ccfuser.reassign`; fused
      dispatch only). The layer computes the same function either way.
    replicas: with `reassign`, the experts each device of a busy host may hand to the other
      hosts per step (`jax_ccfuser.reassign`'s `replicas`); 0: rows stay on their host.
    residuals: what the fused backward starts from (`fused_moe`'s `residuals=`): "inputs"
      (recompute each row's hidden activation), "hidden" (keep it) or "auto" (keep it within
      `jax_ccfuser.residual_budget`). Fused dispatch only; the same results either way.
    score, num_groups, top_groups, scale: the router's options (`jax_ccfuser.route`).
    num_shared_experts: S; the layer adds a dense FFN of hidden width S * F, the same
      activation, seen by every token (DeepSeek's shared experts as one MLP). 0: none.
  """
  num_experts: int
  k: int
  activation: str
  dispatch: str
  capacity_factor: float | None
  axis_name: str | None
  renormalize: bool | None
  reassign: bool = False
  replicas: int = 0
  residuals: str = "inputs"
  score: str = "softmax"
  num_groups: int = 1
  top_groups: int | None = None
  scale: float = 1.0
  num_shared_experts: int = 0

  def __post_init__(self):
    check_count("num_experts", self.num_experts)
    check_router_options(self.num_experts, self.k, score=self.score, num_groups=self.num_groups,
                         top_groups=self.top_groups, scale=self.scale)
    if check_int("num_shared_experts", self.num_shared_experts) < 0:
      raise ValueError(f"num_shared_experts={self.num_shared_experts} must be 0 or positive")
    check_activation(self.activation)
    if self.dispatch not in DISPATCH:
      raise ValueError(f"unknown dispatch {self.dispatch!r}; expected one of {sorted(DISPATCH)}")
    if self.reassign and self.dispatch != "fused":
      raise ValueError(f"reassign=True needs dispatch='fused', not {self.dispatch!r}")
    if self.replicas and not self.reassign:
      raise ValueError(f"replicas={self.replicas} needs reassign=True")
    check_residuals(self.residuals)
    if self.residuals != "inputs" and self.dispatch != "fused":
      raise ValueError(f"residuals={self.residuals!r} needs dispatch='fused', not "
                       f"{self.dispatch!r}")
    if self.capacity_factor is not None and self.dispatch != "all_to_all":
      raise ValueError(f"capacity_factor applies to dispatch='all_to_all' only, not "
                       f"{self.dispatch!r} (the fused and reference paths are dropless)")
    check_capacity_factor(self.capacity_factor)
    if check_int("replicas", self.replicas) < 0:
      raise ValueError(f"replicas={self.replicas} must be 0 or positive")

  @property
  def gated(self) -> bool:
    return ACTIVATIONS[self.activation].gated

  @property
  def group_limited(self) -> bool:
    """Whether a token may use only some groups of experts (which depends on the expert ids)."""
    return self.top_groups is not None and self.top_groups < self.num_groups

  def expert_sharding(self) -> tuple:
    """Partitioning of w_in / w_out: the expert dimension over `axis_name`, the rest whole."""
    return (self.axis_name, None, None)

  def placement(self):
    """`expert_axis(axis_name)` where the layer runs now, the experts checked to split evenly
    over the mesh's expert axis (before JAX places the weights)."""
    mode = expert_axis(self.axis_name)
    mesh = jax.sharding.get_abstract_mesh()
    if mode == "map" and len(set(mesh.axis_types)) > 1:
      # Flax places parameters by one rule per mesh (NNX refuses mixed meshes itself).
      kinds = {name: kind.name for name, kind in zip(mesh.axis_names, mesh.axis_types)}
      raise ValueError(f"the layer takes a mesh whose axes are all Explicit or all Auto; got "
                       f"{kinds}")
    if mode is not None and self.axis_name is not None:
      size = mesh.shape[self.axis_name]
      if self.num_experts % size:
        raise ValueError(f"num_experts={self.num_experts} does not split evenly over the mesh's "
                         f"expert axis {self.axis_name!r} of size {size}")
    return mode

  def shared_sharding(self) -> tuple:
    """Partitioning of the shared experts' matrices: replicated.

    The expert axis also splits the tokens, so a shared FFN split along F over it would need
    every device's tokens (an all-gather per layer); replicated, it runs on each device's own
    tokens like the router, and its gradient is summed over the axis like the router's.
    """
    return (None, None)

  def route(self, logits, expert_bias=None, *, axis_name=None):
    """`jax_ccfuser.route` with this layer's options: `logits` `[T, E]` float32."""
    return route(logits, self.k, renormalize=self.renormalize, axis_name=axis_name,
                 score=self.score, num_groups=self.num_groups, top_groups=self.top_groups,
                 scale=self.scale, expert_bias=expert_bias)

  def _local(self, x, logits, w_in, w_out, expert_bias, shared, *, axis_name, token_axes=None):
    """One device's share: `x` [T, H], `logits` [T, E] float32 -> (y [T, H], MoEAux).

    `token_axes`: the mesh axes that split the tokens where they are more than `axis_name`
    (the layer's own `shard_map` over a mesh with other axes: each of their devices runs its own
    expert-parallel group), so that `aux` is the whole batch's."""
    ids, weights, aux = self.route(logits, expert_bias, axis_name=token_axes or axis_name)
    options = {} if self.capacity_factor is None else {"capacity_factor": self.capacity_factor}
    if self.residuals != "inputs":
      options["residuals"] = self.residuals
    if self.reassign:
      options["plan"] = reassign(ids, self.num_experts, axis_name=axis_name,
                                 replicas=self.replicas)
      loads = jnp.stack(plan_loads(options["plan"]))
      if others := tuple(a for a in token_axes or () if a != axis_name):
        loads = jax.lax.psum(loads, others)  # every group's rows, as counts are every token's
    else:
      num_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
      loads = jnp.tile(aux.counts.reshape(num_devices, -1).sum(1), (2, 1))
    y = DISPATCH[self.dispatch](x, ids, weights, w_in, w_out, axis_name=axis_name,
                                activation=self.activation, **options)
    if shared is not None:
      with jax.named_scope("shared_experts"):
        y = (y + expert_ffn(x, *shared, self.activation)).astype(x.dtype)
    return y, MoEAux(*aux, device_loads=loads.astype(jnp.int32))

  @numpy_broadcasting
  def __call__(self, x, logits, w_in, w_out, *, expert_bias=None, shared=None):
    """Routes every token and runs the experts.

    Args:
      x: `[..., H]` in the compute dtype, the tokens (when mapped: split over the expert axis
        along the flattened leading dimensions).
      logits: `[..., E]` float32, the router's output for `x`.
      w_in: `[E, H, 2F]` (gated) or `[E, H, F]`, the compute dtype.
      w_out: `[E, F, H]`, the compute dtype.
      expert_bias: `[E]` float32, the router's expert bias, or `None`.
      shared: `(shared_w_in [H, 2SF] or [H, SF], shared_w_out [SF, H])` in the compute dtype,
        the shared experts, or `None`.

    Returns:
      `(y, aux)`: y `[..., H]` in x's dtype and the `MoEAux` of the whole batch.
    """
    lead, h = x.shape[:-1], x.shape[-1]
    mode = self.placement()
    if mode is None and self.axis_name is not None and (axes := explicit_split_axes(w_in)):
      raise ValueError(f"the layer's experts are split over the explicit mesh axes {axes} (they "
                       f"were made under jax.set_mesh): call the layer under that mesh too")
    if mode is None:
      y, aux = self._local(x.reshape(-1, h), logits.reshape(-1, self.num_experts), w_in, w_out,
                           expert_bias, shared, axis_name=None)
      return y.reshape(*lead, h), aux
    mesh = jax.sharding.get_abstract_mesh()
    if mode == "manual":
      # Inside a user's shard_map the tokens split over the manual axes x varies over (a data
      # axis beside the expert axis too), so the aux still sums the whole batch.
      # Without varying types (check_vma=False) they are every manual axis of size > 1.
      varying = varying_axes(x) if checks_varying_axes() else mesh.manual_axes
      tokens = tuple(a for a in mesh.axis_names if a in varying and mesh.shape[a] > 1)
      y, aux = self._local(x.reshape(-1, h), logits.reshape(-1, self.num_experts), w_in, w_out,
                           expert_bias, shared, axis_name=self.axis_name, token_axes=tokens)
      return y.reshape(*lead, h), aux
    # The tokens split over every mesh axis of size > 1 (data-parallel axes too, each of whose
    # devices runs an expert-parallel group of its own), the experts over the expert axis alone,
    # or whole on every device without one.
    tokens = tuple(a for a in mesh.axis_names if a == self.axis_name or mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in tokens)
    if math.prod(lead) % size:
      raise ValueError(f"{math.prod(lead)} tokens do not split evenly over the {size} devices of "
                       f"mesh axes {tokens}")
    if not math.prod(lead):  # an empty shard_map, which XLA fails to compile
      raise ValueError(f"no tokens: on a mesh the layer needs at least one token for each of the "
                       f"{size} devices of mesh axes {tokens}")
    experts = P(self.axis_name) if self.axis_name else P()
    specs = (P(tokens), P(tokens), experts, experts, P(), P())
    explicit = AxisType.Explicit in mesh.axis_types
    if explicit:
      # Flattened straight into the token split, and y back as x came: x may come split along
      # any of its dimensions (the batch, the sequence), which a plain reshape cannot always keep.
      x_spec = jax.typeof(x).sharding.spec
      # An operand not yet on the mesh (made outside it) goes there first: the reshapes' transposes
      # need a mesh to reshard the cotangents on.
      x, logits = (a if not jax.typeof(a).sharding.mesh.empty else jax.sharding.reshard(a, P())
                   for a in (x, logits))
      x = jnp.reshape(x, (-1, h), out_sharding=specs[0])
      logits = jnp.reshape(logits, (-1, self.num_experts), out_sharding=specs[1])
      # shard_map takes explicitly sharded operands only as its specs say
      w_in, w_out, expert_bias, shared = jax.sharding.reshard((w_in, w_out, expert_bias, shared),
                                                              specs[2:])
    else:
      x, logits = x.reshape(-1, h), logits.reshape(-1, self.num_experts)
    body = functools.partial(self._local, axis_name=self.axis_name, token_axes=tokens)
    y, aux = jax.shard_map(body, in_specs=specs,
                           out_specs=(P(tokens), MoEAux(P(), P(), P(), P())))(
                               x, logits, w_in, w_out, expert_bias, shared)
    if explicit:
      return jnp.reshape(y, (*lead, h), out_sharding=x_spec), aux
    return y.reshape(*lead, h), aux
