"""jax_ccfuser: Mixture-of-Experts with expert parallelism and no all-to-all.

`fused_moe` runs the expert FFN as XLA FFI custom calls that read routed tokens straight from
the other devices' memory and hand results back through shared memory.
"""

from jax_ccfuser import _extension  # registers the FFI targets
from jax_ccfuser._all_to_all import all_to_all_moe
from jax_ccfuser._reference import reference_moe
from jax_ccfuser._router import route

__version__ = "0.1.0"

__all__ = [
    "all_to_all_moe",
    "reference_moe",
    "route",
]
