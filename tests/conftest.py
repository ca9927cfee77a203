"""Eight simulated CPU devices for every test, so the cross-device protocol runs for real, and
XLA's CPU compiler without LLVM's optimisations."""

import importlib.metadata
import os

import jax

# Compiling takes most of this suite's time, and its arrays are too small for optimised code to pay.
# Without LLVM's optimisation passes the suite ran a fifth faster (the multi-process tests a
# quarter); XLA:CPU's older loop emitters, Eigen's dots in place of XNNPACK's, its plain scheduler
# and one codegen piece (not split over two busy cores) cut the backend compile to about a third
# again (tests/test_flax.py: 117 s to 43 s; the whole suite from 19-22 minutes to 11-15). None of
# them is what the tests check: every result is compared with another computed under the same flags.
# Set before any backend starts; the processes the tests start inherit it, the multi-process workers
# (whose device count is their own) take COMPILE_FLAGS, and only the deadlock test's process keeps
# XLA's defaults. Not where JAX may run on a GPU (its plugin installed, the CPU not forced): XLA's
# GPU compiler reads the same flags.
COMPILE_FLAGS = " ".join((
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_xnnpack=false", "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "--xla_cpu_parallel_codegen_split_count=1",
    # XLA aborts on a flag it does not know: the older emitters left with jaxlib 0.11.
    *(["--xla_cpu_use_fusion_emitters=false"]
      if tuple(map(int, importlib.metadata.version("jaxlib").split(".")[:2])) < (0, 11) else [])))
_GPU_PLUGIN = any((d.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")
                  for d in importlib.metadata.distributions())
if os.environ.get("JAX_PLATFORMS") == "cpu" or not _GPU_PLUGIN:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_FLAGS}".strip()

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
