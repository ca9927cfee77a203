"""Eight simulated CPU devices for every test, so the cross-device protocol runs for real, and
XLA's CPU compiler without LLVM's optimisations."""

import os

import jax

# Compiling takes most of this suite's time, and its arrays are too small for optimised code to
# pay: without LLVM's optimisation passes the suite runs a fifth faster (the multi-process tests
# a quarter). Set before any backend starts; the processes the tests start inherit it, and those
# that set XLA_FLAGS of their own take COMPILE_FLAGS.
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_FLAGS}".strip()

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
