"""Eight simulated CPU devices for every test, so the cross-device protocol runs for real, and
XLA's CPU compiler without LLVM's optimisations."""

import importlib.metadata
import os

import jax

# Compiling takes most of this suite's time, and its arrays are too small for optimised code to
# pay: without LLVM's optimisation passes the suite runs a fifth faster (the multi-process tests
# a quarter). Set before any backend starts; the processes the tests start inherit it, the
# multi-process workers (whose device count is their own) take COMPILE_FLAGS, and only the
# deadlock test's process keeps XLA's defaults. Not where JAX may run on a GPU (its plugin
# installed, the CPU not forced): XLA's GPU compiler reads the same flags.
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_GPU_PLUGIN = any((d.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")
                  for d in importlib.metadata.distributions())
if os.environ.get("JAX_PLATFORMS") == "cpu" or not _GPU_PLUGIN:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_FLAGS}".strip()

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
