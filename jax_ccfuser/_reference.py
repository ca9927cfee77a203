"""`reference_moe`: the ground truth, one (token, k) pair at a time in plain `jax.numpy`."""

import jax
import jax.numpy as jnp

from jax_ccfuser._broadcasting import numpy_broadcasting
from jax_ccfuser._ffn import expert_ffn, no_tokens
from jax_ccfuser._reassign import Plan
from jax_ccfuser._validation import Operand, check_moe_args


@numpy_broadcasting
@jax.named_call
def reference_moe(x: Operand, expert_ids: Operand, expert_weights: Operand,
                  w_in: Operand, w_out: Operand, *, axis_name: str | None = None,
                  activation: str = "swiglu", plan: Plan | None = None) -> jax.Array:
  """`y[t] = sum_k expert_weights[t, k] * FFN_{expert_ids[t, k]}(x[t])`, computed naively.

  Inside `jax.shard_map` the experts' weights are gathered over `axis_name` (this is a checker,
  not a fast path). `plan` is accepted for signature parity and ignored: a plan never changes
  results. A token with an id outside `[0, E)` gets NaN (where `fused_moe` raises an error).
  Products accumulate in float32, and the activations are rounded to the weights' dtype before
  the second GEMM, as the GPU kernels feed their tensor cores (the CPU handlers keep float32
  there): in 16-bit dtypes this is less exact than either, and in float16 activations past
  65504 overflow. Give it float32 operands for a tighter check.

  Args:
    x: `[T, H]` float32/bfloat16/float16, this device's tokens.
    expert_ids: `[T, K]` int32, global expert ids in `[0, D * E_local)`.
    expert_weights: `[T, K]`, x's dtype or float32.
    w_in: `[E_local, H, 2F]` (gated) or `[E_local, H, F]`.
    w_out: `[E_local, F, H]`.
    axis_name: the expert-parallel mesh axis, or `None`.
    activation: "swiglu", "geglu", "gelu", "relu" or "silu".
    plan: ignored.

  Returns:
    `[T, H]`, x's dtype.

  Examples:
    Two tokens, each routed to both of two experts (H = 3, F = 2):

    >>> x = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    >>> ids = jnp.array([[0, 1], [1, 0]], jnp.int32)
    >>> weights = jnp.array([[0.75, 0.25], [0.5, 0.5]])
    >>> w_in = jnp.stack([jnp.eye(3, 2), -jnp.eye(3, 2)])  # [E, H, F]
    >>> w_out = jnp.stack([jnp.eye(2, 3), jnp.eye(2, 3)])  # [E, F, H]
    >>> print(jax_ccfuser.reference_moe(x, ids, weights, w_in, w_out, activation="relu"))
    [[0.75 0.   0.  ]
     [0.   0.5  0.  ]]
  """
  del plan
  (x, expert_ids, expert_weights, w_in, w_out), _ = check_moe_args(
      x, expert_ids, expert_weights, w_in, w_out, activation=activation, axis_name=axis_name)
  if x.shape[0] == 0:
    return no_tokens(x)
  if axis_name is not None:
    w_in = jax.lax.all_gather(w_in, axis_name, axis=0, tiled=True)
    w_out = jax.lax.all_gather(w_out, axis_name, axis=0, tiled=True)

  def one_pair(e, xt):  # e: [], xt: [H] -> [H] float32
    return expert_ffn(xt[None], w_in[e], w_out[e], activation)[0]

  per_k = jax.vmap(jax.vmap(one_pair, in_axes=(0, None)), in_axes=(0, 0))(expert_ids, x)
  # Indexing clamps an id outside [0, E) to an expert that exists, which a checker must not pass
  # off as a result. NaN rather than an error: raising on one device would leave its peers
  # waiting in the gathers above.
  outside = (expert_ids < 0) | (expert_ids >= w_in.shape[0])
  per_k = jnp.where(outside[..., None], jnp.nan, per_k)
  y = jnp.einsum("tk,tkh->th", expert_weights.astype(jnp.float32), per_k)
  return y.astype(x.dtype)
