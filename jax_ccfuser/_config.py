"""Settings fixed when a `fused_moe` call is traced: the peer timeout, the transport, the
residual budget, the scratch budget, the SMs kept for the fetch, and (JAX's own setting) whether
float32 GEMMs may run as TF32.

Ours are JAX user contexts (`jax.make_user_context`), thread-local and part of `jax.jit`'s cache
key as JAX's own settings are: a jitted function called under another value traces again. Each
takes its process-wide value from an environment variable, read when jax_ccfuser is imported and
checked as the setting's own values are: a bad one fails the import, naming it."""

import contextlib
import numbers
import os
import threading
from typing import Literal

import jax

AUTO_FETCH_SMS = -1  # the call attribute's "one SM in eight of the GPU's", which the handler knows
TRANSPORTS = ("auto", "shared_memory", "collectives")
# A wait without end is a hang; the handlers count the timeout in int64 nanoseconds.
_MAX_TIMEOUT_SECONDS = 1e9


def _number(setting: str, value, what: str):
  """`value`, which must be a real number (not a bool: `True` bytes or seconds is a slip)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{setting} takes {what}, got {value!r}")
  return value


def _whole(value) -> bool:
  try:
    return value == int(value)
  except (OverflowError, ValueError):  # inf, NaN
    return False


def _checked_timeout(seconds) -> float:
  if not 0 < _number("peer_timeout", seconds, "a number of seconds") <= _MAX_TIMEOUT_SECONDS:
    raise ValueError(f"peer_timeout must be positive and at most {_MAX_TIMEOUT_SECONDS:g} "
                     f"seconds, got {seconds}")
  return float(seconds)


def _checked_transport(kind) -> str:
  if not isinstance(kind, str) or kind not in TRANSPORTS:
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
  return kind


# The call attributes are int64 bytes and an int32 SM count.
_MAX_BYTES, _MAX_SMS = 2**63 - 1, 2**31 - 1


def _checked_residual_bytes(nbytes) -> int:
  nbytes = _number("residual_budget", nbytes, "a number of bytes")
  if not (_whole(nbytes) and 0 <= nbytes <= _MAX_BYTES):
    raise ValueError(f"residual_budget must be a whole number of bytes >= 0 (and below 2^63), "
                     f"got {nbytes!r}")
  return int(nbytes)


def _checked_scratch_bytes(nbytes) -> int:
  nbytes = _number("scratch_budget", nbytes, "a number of bytes")
  if not (_whole(nbytes) and 0 < nbytes <= _MAX_BYTES):
    raise ValueError(f"scratch_budget must be a whole number of bytes > 0 (and below 2^63), "
                     f"got {nbytes!r}")
  return int(nbytes)


def _checked_fetch_sms(count) -> int:
  if count is None:
    return AUTO_FETCH_SMS
  count = _number("fetch_sms", count, "a number of SMs or None")
  if not (_whole(count) and 0 <= count <= _MAX_SMS):
    raise ValueError(f"fetch_sms must be a whole number >= 0 or None, got {count!r}")
  return int(count)


def _fetch_sms_from_environment(value: str) -> int:
  """"auto" (or -1, the attribute's own value for it) is the default's one SM in eight."""
  return AUTO_FETCH_SMS if value.strip() in ("auto", "-1") else _checked_fetch_sms(float(value))


# Each setting's environment variable, default, and how a value of it is read and checked.
# Generous by default: with many simulated devices on few cores a peer can lag a whole layer.
# The residual budget: one layer's kept hidden rows of a Qwen3-30B-A3B-sized layer (T=4096, K=8,
# 2F=1536: 192 MiB) fit, a DeepSeek-V3 or Mixtral-sized one's (512 / 896 MiB) do not.
# The scratch budget: a Qwen3-30B-A3B-sized backward (T=4096, K=8 per device) holds its mean
# load in one chunk; a DeepSeek-V3 or Mixtral-sized one takes two or more.
# The fetch's SMs: one in eight (16 of an H100's 132), about what reading NVLink at its rate
# takes with 16-byte loads, 4 in flight per lane (bytes in flight ~ bandwidth x latency), and
# few enough on a small GPU; a first choice, which bench/gpu.py measures against 0.
_SETTINGS = {
    "seconds": ("JAX_CCFUSER_PEER_TIMEOUT", 300.0, lambda v: _checked_timeout(float(v))),
    "transport": ("JAX_CCFUSER_TRANSPORT", "auto", _checked_transport),
    "residual_bytes": ("JAX_CCFUSER_RESIDUAL_BUDGET", 256 << 20,
                       lambda v: _checked_residual_bytes(float(v))),
    "scratch_bytes": ("JAX_CCFUSER_SCRATCH_BUDGET", 2 << 30,
                      lambda v: _checked_scratch_bytes(float(v))),
    "fetch_sms": ("JAX_CCFUSER_FETCH_SMS", AUTO_FETCH_SMS, _fetch_sms_from_environment),
}


def process_defaults(environ) -> dict:
  """Each setting's process-wide value: its environment variable's in `environ`, checked as the
  setting's own values are (a bad one is an error naming the variable), else the default."""
  defaults = {}
  for name, (variable, default, read) in _SETTINGS.items():
    if variable not in environ:
      defaults[name] = default
      continue
    try:
      defaults[name] = read(environ[variable])
    except ValueError as error:
      raise ValueError(f"jax_ccfuser: the environment variable {variable}="
                       f"{environ[variable]!r} is not a valid setting: {error}") from None
  return defaults


_DEFAULTS = process_defaults(os.environ)
# Made once, at import: JAX makes user contexts only where nothing else runs at once.
_CONTEXTS = {name: jax.make_user_context(default) for name, default in _DEFAULTS.items()}


def _current(name):
  return _CONTEXTS[name].value


class _Setting(contextlib.ContextDecorator):
  """One setting's value for a block (or a decorated function): enterable again, nested and from
  several threads at once, as JAX's own settings are."""

  def __init__(self, name, value, made_by, argument):
    self._context, self._value = _CONTEXTS[name], value
    self._made = f"jax_ccfuser.{made_by}({argument!r})"  # as the user wrote it
    self._entered = threading.local()  # per thread, the contexts this object entered

  def __repr__(self):
    return self._made

  def __enter__(self) -> "_Setting":
    context = self._context(self._value)
    context.__enter__()
    self._entered.__dict__.setdefault("stack", []).append(context)
    return self

  def __exit__(self, *exc: object) -> Literal[False]:
    self._entered.stack.pop().__exit__(*exc)
    return False


def peer_timeout_ms() -> int:
  """The timeout in force for calls traced now, in milliseconds."""
  return max(1, round(1000 * _current("seconds")))


def peer_timeout(seconds: float) -> _Setting:
  """Sets how long `fused_moe` calls traced inside the block wait for a missing peer.

  The value is fixed when a call is traced (it becomes an attribute of the custom call). Like
  JAX's own settings it is part of `jax.jit`'s cache key: a jitted function called under another
  value traces (and compiles) again. Usable as a decorator too. The process-wide default is 300 s
  or the environment variable `JAX_CCFUSER_PEER_TIMEOUT` (seconds).

  Args:
    seconds: how long a call waits for a missing peer, > 0 and at most 1e9 seconds.

  Returns:
    A context manager for a `with` block, also usable as a decorator.

  Raises:
    TypeError: for a value that is not a real number (a bool included).
    ValueError: for one not in (0, 1e9].

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))  # 8 tokens, 4 experts on one device
    >>> ids, weights, _ = jax_ccfuser.route(x[:, :4], 2)
    >>> w_in, w_out = jnp.ones((4, 16, 64)) / 16, jnp.ones((4, 32, 16)) / 32
    >>> step = jax.jit(lambda x: jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out))
    >>> with jax_ccfuser.peer_timeout(5.0):
    ...   y = step(x)  # traced here, so its calls wait up to 5 s for a missing peer
  """
  return _Setting("seconds", _checked_timeout(seconds), "peer_timeout", seconds)


def transport_in_force() -> str:
  """The transport in force for calls traced now."""
  return _current("transport")


def transport(kind: str) -> _Setting:
  """Forces how `fused_moe` calls traced inside the block reach devices of other processes.

  - "auto" (the default, or the environment variable `JAX_CCFUSER_TRANSPORT`): processes that
    report the same host (`JAX_CCFUSER_HOST`, else the host name) share memory; rows for experts
    on other hosts go through XLA collectives.
  - "shared_memory": every process is on one host (checked): all rows go through shared memory.
  - "collectives": each process is a host of its own: rows for experts in other processes go
    through XLA collectives, devices of one process still read each other's memory.

  Within one process every transport is the same. Across processes, every process must force
  the same transport for the same call: tracing it under another one than the process that
  traced it first fails (that process waits out its peer timeout). Fixed when a call is traced,
  like `peer_timeout`.

  Args:
    kind: "auto", "shared_memory" or "collectives".

  Returns:
    A context manager for a `with` block, also usable as a decorator.

  Raises:
    ValueError: for another kind.

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))  # 8 tokens, 4 experts on one device
    >>> ids, weights, _ = jax_ccfuser.route(x[:, :4], 2)
    >>> w_in, w_out = jnp.ones((4, 16, 64)) / 16, jnp.ones((4, 32, 16)) / 32
    >>> step = jax.jit(lambda x: jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out))
    >>> with jax_ccfuser.transport("collectives"):
    ...   y = step(x)  # across processes, through XLA collectives only
  """
  return _Setting("transport", _checked_transport(kind), "transport", kind)


def residual_budget_bytes() -> int:
  """The per-device budget in force for `residuals="auto"` calls traced now, in bytes."""
  return _current("residual_bytes")


def residual_budget(nbytes: int) -> _Setting:
  """Sets how many bytes per device `fused_moe(..., residuals="auto")` may keep for the backward.

  A call traced inside the block keeps its hidden activations (`residuals="hidden"`) when they
  fit, `T * K * G * F * 4` bytes per device (float32 rows of `x @ w_in`, `G = 2` for gated
  activations), and recomputes them otherwise (`residuals="inputs"`). The budget is per call:
  a model with L such layers keeps up to L times it. Fixed when a call is traced, like
  `peer_timeout`. The process-wide default is 256 MiB or the environment variable
  `JAX_CCFUSER_RESIDUAL_BUDGET` (bytes).

  Args:
    nbytes: bytes per device and call, a whole number >= 0.

  Returns:
    A context manager for a `with` block, also usable as a decorator.

  Raises:
    TypeError: for a value that is not a real number (a bool included).
    ValueError: for one that is not a whole number in [0, 2^63).

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))  # 8 tokens, 4 experts on one device
    >>> ids, weights, _ = jax_ccfuser.route(x[:, :4], 2)
    >>> w_in, w_out = jnp.ones((4, 16, 64)) / 16, jnp.ones((4, 32, 16)) / 32
    >>> loss = lambda w_in: jnp.sum(jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out,
    ...                                                   residuals="auto") ** 2)
    >>> with jax_ccfuser.residual_budget(1 << 30):
    ...   grads = jax.jit(jax.grad(loss))(w_in)  # keeps h: 8 * 2 * 64 * 4 bytes fit
  """
  return _Setting("residual_bytes", _checked_residual_bytes(nbytes), "residual_budget",
                  nbytes)


def scratch_budget_bytes() -> int:
  """The per-call GPU scratch budget in force for calls traced now, in bytes."""
  return _current("scratch_bytes")


def scratch_budget(nbytes: int) -> _Setting:
  """Sets how many bytes of scratch one `fused_moe` call may take from XLA on a GPU.

  The rows a GPU computes depend on the routing, up to every pair of the group (`D * T * K`
  rows of `x`, `x @ w_in` and more) in the worst case, so the call works through them in chunks
  of as many rows as the budget holds: no chunking where the worst case fits, several rounds of
  fetch, GEMMs and scatter otherwise. Results are bitwise the same for every budget, but for
  the weight gradients on Hopper in bfloat16 and float16: where an expert's rows cross a chunk
  edge, its grouped GEMMs add their float32 sums in another order (still the same for a given
  budget). A small budget costs a few launches per chunk, and one chunk always holds at least
  one GEMM tile of rows (plus, in the backward, one expert's float32 weight gradients carried
  between chunks). A backward under a `reassign` plan with S helpers (`workers [E, S + 1]`,
  S > 0) also keeps S + 1 float32 weight gradients of each of the device's experts (unless no
  weight gradient is wanted); tracing it fails where they take more than half the budget. CPU
  calls ignore it. Fixed when a call is traced, like `peer_timeout`. The process-wide default
  is 2 GiB or the environment variable `JAX_CCFUSER_SCRATCH_BUDGET` (bytes).

  Args:
    nbytes: bytes per call, a whole number > 0.

  Returns:
    A context manager for a `with` block, also usable as a decorator.

  Raises:
    TypeError: for a value that is not a real number (a bool included).
    ValueError: for one that is not a whole number in (0, 2^63).

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))  # 8 tokens, 4 experts on one device
    >>> ids, weights, _ = jax_ccfuser.route(x[:, :4], 2)
    >>> w_in, w_out = jnp.ones((4, 16, 64)) / 16, jnp.ones((4, 32, 16)) / 32
    >>> loss = lambda w_in: jnp.sum(jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out,
    ...                                                   residuals="auto") ** 2)
    >>> with jax_ccfuser.scratch_budget(512 << 20):
    ...   grads = jax.jit(jax.grad(loss))(w_in)  # on a GPU, in chunks of at most 512 MiB
  """
  return _Setting("scratch_bytes", _checked_scratch_bytes(nbytes), "scratch_budget", nbytes)


def fetch_sms_in_force() -> int:
  """The SMs kept for the fetch by GPU calls traced now; `AUTO_FETCH_SMS` for the default."""
  return _current("fetch_sms")


def fetch_sms(count: int | None) -> _Setting:
  """Sets how many SMs a GPU's GEMMs leave free while peers' rows are still being fetched.

  A GPU fetches the rows its peers send it source by source, on a stream of its own, while its
  GEMMs work through the rows already there. The GEMMs run persistent grids that take every SM
  they are given, so the fetch would otherwise wait for SMs until a GEMM ends; with `count` > 0
  the peers' rows are fetched by `count` blocks that hold an SM each, and the GEMMs of those
  phases run on the other SMs, on all of them once the last rows are in. 0 runs every GEMM on
  every SM; None (the default) keeps one SM in eight, 16 of an H100's 132. Results are bitwise
  the same for every count. CPU calls ignore it. Fixed when a call is traced, like
  `peer_timeout`. The environment variable `JAX_CCFUSER_FETCH_SMS` sets a process-wide count
  ("auto" for the default).

  Args:
    count: SMs, a whole number >= 0, or `None` for one in eight.

  Returns:
    A context manager for a `with` block, also usable as a decorator.

  Raises:
    TypeError: for a value that is neither a real number (a bool included) nor None.
    ValueError: for one that is not a whole number >= 0; when a call is traced on a GPU, for
      a count that leaves its GEMMs no SM.

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))  # 8 tokens, 4 experts on one device
    >>> ids, weights, _ = jax_ccfuser.route(x[:, :4], 2)
    >>> w_in, w_out = jnp.ones((4, 16, 64)) / 16, jnp.ones((4, 32, 16)) / 32
    >>> step = jax.jit(lambda x: jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out))
    >>> with jax_ccfuser.fetch_sms(0):
    ...   y = step(x)  # on a GPU, every GEMM on every SM
  """
  return _Setting("fetch_sms", _checked_fetch_sms(count), "fetch_sms", count)


# jax.default_matmul_precision's values that let float32 GEMMs run as TF32: TF32's own names and
# preset, and those whose operands keep no more bits than TF32's (its sums stay float32).
TF32_PRECISIONS = ("tensorfloat32", "high", "TF32_TF32_F32", "bfloat16", "BF16_BF16_F32",
                   "BF16_BF16_BF16", "F16_F16_F32", "F16_F16_F16", "ANY_F8_ANY_F8_F32",
                   "ANY_F8_ANY_F8_F32_FAST_ACCUM", "ANY_F8_ANY_F8_ANY",
                   "ANY_F8_ANY_F8_ANY_FAST_ACCUM")


def tf32_in_force() -> bool:
  """Whether GPU calls traced now may multiply float32 operands as TF32.

  The opt-in is JAX's own: `jax.default_matmul_precision` (or the `jax_default_matmul_precision`
  flag) set to one of `TF32_PRECISIONS` lets a GPU's float32 expert GEMMs run on tensor cores as
  TF32, each operand rounded to the nearest TF32 and every sum kept in float32, where H and F are
  multiples of 4. Unset, or any other value, keeps them exact float32. bfloat16/float16 calls
  and CPU calls are unaffected. Fixed when a call is traced, as JAX fixes a `dot`'s precision.

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))  # 8 tokens, 4 experts on one device
    >>> ids, weights, _ = jax_ccfuser.route(x[:, :4], 2)
    >>> w_in, w_out = jnp.ones((4, 16, 64)) / 16, jnp.ones((4, 32, 16)) / 32
    >>> loss = lambda w_in: jnp.sum(jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out,
    ...                                                   residuals="auto") ** 2)
    >>> with jax.default_matmul_precision("tensorfloat32"):
    ...   grads = jax.jit(jax.grad(loss))(w_in)  # on a GPU, float32 GEMMs as TF32
  """
  return jax.config.jax_default_matmul_precision in TF32_PRECISIONS
