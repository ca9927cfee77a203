"""The expert feed-forward network, in plain `jax.numpy`: one definition for every path."""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Activation(NamedTuple):
  fn: Callable[[jax.Array], jax.Array]
  gated: bool


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


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
