"""jax_ccfuser: Mixture-of-Experts with expert parallelism and no all-to-all.

`fused_moe` runs the expert FFN as XLA FFI custom calls that read routed tokens straight from
the other devices' memory and hand results back through shared memory; across processes of a
host through shared-memory workspaces, across hosts through XLA collectives.
"""

from jax_ccfuser import _cpu_threads

_cpu_threads.reserve_cpu_threads()  # before anything starts a backend

from jax_ccfuser import _extension  # registers the FFI targets  # noqa: E402
from jax_ccfuser import experimental
from jax_ccfuser import placement
from jax_ccfuser._all_to_all import all_to_all_moe
from jax_ccfuser._config import fetch_sms
from jax_ccfuser._config import peer_timeout
from jax_ccfuser._config import residual_budget
from jax_ccfuser._config import scratch_budget
from jax_ccfuser._config import transport
from jax_ccfuser._fused import fused_moe
from jax_ccfuser._reassign import Plan
from jax_ccfuser._reassign import Replication
from jax_ccfuser._reassign import plan_loads
from jax_ccfuser._reassign import reassign
from jax_ccfuser._reference import reference_moe
from jax_ccfuser._router import RouterAux
from jax_ccfuser._router import route
from jax_ccfuser._router import update_expert_bias
from jax_ccfuser._traffic import all_to_all_bytes
from jax_ccfuser._traffic import peer_traffic

__version__ = "0.1.0"

__all__ = [
    "fused_moe",
    "Plan",
    "Replication",
    "plan_loads",
    "reassign",
    "peer_timeout",
    "residual_budget",
    "scratch_budget",
    "fetch_sms",
    "transport",
    "all_to_all_moe",
    "reference_moe",
    "route",
    "RouterAux",
    "update_expert_bias",
    "all_to_all_bytes",
    "peer_traffic",
    "placement",
    "experimental",
]
