"""Flax NNX Mixture-of-Experts layer: a router and expert FFNs sharded over an expert-parallel axis.

Examples:
  >>> from flax import nnx
  >>> from jax_ccfuser.nnx import MoE
  >>> mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  >>> x = jax.random.normal(jax.random.key(1), (4, 16, 64))  # [B, S, H]; B*S divisible by 8
  >>> with jax.set_mesh(mesh):
  ...   moe = MoE(64, 128, 16, k=2, rngs=nnx.Rngs(0))  # w_in/w_out split 2 experts per device
  ...   y, aux = nnx.jit(lambda m, x: m(x))(moe, x)
  >>> y.shape, int(aux.counts.sum())  # B * S * k (token, expert) rows
  ((4, 16, 64), 128)
  >>> aux_loss = 1e-2 * aux.load_balancing_loss + 1e-3 * aux.z_loss  # added to the task loss
"""

import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from jax_ccfuser._expert_bias import ExpertBias
from jax_ccfuser._moe_layer import (MoEAux, MoESpec, check_widths, default_expert_init,
                                     default_shared_init)
from jax_ccfuser._validation import explicit_split_axes


class MoE(nnx.Module):
  """A top-k routed Mixture-of-Experts FFN with expert parallelism.

  Parameters: `router.kernel` `[H, E]` (replicated), `w_in` `[E, H, 2F]` for gated activations
  (gate half first) or `[E, H, F]`, and `w_out` `[E, F, H]`. The expert weights carry
  `out_sharding=(axis_name, None, None)`: made under a mesh with that axis (`jax.set_mesh`) they
  are placed as they are created (Flax's eager sharding), device d holding experts
  `d * E / D ... (d + 1) * E / D - 1`; made without one they keep the annotation for later use
  (`nnx.get_partition_spec`) and stay where they are.

  When called with such a mesh set, the layer enters `jax.shard_map` over the mesh: the tokens
  (the leading dimensions of `x`, flattened) are split evenly over every mesh axis (the mesh's
  order; with a data axis beside the expert axis, each data index is an expert-parallel group of
  its own), each device routes its own tokens and serves its own experts. Inside a `shard_map`
  that already maps `axis_name`, it calls the MoE op directly on the shards it is given. With
  `axis_name=None` every device holds all experts: under a mesh set it runs them on its own
  tokens (split over every mesh axis); with no mesh set, one device runs the whole batch.

  The router computes in float32 whatever `dtype` is (the top-k choice and the z-loss are
  sensitive to rounding); the experts compute in `dtype`. The options other than the widths,
  dtypes, initializers and `expert_bias` (a variable) are kept in `spec`, a frozen dataclass
  (static: it is no state).

  `__call__` returns `(y, aux)`: the router's auxiliary losses are returned rather than sown, so
  a loss function adds them without collecting state (`MoEAux`: `load_balancing_loss`
  and `z_loss`, float32 scalars of the whole batch, unscaled; `counts`, `[E]` int32, the
  (token, k) assignments per expert, the layer's expert load; `device_loads`, `[2, D]` int32,
  the rows each device of the expert axis computes without and with reassignment, summed over
  the groups).

  Router options are those of `jax_ccfuser.route` (sigmoid scores, group-limited routing, a
  routed scaling factor). With `expert_bias=True` the layer also holds `expert_bias`, an
  `ExpertBias` `[E]` (zeros at first, float32, replicated) for auxiliary-loss-free balancing
  (DeepSeek-V3): it is a variable collection of its own rather than an Optax transformation
  because what moves it is the step's expert load, which the forward pass reports
  (`aux.counts`), not a gradient; outside the optimizer it needs no masking out of weight decay,
  clipping or the gradient, and no optimizer state. After each step:

      layer.expert_bias[...] = jax_ccfuser.update_expert_bias(layer.expert_bias[...],
                                                              aux.counts, rate=1e-3)

  With `num_shared_experts=S > 0` the layer adds a dense FFN of hidden width `S * F` and the same
  activation to the routed output (DeepSeek's shared experts, as one MLP): `shared_w_in`
  `[H, 2SF]` (gated, gate half first) or `[H, SF]` and `shared_w_out` `[SF, H]`, replicated over
  the expert axis (which also splits the tokens: each device runs them on its own tokens).

  Args:
    hidden: H, the model width.
    ffn: F, each expert's hidden width.
    num_experts: E, divisible by the size of the expert axis.
    k: experts per token.
    activation: "swiglu", "geglu", "gelu", "relu" or "silu".
    dispatch: "fused" (`jax_ccfuser.fused_moe`), "all_to_all" (`jax_ccfuser.all_to_all_moe`)
      or "reference" (`jax_ccfuser.reference_moe`). The parameters do not depend on it.
    capacity_factor: for dispatch="all_to_all": `None` (dropless) or a positive float.
    axis_name: the expert-parallel mesh axis, or `None`.
    renormalize: rescale each token's k router weights to sum to 1; `None`: when k > 1
      (`jax_ccfuser.route`'s default).
    reassign: let idle devices take over slices of hot experts (fused dispatch only); the
      layer computes the same function either way.
    replicas: with `reassign` and an expert axis spanning hosts, the experts each device of a
      busy host hands to the other hosts per step (`jax_ccfuser.reassign`); 0: none.
    residuals: "inputs" (the backward recomputes each row's hidden activation), "hidden" (the
      forward keeps it: less compute, `T * K * G * F * 4` bytes per device) or "auto" (keeps
      within `jax_ccfuser.residual_budget`); fused dispatch only, the same results either way.
      Under `nnx.remat` keep "inputs", or save the kept rows by name (`fused_moe`'s docstring).
    score: the router's scores, "softmax" or "sigmoid".
    num_groups: groups of consecutive experts for group-limited routing (divides E); 1: none.
    top_groups: groups each token may use; `None`: all.
    scale: the routed scaling factor, multiplied into the combine weights.
    expert_bias: hold an `ExpertBias` that shifts the choice of experts.
    num_shared_experts: S, shared experts as one dense FFN of width S * F; 0: none.
    dtype: the experts' compute dtype; `None` promotes the input and parameter dtypes.
    param_dtype: the parameters' storage dtype (the expert bias is float32 whatever it is).
    kernel_init: initializer of `w_in` and `w_out`.
    router_init: initializer of the router kernel.
    shared_init: initializer of `shared_w_in` and `shared_w_out`.
    rngs: the `params` stream initializes the weights.

  Examples:
    >>> from flax import nnx
    >>> from jax_ccfuser.nnx import MoE
    >>> moe = MoE(16, 32, 4, k=2, axis_name=None, rngs=nnx.Rngs(0))
    >>> y, aux = moe(jax.random.normal(jax.random.key(1), (2, 5, 16)))
    >>> y.shape, aux.counts.shape, int(aux.counts.sum())  # 2 * 5 tokens, 2 experts each
    ((2, 5, 16), (4,), 20)

    DeepSeek-V3's options, its bias trained without gradients:

    >>> moe = MoE(16, 32, 8, k=2, score="sigmoid", num_groups=4, top_groups=2, scale=2.5,
    ...           expert_bias=True, num_shared_experts=1, axis_name=None, rngs=nnx.Rngs(0))
    >>> y, aux = moe(jax.random.normal(jax.random.key(1), (2, 5, 16)))
    >>> moe.expert_bias[...] = jax_ccfuser.update_expert_bias(moe.expert_bias[...], aux.counts,
    ...                                                       rate=1e-3)
    >>> sorted(nnx.state(moe, nnx.Param).keys())
    ['router', 'shared_w_in', 'shared_w_out', 'w_in', 'w_out']
  """

  def __init__(self, hidden: int, ffn: int, num_experts: int, *, k: int = 2,
               activation: str = "swiglu", dispatch: str = "fused",
               capacity_factor: float | None = None, axis_name: str | None = "expert",
               renormalize: bool | None = None, reassign: bool = False, replicas: int = 0,
               residuals: str = "inputs",
               score: str = "softmax",
               num_groups: int = 1, top_groups: int | None = None, scale: float = 1.0,
               expert_bias: bool = False, num_shared_experts: int = 0,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               kernel_init: Initializer = default_expert_init,
               router_init: Initializer = nnx.initializers.lecun_normal(),
               shared_init: Initializer = default_shared_init, rngs: nnx.Rngs):
    check_widths(hidden, ffn)
    self.spec = MoESpec(
        num_experts=num_experts, k=k, activation=activation, dispatch=dispatch,
        capacity_factor=capacity_factor, axis_name=axis_name, renormalize=renormalize,
        reassign=reassign, replicas=replicas, residuals=residuals, score=score,
        num_groups=num_groups, top_groups=top_groups, scale=scale,
        num_shared_experts=num_shared_experts)
    self.dtype = dtype
    self.router = nnx.Linear(hidden, num_experts, use_bias=False, dtype=jnp.float32,
                             param_dtype=param_dtype, kernel_init=router_init, rngs=rngs)
    g = 2 if self.spec.gated else 1

    def sharding(spec):
      # Annotated always; placed now only under a mesh with the axis (eager sharding needs one).
      if axis_name is None:
        return {}
      return {"out_sharding": spec, "eager_sharding": self.spec.placement() is not None}

    self.w_in = nnx.Param(kernel_init(rngs.params(), (num_experts, hidden, g * ffn), param_dtype),
                          **sharding(self.spec.expert_sharding()))
    self.w_out = nnx.Param(kernel_init(rngs.params(), (num_experts, ffn, hidden), param_dtype),
                           **sharding(self.spec.expert_sharding()))
    width = num_shared_experts * ffn
    shared = lambda shape: nnx.Param(shared_init(rngs.params(), shape, param_dtype),
                                     **sharding(self.spec.shared_sharding()))
    self.shared_w_in = shared((hidden, g * width)) if num_shared_experts else None
    self.shared_w_out = shared((width, hidden)) if num_shared_experts else None
    # Replicated: every device routes with the whole bias, updated from whole-batch counts.
    # float32 whatever param_dtype is: the updates are small steps that bfloat16 would round off.
    self.expert_bias = (ExpertBias(jnp.zeros((num_experts,), jnp.float32), **sharding((None,)))
                        if expert_bias else None)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, MoEAux]:
    """Runs the layer.

    Args:
      x: `[..., H]` float32/bfloat16/float16, the tokens.

    Returns:
      `(y, aux)`: y `[..., H]` in the compute dtype; aux a `MoEAux` (see the class docstring).

    Raises:
      ValueError: at the call, for a mesh that lacks `axis_name` (or mixes Explicit and Auto
        axes), experts that do not split evenly over the expert axis, tokens that do not split
        evenly over the mesh's devices (or none), or a `shard_map` in context that is manual
        over some of the mesh's axes but not the expert axis, or experts split over Explicit
        mesh axes called where no mesh is set; and what `jax_ccfuser.fused_moe` raises (fused
        dispatch).

    Warns:
      RuntimeWarning: when the experts were placed over Auto mesh axes at construction but no
        mesh is set now (the layer would run as on one device, gathering every expert's
        weights).
    """
    placed = self.spec.axis_name is not None and self.w_in.get_metadata().get("eager_sharding")
    no_mesh = jax.sharding.get_abstract_mesh().empty
    if placed and no_mesh and not explicit_split_axes(self.w_in[...]):
      # (Split over explicit axes, the layer refuses the call instead.)
      warnings.warn(
          f"this MoE layer's experts were placed over the mesh axis {self.spec.axis_name!r} "
          f"when it was made, but it is called where no mesh is set: it runs as on one device, "
          f"every device computing every expert for every token (XLA gathers the weights); "
          f"call it under jax.set_mesh(mesh)", RuntimeWarning, stacklevel=2)
    logits = self.router(x)
    shared = () if self.shared_w_in is None else (self.shared_w_in[...], self.shared_w_out[...])
    x, w_in, w_out, *shared = nnx.nn.dtypes.promote_dtype(
        (x, self.w_in[...], self.w_out[...], *shared), dtype=self.dtype)
    bias = None if self.expert_bias is None else self.expert_bias[...]
    return self.spec(x, logits, w_in, w_out, expert_bias=bias, shared=tuple(shared) or None)


__all__ = [
    "MoE",
    "MoEAux",
    "ExpertBias",
]
