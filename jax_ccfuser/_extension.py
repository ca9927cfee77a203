"""Loads the native extensions and registers their XLA FFI targets, once, at import.

The CPU extension is required; the CUDA one is registered when it was built (nvcc present).
Each module's `registrations()` names its targets, so Python never spells a capsule name.
"""

import importlib
import importlib.util

import jax

# Bumped whenever the FFI signatures, the modules' functions or the shared liveness page change
# (xla_ffi/ffi_module.h holds the native side's copy);
# the native modules report the value they were built with, so a stale build fails here with instructions instead of deep inside XLA.
ABI_VERSION = 7

_REBUILD = ("rebuild it from the repository root with `make install` "
            "(or `pip install --no-build-isolation -e .` in an environment with the build "
            "requirements)")


def _load(module: str):
  try:
    ext = importlib.import_module(f"jax_ccfuser.{module}")
  except ImportError as e:
    raise ImportError(f"jax_ccfuser's native extension {module} is missing or cannot be loaded "
                      f"({e}); {_REBUILD}") from e
  if ext.abi_version() != ABI_VERSION:
    raise ImportError(f"jax_ccfuser's native extension {module} was built for ABI "
                      f"{ext.abi_version()}, this Python package expects {ABI_VERSION}; {_REBUILD}")
  return ext


def _register(ext, platform: str) -> None:
  for name, capsule in ext.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform=platform)


cpu = _load("_ccfuser_cpu")
_register(cpu, "cpu")

# The call contract as the native side defines it: {attribute name: numpy dtype name, "[]" after
# an array's} (xla_ffi/moe_call.h) and {activation name: `activation` value} (common/activation.h).
CALL_ATTRIBUTES = cpu.call_attributes()
ACTIVATION_CODES = cpu.activation_codes()

# Built only where nvcc was found; without it the CPU targets are all there is.
cuda = None
if importlib.util.find_spec("jax_ccfuser._ccfuser_cuda") is not None:
  cuda = _load("_ccfuser_cuda")
  _register(cuda, "CUDA")
