"""Entry points outside the stable API; they may change between releases.

`fused_moe_emulated` runs `fused_moe`'s handler and kernels for D emulated peers on one device:
the remote-read path, exercised and timed without D devices.
"""

from jax_ccfuser._fused import fused_moe_emulated

__all__ = [
    "fused_moe_emulated",
]
