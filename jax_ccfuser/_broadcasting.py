"""The library's jax.numpy code broadcasts as NumPy does, whatever the user's JAX sets."""

import functools
from typing import Callable, ParamSpec, TypeVar

import jax

_P = ParamSpec("_P")
_R = TypeVar("_R")


def numpy_broadcasting(fn: Callable[_P, _R]) -> Callable[_P, _R]:
  """`fn` traced with rank promotion allowed: the library's jax.numpy code broadcasts as NumPy
  does, whatever `jax_numpy_rank_promotion` the user set for their own code."""
  @functools.wraps(fn)
  def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
    with jax.numpy_rank_promotion("allow"):
      return fn(*args, **kwargs)
  return wrapped
