"""How long a device waits for its peers before `fused_moe` raises instead of hanging."""

import contextlib
import os
import threading

# Generous by default: with many simulated devices on few cores a peer can lag a whole layer.
_DEFAULT_S = float(os.environ.get("JAX_CCFUSER_PEER_TIMEOUT", "300"))
_state = threading.local()


def peer_timeout_ms() -> int:
  """The timeout in force for calls traced now, in milliseconds."""
  return max(1, round(1000 * getattr(_state, "seconds", _DEFAULT_S)))


@contextlib.contextmanager
def peer_timeout(seconds: float):
  """Sets how long `fused_moe` calls traced inside the block wait for a missing peer.

  The value is fixed when a call is traced (it becomes an attribute of the custom call), so
  wrap the tracing, e.g. the first call of a `jax.jit` function. The process-wide default is 300 s
  or the environment variable `JAX_CCFUSER_PEER_TIMEOUT` (seconds).

  Examples:
    >>> with jax_ccfuser.peer_timeout(5.0):
    ...   y = jax.jit(step)(x)
  """
  if not seconds > 0:
    raise ValueError(f"peer_timeout must be positive, got {seconds}")
  previous = getattr(_state, "seconds", None)
  _state.seconds = float(seconds)
  try:
    yield
  finally:
    if previous is None:
      del _state.seconds
    else:
      _state.seconds = previous
