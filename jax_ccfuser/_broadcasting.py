"""The library's jax.numpy code broadcasts as NumPy does, whatever the user's JAX sets."""

import functools

import jax


def numpy_broadcasting(fn):
  """`fn` traced with rank promotion allowed: the library's jax.numpy code broadcasts as NumPy
  does, whatever `jax_numpy_rank_promotion` the user set for their own code."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.numpy_rank_promotion("allow"):
      return fn(*args, **kwargs)
  return wrapped
