"""Flax Linen Mixture-of-Experts layer: the twin of `jax_ccfuser.nnx.MoE`, same math and parameters.

Examples:
  >>> from jax_ccfuser.linen import MoE
  >>> mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  >>> x = jax.random.normal(jax.random.key(1), (4, 16, 64))  # [B, S, H]; B*S divisible by 8
  >>> layer = MoE(num_experts=16, ffn=128, k=2)
  >>> with jax.set_mesh(mesh):
  ...   variables = layer.init(jax.random.key(0), x)
  ...   y, aux = jax.jit(layer.apply)(variables, x)
  >>> y.shape, int(aux.counts.sum())
  ((4, 16, 64), 128)
  >>> variables["params"]["w_in"].names  # boxed: [E, H, 2F] split over the expert axis
  ('expert', None, None)
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import AxisType, PartitionSpec as P
from flax.typing import Dtype, Initializer

# Registers the "expert_bias" collection's NNX type, for layers bridged with nnx.bridge.
from jax_ccfuser import _expert_bias  # noqa: F401
from jax_ccfuser._moe_layer import (MoEAux, MoESpec, check_widths, default_expert_init,
                                     default_shared_init)


class MoE(nn.Module):
  """A top-k routed Mixture-of-Experts FFN with expert parallelism (Linen).

  Parameters, as in `jax_ccfuser.nnx.MoE`: `router/kernel` `[H, E]`, `w_in` `[E, H, 2F]` (gated,
  gate half first) or `[E, H, F]`, `w_out` `[E, F, H]`; H is read from the input. With an
  `axis_name` the expert weights are boxed as `nn.Partitioned` over `(axis_name, None, None)`
  (`nn.get_partition_spec(variables)` gives their specs). Calls run as the NNX layer's: under
  `jax.shard_map` over the mesh (the tokens split over every mesh axis) when a mesh is set (with
  that axis, or any with `axis_name=None`), directly inside a `shard_map` that maps it already,
  and on one device otherwise; unlike the NNX layer, it cannot warn when weights placed over a
  mesh are called where none is set (Linen's variables keep no record of the mesh they were made
  under). The router computes in float32.

  Every attribute is a keyword (`MoE(num_experts=16, ffn=128)`): the NNX layer takes
  `(hidden, ffn, num_experts)` in that order, so its positions copied here would silently make
  `hidden` the expert count and the expert count `k`.

  `__call__` returns `(y, aux)`: y `[..., H]` and a `MoEAux` (`load_balancing_loss`, `z_loss`:
  float32 scalars of the whole batch, unscaled; `counts`: `[E]` int32 expert load;
  `device_loads`: `[2, D]` int32 rows per device without / with reassignment).

  With `expert_bias=True` the router's bias lives in the variable collection `"expert_bias"`
  (`{"expert_bias": {"expert_bias": [E] float32}}`: the leaf named as the NNX layer's attribute;
  zeros at init, not partitioned, so replicated): not in `params`, so gradients and the optimizer
  never touch it; `jax_ccfuser.update_expert_bias` moves it from `aux.counts` after each step
  (the NNX layer's `ExpertBias`; see there why a collection rather than an Optax
  transformation). With `num_shared_experts=S`, `shared_w_in` `[H, 2SF]` (gated) or `[H, SF]`
  and `shared_w_out` `[SF, H]` are boxed as replicated (`(None, None)`).

  Attributes:
    num_experts: E, divisible by the size of the expert axis.
    ffn: F, each expert's hidden width.
    k: experts per token.
    activation: "swiglu", "geglu", "gelu", "relu" or "silu".
    dispatch: "fused", "all_to_all" or "reference".
    capacity_factor: for dispatch="all_to_all": `None` (dropless) or a positive float.
    axis_name: the expert-parallel mesh axis, or `None`.
    renormalize: rescale each token's k router weights to sum to 1; `None`: when k > 1
      (`jax_ccfuser.route`'s default).
    reassign: let idle devices take over slices of hot experts (fused dispatch only).
    replicas: with `reassign` across hosts, the experts each device of a busy host hands to the
      other hosts per step (`jax_ccfuser.reassign`); 0: none.
    residuals: "inputs", "hidden" or "auto": what the fused backward starts from (the NNX
      layer's docstring says what each costs).
    score: the router's scores, "softmax" or "sigmoid".
    num_groups: groups of consecutive experts for group-limited routing (divides E); 1: none.
    top_groups: groups each token may use; `None`: all.
    scale: the routed scaling factor, multiplied into the combine weights.
    expert_bias: keep a router bias in the `"expert_bias"` collection.
    num_shared_experts: S, shared experts as one dense FFN of width S * F; 0: none.
    dtype: the experts' compute dtype; `None` promotes the input and parameter dtypes.
    param_dtype: the parameters' storage dtype (the expert bias is float32 whatever it is).
    kernel_init: initializer of `w_in` and `w_out`.
    router_init: initializer of the router kernel.
    shared_init: initializer of `shared_w_in` and `shared_w_out`.

  Examples:
    >>> from jax_ccfuser.linen import MoE
    >>> x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    >>> layer = MoE(num_experts=4, ffn=32, axis_name=None)
    >>> variables = jax.jit(layer.init)(jax.random.key(0), x)
    >>> y, aux = jax.jit(layer.apply)(variables, x)
    >>> y.shape, aux.counts.shape
    ((2, 5, 16), (4,))

    With the router's bias, moved after each step from the loads:

    >>> layer = MoE(num_experts=4, ffn=32, axis_name=None, expert_bias=True)
    >>> variables = jax.jit(layer.init)(jax.random.key(0), x)
    >>> y, aux = jax.jit(layer.apply)(variables, x)
    >>> variables["expert_bias"]["expert_bias"] = jax_ccfuser.update_expert_bias(
    ...     variables["expert_bias"]["expert_bias"], aux.counts, rate=1e-3)
    >>> sorted(variables)
    ['expert_bias', 'params']
  """
  _: dataclasses.KW_ONLY
  num_experts: int
  ffn: int
  k: int = 2
  activation: str = "swiglu"
  dispatch: str = "fused"
  capacity_factor: float | None = None
  axis_name: str | None = "expert"
  renormalize: bool | None = None
  reassign: bool = False
  replicas: int = 0
  residuals: str = "inputs"
  score: str = "softmax"
  num_groups: int = 1
  top_groups: int | None = None
  scale: float = 1.0
  expert_bias: bool = False
  num_shared_experts: int = 0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_expert_init
  router_init: Initializer = nn.initializers.lecun_normal()
  shared_init: Initializer = default_shared_init

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, MoEAux]:
    """Runs the layer.

    Args:
      x: `[..., H]` float32/bfloat16/float16, the tokens.

    Returns:
      `(y, aux)`: y `[..., H]` in the compute dtype and the layer's `MoEAux`.

    Raises:
      ValueError: as `jax_ccfuser.nnx.MoE.__call__` raises it (the mesh, the split of experts
        and tokens, an enclosing `shard_map`), and what `jax_ccfuser.fused_moe` raises.
    """
    check_widths(x.shape[-1], self.ffn)
    spec = MoESpec(num_experts=self.num_experts, k=self.k, activation=self.activation,
                   dispatch=self.dispatch, capacity_factor=self.capacity_factor,
                   axis_name=self.axis_name, renormalize=self.renormalize,
                   reassign=self.reassign, replicas=self.replicas, residuals=self.residuals,
                   score=self.score, num_groups=self.num_groups,
                   top_groups=self.top_groups, scale=self.scale,
                   num_shared_experts=self.num_shared_experts)
    h, e, g = x.shape[-1], self.num_experts, 2 if spec.gated else 1
    spec.placement()  # the experts split evenly over the mesh's expert axis, before init puts them

    def partitioned(init, sharding):
      if self.axis_name is None:
        return init
      # The box asserts its sharding only where it is unboxed (in a call), so the init places
      # the value itself: under Explicit axes the assertion needs it there already, and under
      # Auto ones the stored arrays (and an optimizer's state made from them) were otherwise
      # whole on every device.
      axis_types = getattr(jax.sharding.get_abstract_mesh(), "axis_types", ())
      if AxisType.Explicit in axis_types:
        init = lambda *args, init=init: jax.sharding.reshard(init(*args), P(*sharding))
      elif axis_types:
        init = lambda *args, init=init: jax.lax.with_sharding_constraint(init(*args),
                                                                         P(*sharding))
      return nn.with_partitioning(init, sharding)

    init = partitioned(self.kernel_init, spec.expert_sharding())
    w_in = self.param("w_in", init, (e, h, g * self.ffn), self.param_dtype)
    w_out = self.param("w_out", init, (e, self.ffn, h), self.param_dtype)
    shared = ()
    if self.num_shared_experts:
      width = self.num_shared_experts * self.ffn
      init = partitioned(self.shared_init, spec.shared_sharding())
      shared = (self.param("shared_w_in", init, (h, g * width), self.param_dtype),
                self.param("shared_w_out", init, (width, h), self.param_dtype))
    bias = None
    if self.expert_bias:
      bias = self.variable("expert_bias", "expert_bias", jnp.zeros, (e,), jnp.float32).value
    logits = nn.Dense(e, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                      kernel_init=self.router_init, name="router")(x)
    x, w_in, w_out, *shared = nn.dtypes.promote_dtype(x, w_in, w_out, *shared, dtype=self.dtype)
    return spec(x, logits, w_in, w_out, expert_bias=bias, shared=tuple(shared) or None)


__all__ = [
    "MoE",
    "MoEAux",
]
