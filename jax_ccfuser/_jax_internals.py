"""The JAX internals jax_ccfuser relies on, each with what happens where a JAX lacks it.

JAX has no public spelling for these. Each was checked with jax 0.10.2 (requirements.lock), 0.11.2
(requirements-0.11.lock, `make test-jax-0.11`) and 0.12.0.1 (requirements-latest.lock,
`make test-jax-latest`); `pyproject.toml` declares that range.
"""

import jax

CHECKED_WITH = "jax 0.10.2, 0.11.2 and 0.12.0.1"


def _missing(what: str) -> RuntimeError:
  return RuntimeError(f"jax_ccfuser needs {what}, which jax {jax.__version__} does not have "
                      f"(checked with {CHECKED_WITH})")


try:  # the mesh of `jax.set_mesh`, also while tracing (`jax.sharding.get_mesh` refuses under jit)
  from jax._src.mesh import get_concrete_mesh as _get_concrete_mesh
except ImportError:
  _get_concrete_mesh = None

try:  # whether a backend exists yet, which fixes XLA:CPU's thread pool
  from jax._src.xla_bridge import backends_are_initialized as _backends_are_initialized
except ImportError:
  _backends_are_initialized = None

try:  # jax.distributed's key-value store
  from jax._src import distributed as _distributed
except ImportError:
  _distributed = None


try:  # whether the shard_map being traced checks varying axes (its check_vma)
  from jax._src.config import _check_vma
except ImportError:
  _check_vma = None


def concrete_mesh():
  """The concrete mesh set by `jax.set_mesh`, or None where it is not set or JAX has no way to
  tell (callers that must know say so)."""
  if _get_concrete_mesh is None:
    return None
  mesh = _get_concrete_mesh()
  return None if mesh.empty else mesh


def backends_initialized() -> bool:
  """Whether JAX has created its backends; True where JAX cannot tell, so nothing assumes it may
  still configure them."""
  return True if _backends_are_initialized is None else _backends_are_initialized()


def distributed_client():
  """`jax.distributed`'s key-value store client, or None before `jax.distributed.initialize`."""
  state = getattr(_distributed, "global_state", None)
  if state is None:
    raise _missing("jax._src.distributed.global_state (the key-value store of jax.distributed)")
  return state.client


def checks_varying_axes() -> bool:
  """Whether the enclosing `jax.shard_map` types values by the axes they vary over (its
  `check_vma`; False outside any, True where JAX cannot tell)."""
  return True if _check_vma is None else bool(_check_vma.value)


def varying_axes(a) -> frozenset:
  """The manual mesh axes `a` varies over inside `jax.shard_map` (its type's `.mat.varying`,
  JAX 0.10 on; empty where the shard_map checks no such types, `check_vma=False`)."""
  mat = getattr(jax.typeof(a), "mat", None)
  if mat is None:
    raise _missing("the mesh axes a value varies over (`jax.typeof(x).mat.varying`)")
  return frozenset(mat.varying)
