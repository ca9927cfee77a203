"""What `fused_moe` moved between devices, as recorded by its handlers."""

from jax_ccfuser import _extension
from jax_ccfuser._all_to_all import expert_capacity
from jax_ccfuser._validation import check_count, check_num_experts


def peer_traffic(*, clear: bool = False) -> list[dict]:
  """Per-device traffic of the latest call of each `fused_moe` site (CPU handlers).

  Each device reads every distinct (source, token) row its experts need once, however many of
  the token's K experts it holds, and writes back one float32 partial-sum row per such token.

  The table keeps a site's rows until it is cleared, after its function is gone too: a program
  that traces anew (a new jit, shapes that change) adds a site's rows each time.

  Args:
    clear: empty the table after reading it (e.g. before the call you want to measure).

  Returns:
    A list of dicts, one per (site, direction, rank): `site`, `rank`, `backward`, `pairs`
    (routed (token, k) pairs computed), `remote_rows_read`, `remote_bytes_read` (x rows, and dy
    rows in the backward pass, from other devices), `remote_rows_written`,
    `remote_bytes_written` (partial sums into other devices' staging).

  Examples:
    Eight devices of 2 experts and 8 tokens each; every token picks experts 0 and 2, so devices
    0 and 1 each read the 56 tokens of the 7 others once and write a row back for each:

    >>> from jax.sharding import AxisType, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("ep",), axis_types=(AxisType.Auto,))
    >>> x = jax.random.normal(jax.random.key(0), (64, 16))
    >>> ids, weights = jnp.tile(jnp.array([0, 2], jnp.int32), (64, 1)), jnp.full((64, 2), 0.5)
    >>> w_in, w_out = jnp.ones((16, 16, 64)) / 16, jnp.ones((16, 32, 16)) / 32
    >>> layer = jax.jit(jax.shard_map(
    ...     lambda *args: jax_ccfuser.fused_moe(*args, axis_name="ep"), mesh=mesh,
    ...     in_specs=P("ep"), out_specs=P("ep")))
    >>> _ = jax_ccfuser.peer_traffic(clear=True)
    >>> y = jax.block_until_ready(layer(x, ids, weights, w_in, w_out))
    >>> records = sorted(jax_ccfuser.peer_traffic(), key=lambda r: r["rank"])
    >>> [(r["remote_rows_read"], r["remote_rows_written"]) for r in records]
    [(56, 56), (56, 56), (0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (0, 0)]
    >>> records[0]["remote_bytes_read"], records[0]["remote_bytes_written"]  # float32 rows of 16
    (3584, 3584)
  """
  return list(_extension.cpu.traffic_records(clear))


def all_to_all_bytes(tokens: int, k: int, num_experts: int, num_devices: int, hidden: int,
                     itemsize: int, *, capacity_factor: float | None = None) -> int:
  """Bytes one device sends to other devices in `all_to_all_moe`'s forward (dispatch + combine).

  Its buffers have a fixed size whatever the routing: `[D, E_local, C, H]` each way, of which
  the `(D - 1) / D` addressed to other devices leaves the device; C is the baseline's capacity
  (`T * K` dropless).

  Args:
    tokens: T, tokens per device.
    k: K, experts per token.
    num_experts: E, all experts (a multiple of D).
    num_devices: D, devices of the expert-parallel axis.
    hidden: H.
    itemsize: bytes per element of x (2 for bfloat16).
    capacity_factor: `None` for dropless, or a positive float, as `all_to_all_moe` takes it.

  Returns:
    The bytes, an int: what `peer_traffic` counts for `fused_moe` to compare with.

  Examples:
    64 bfloat16 tokens of H = 1024 a device, top-2 of 64 experts over 8 devices, dropless:

    >>> jax_ccfuser.all_to_all_bytes(64, 2, 64, 8, 1024, 2)
    29360128
    >>> jax_ccfuser.all_to_all_bytes(64, 2, 64, 8, 1024, 2, capacity_factor=1.25)
    688128
  """
  experts_local = check_num_experts(num_experts, check_count("num_devices", num_devices))
  tokens, k, hidden, itemsize = (check_count(name, value) for name, value in (
      ("tokens", tokens), ("k", k), ("hidden", hidden), ("itemsize", itemsize)))
  capacity = expert_capacity(capacity_factor, tokens=tokens, k=k, num_experts=num_experts)
  per_direction = (num_devices - 1) * experts_local * capacity * hidden * itemsize
  return 2 * per_direction
