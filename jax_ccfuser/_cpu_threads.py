"""XLA:CPU's client thread pool: room for a whole step's launches and executions at once.

XLA:CPU runs the launches of a multi-device program and the devices' executions on one pool of
`max(PJRT_NPROC or the cores, D)` threads. A launch blocks its thread while its device already
has the most computations in flight that XLA allows, and an execution that waits for its peers
in the rendezvous of an XLA collective such as a `psum` holds its thread (`fused_moe`'s handlers
wait on threads of their own). A loop that dispatches far ahead without waiting (ordinary JAX)
then fills the pool with blocked launches while a waiting execution's peers never get a thread:
with 8 devices on 2 cores, a jitted `psum` loop stops after about 50 calls and XLA aborts the
process after 40 s.
With 2 * D threads a step's D launches and D executions all fit, and it runs (the tests:
200 training steps and 1,000 calls in flight).

The pool is sized once, when JAX creates the CPU backend, from the environment variable
`PJRT_NPROC`; so it is set at import, before any backend exists, unless the user set it, and
`jax_ccfuser.experimental.reserve_cpu_threads` raises that setting for more devices until the
backend starts.
"""

import os
import re
import warnings

import jax

from jax_ccfuser import _jax_internals
from jax_ccfuser._validation import check_count

# The simulated device count this library is used with when none is configured yet (the
# devices are often configured after the import; a larger count is reported when traced).
_USUAL_DEVICES = 8
_warned = set()
_reserved = None  # the PJRT_NPROC this module set, if it set one


def _cores() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1  # None where the count is unknown


def _pool_setting():
  """The thread count the environment asks XLA for, or None."""
  for name in ("PJRT_NPROC", "NPROC"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  return None


def _configured_devices() -> int:
  """The CPU device count configured so far (jax_num_cpu_devices, else XLA_FLAGS), or 1."""
  if jax.config.jax_num_cpu_devices > 0:
    return jax.config.jax_num_cpu_devices
  found = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                    os.environ.get("XLA_FLAGS", ""))
  return int(found[1]) if found else 1


def reserve_cpu_threads(num_devices: int | None = None) -> None:
  """Asks XLA:CPU for 2 threads per simulated CPU device, for `num_devices` devices (default: as
  many as configured so far) but never fewer than 8 (16 threads); call it before the first use
  of a backend, which sizes the pool once. A `PJRT_NPROC` (or `NPROC`) the user set is left as
  it is; the one `import jax_ccfuser` set for 8 devices is raised. Called once a backend runs,
  it can only warn where the pool is too small for `num_devices`."""
  global _reserved
  if num_devices is not None:
    num_devices = check_count("num_devices", num_devices)
  if _jax_internals.backends_initialized():
    if num_devices is not None:
      check_pool(num_devices)
    return
  setting = _pool_setting()
  if setting is not None and setting != _reserved:
    return
  wanted = 2 * max(num_devices or _configured_devices(), _USUAL_DEVICES)
  if wanted > max(_cores(), setting or 0):
    os.environ["PJRT_NPROC"] = str(wanted)
    _reserved = wanted


def check_pool(num_devices: int) -> None:
  """Warns once if the process's CPU pool is too small for `num_devices` devices in flight."""
  threads = max(_pool_setting() or _cores(), num_devices)
  if threads >= 2 * num_devices or num_devices in _warned:
    return
  _warned.add(num_devices)
  warnings.warn(
      f"XLA:CPU runs {num_devices} devices on a pool of {threads} threads: a loop that "
      f"dispatches many steps without waiting can stop (XLA's own collectives too). Set "
      f"PJRT_NPROC={2 * num_devices} in the environment, or call "
      f"jax_ccfuser.experimental.reserve_cpu_threads({num_devices}) before the first use of a "
      f"backend, so that JAX starts with {2 * num_devices} threads.",
      RuntimeWarning, stacklevel=3)
