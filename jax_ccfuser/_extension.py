"""Loads the native extensions and registers their XLA FFI targets, once, at import.

The CPU extension is required; the CUDA one is registered when it was built (nvcc and the
CUTLASS headers present).
Each module's `registrations()` names its targets, so Python never spells a capsule name.
"""

import ctypes
import importlib
import importlib.util
import os

import jax
import jaxlib.version

# Bumped whenever the FFI signatures, the modules' functions or the shared liveness page change
# (xla_ffi/ffi_module.h holds the native side's copy); the native modules report the value they
# were built with, so a stale build fails here with instructions instead of deep inside XLA.
ABI_VERSION = 8

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_REBUILD = (f"rebuild it (jax_ccfuser imported from {_PACKAGE}): from the repository root, "
            f"`make install`, or `pip install --no-build-isolation -e .` in an environment with "
            f"the build requirements")


def _load_openblas() -> None:
  """Loads scipy-openblas32's library wherever that package is installed: the CPU extension's
  run path finds it only beside jax_ccfuser in one site-packages (`pip install --target` or
  `--user` split them)."""
  try:
    import scipy_openblas32
    ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(),
                             f"lib{scipy_openblas32.get_library()}.so"))
  except (ImportError, OSError) as e:
    raise ImportError(f"jax_ccfuser needs scipy-openblas32's library ({e}): "
                      f"pip install scipy-openblas32") from e


def _release(version: str) -> tuple:
  """The release's numbers, as jax compares jaxlib's: a dev build ranks with the release it
  leads to ("0.11.0.dev20251201" -> (0, 11, 0)), an rc build just below it ("0.5.0rc1" ->
  (0, 5))."""
  return tuple(int(p) for p in version.split("+")[0].split(".") if p.isdigit())


def _check_jaxlib(module: str, built: str, running: str) -> None:
  """Refuses a module built against a newer jaxlib's FFI headers than the one running: that
  jaxlib refuses its handlers when its backend starts and so fails every computation, JAX's
  own too (pip's isolated build takes the newest jax, whatever the environment has)."""
  if built and _release(running) < _release(built):
    raise ImportError(
        f"jax_ccfuser's native extension {module} was built against jaxlib {built}'s FFI "
        f"headers, but jaxlib {running} runs here, which would refuse its handlers and then "
        f"fail every JAX computation: upgrade jax and jaxlib to {built} or later, or {_REBUILD} "
        f"(pip's isolated build compiles against the newest jax)")


def _load(module: str):
  try:
    ext = importlib.import_module(f"jax_ccfuser.{module}")
  except ImportError as e:
    raise ImportError(f"jax_ccfuser's native extension {module} is missing or cannot be loaded "
                      f"({e}); {_REBUILD}") from e
  if ext.abi_version() != ABI_VERSION:
    raise ImportError(f"jax_ccfuser's native extension {module} was built for ABI "
                      f"{ext.abi_version()}, this Python package expects {ABI_VERSION}; {_REBUILD}")
  _check_jaxlib(module, ext.jaxlib_version(), jaxlib.version.__version__)
  return ext


def _register(ext, platform: str) -> None:
  for name, capsule in ext.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform=platform)


_load_openblas()
cpu = _load("_ccfuser_cpu")
_register(cpu, "cpu")

# The call contract as the native side defines it: {attribute name: numpy dtype name, "[]" after
# an array's} (xla_ffi/moe_call.h) and {activation name: `activation` value} (common/activation.h).
CALL_ATTRIBUTES = cpu.call_attributes()
ACTIVATION_CODES = cpu.activation_codes()

# Built only where nvcc and the CUTLASS headers were found; without it the CPU targets are all
# there is.
cuda = None
if importlib.util.find_spec("jax_ccfuser._ccfuser_cuda") is not None:
  cuda = _load("_ccfuser_cuda")
  _register(cuda, "CUDA")
