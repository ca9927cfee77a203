"""The expert feed-forward network, in plain `jax.numpy`: one definition for every path."""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Activation(NamedTuple):
  fn: Callable[[jax.Array], jax.Array]
  gated: bool


@jax.custom_jvp
def _gelu(x):
  """Exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`, with its derivative spelled out.

  JAX 0.12's own derivative of `erfc` binds `lax.polynomial` with coefficients that do not vary
  over the manual axes of a `shard_map`, which its varying-axes check refuses (checked with
  0.12.0.1; 0.10.2 and 0.11 differentiate it without `polynomial`). The rule below is the one
  autodiff of `x * Phi(x)` gives, in the same operations.
  """
  return jax.nn.gelu(x, approximate=False)


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  sqrt_half = np.sqrt(0.5).astype(x.dtype)
  z = -x * sqrt_half
  erfc_slope = (-2 / np.sqrt(np.pi)).astype(x.dtype) * jnp.exp(-z * z)  # d erfc(z) / dz
  slope = 0.5 * jax.lax.erfc(z) + 0.5 * x * erfc_slope * -sqrt_half
  return _gelu(x), slope * t


# Gated activations read the gate from the first half of `w_in`'s output and multiply it into the
# second half: `act(x @ w_in[:, :F]) * (x @ w_in[:, F:])`.
ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(jax.nn.silu, gated=True),
    "geglu": Activation(_gelu, gated=True),
    "gelu": Activation(_gelu, gated=False),
    "relu": Activation(jax.nn.relu, gated=False),
    "silu": Activation(jax.nn.silu, gated=False),
}


def expert_ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation: str) -> jax.Array:
  """One expert's FFN on a batch of rows, accumulated in float32.

  Args:
    x: `[N, H]` rows.
    w_in: `[H, 2F]` (gated) or `[H, F]`.
    w_out: `[F, H]`.
    activation: a key of `ACTIVATIONS`.

  Returns:
    `[N, H]` float32.
  """
  act = ACTIVATIONS[activation]
  h = jnp.dot(x, w_in, preferred_element_type=jnp.float32)
  if act.gated:
    gate, up = jnp.split(h, 2, axis=-1)
    a = act.fn(gate) * up
  else:
    a = act.fn(h)
  return jnp.dot(a.astype(w_out.dtype), w_out, preferred_element_type=jnp.float32)


def no_tokens(x: jax.Array) -> jax.Array:
  """The layer's output where no device has a token (shapes are static, so none has): nothing to
  compute, and zero gradients for the weights. No call and no gather is traced: XLA (jax 0.11)
  crashes compiling the gradient of a zero-sized custom-call operand, or of a zero-sized gather,
  under shard_map."""
  return x * 0
