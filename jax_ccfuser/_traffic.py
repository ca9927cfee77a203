"""What `fused_moe` moved between devices, as recorded by its handlers."""

from jax_ccfuser import _extension
from jax_ccfuser._all_to_all import _capacity


def peer_traffic(*, clear: bool = False) -> list[dict]:
  """Per-device traffic of the latest call of each `fused_moe` site (CPU handlers).

  Each device reads every distinct (source, token) row its experts need once, however many of
  the token's K experts it holds, and writes back one float32 partial-sum row per such token.

  Args:
    clear: empty the table after reading it (e.g. before the call you want to measure).

  Returns:
    A list of dicts, one per (site, direction, rank): `site`, `rank`, `backward`, `pairs`
    (routed (token, k) pairs computed), `remote_rows_read`, `remote_bytes_read` (x rows, and dy
    rows in the backward pass, from other devices), `remote_rows_written`,
    `remote_bytes_written` (partial sums into other devices' staging).

  Examples:
    >>> jax_ccfuser.peer_traffic(clear=True)
    >>> jax.block_until_ready(step(x))
    >>> sum(r["remote_bytes_read"] for r in jax_ccfuser.peer_traffic())
  """
  return list(_extension.cpu.traffic_records(clear))


def all_to_all_bytes(tokens: int, k: int, num_experts: int, num_devices: int, hidden: int,
                     itemsize: int, capacity_factor: float | None = None) -> int:
  """Bytes one device sends to other devices in `all_to_all_moe`'s forward (dispatch + combine).

  Its buffers have a fixed size whatever the routing: `[D, E_local, C, H]` each way, of which
  the `(D - 1) / D` addressed to other devices leaves the device; C is the baseline's capacity
  (`T * K` dropless).
  """
  capacity = _capacity(capacity_factor, tokens=tokens, k=k, num_experts=num_experts)
  per_direction = (num_devices - 1) * (num_experts // num_devices) * capacity * hidden * itemsize
  return 2 * per_direction
