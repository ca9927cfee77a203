"""Entry points outside the stable API; they may change between releases.

`fused_moe_emulated` runs `fused_moe`'s handler and kernels for D emulated peers on one device:
the remote-read path, exercised and timed without D devices. `reserve_cpu_threads` sizes
XLA:CPU's thread pool for more simulated devices than the 8 `import jax_ccfuser` reserves for.
"""

from jax_ccfuser._cpu_threads import reserve_cpu_threads
from jax_ccfuser._fused import fused_moe_emulated

__all__ = [
    "fused_moe_emulated",
    "reserve_cpu_threads",
]
