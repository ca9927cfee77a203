"""Where the devices of an expert-parallel axis live, and how a `fused_moe` call spans them.

Within one process every device reads its peers' memory. Across processes, `split` cuts each
expert-parallel group into blocks of consecutive ranks on one host: the devices of a block meet
in shared memory (`shared` when the block spans processes), and the blocks exchange rows through
XLA collectives. Hosts come from the processes themselves (`JAX_CCFUSER_HOST`, else the host
name), exchanged once through `jax.distributed`'s key-value store; `jax_ccfuser.transport`
overrides them.
"""

import functools
import os
import socket
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType

from jax_ccfuser import _jax_internals
from jax_ccfuser._config import peer_timeout_ms, transport_in_force


class Split(NamedTuple):
  """How one traced call runs over its expert-parallel axis of `num_hosts * per_host` ranks.

  Ranks `[b * per_host, (b + 1) * per_host)` of every group share a host (block b); blocks
  exchange rows through collectives. `devices` lists the global device ids of every block,
  `[G * num_hosts * per_host]` in (group, block, rank in block) order, where blocks span
  processes (`shared`), and is empty otherwise; `platform` is theirs ("cpu" or "gpu").
  """
  num_hosts: int
  per_host: int
  shared: bool
  devices: tuple
  platform: str = ""


def key_value_client():
  """`jax.distributed`'s key-value store (jax.distributed.initialize must have run)."""
  client = _jax_internals.distributed_client()
  if client is None:
    raise RuntimeError("fused_moe across processes needs jax.distributed.initialize() first")
  return client


def exchange(key: str, value: str, timeout_ms: int) -> list:
  """Every process's `value` for `key`, by process index (a collective over processes, which a
  process may take part in again after a timeout, with the same value)."""
  client = key_value_client()
  client.key_value_set(f"jax_ccfuser/{key}/{jax.process_index()}", value, allow_overwrite=True)
  values = []
  for p in range(jax.process_count()):
    try:
      values.append(client.blocking_key_value_get(f"jax_ccfuser/{key}/{p}", timeout_ms))
    except jax.errors.JaxRuntimeError as error:
      raise TimeoutError(
          f"jax_ccfuser: process {p} has not shared its {key!r} in {timeout_ms} ms: every process "
          f"must trace the same fused_moe calls across processes, the first of them within the "
          f"peer timeout of each other (raise it with jax_ccfuser.peer_timeout(seconds) if a "
          f"process is merely slow)") from error
  return values


@functools.cache
def host_names() -> tuple:
  """Each process's host, by process index: processes naming the same one share memory."""
  mine = os.environ.get("JAX_CCFUSER_HOST") or socket.gethostname()
  return tuple(exchange("host", mine, peer_timeout_ms()))


def _process_hosts(kind: str) -> np.ndarray:
  """Host index of each process under transport `kind`."""
  if kind == "collectives":
    return np.arange(jax.process_count())
  names = host_names()
  if kind == "shared_memory" and len(set(names)) > 1:
    raise ValueError(f"transport('shared_memory') needs every process on one host; processes "
                     f"report hosts {list(names)}")
  return np.unique(np.asarray(names), return_inverse=True)[1]


def axis_names(axis_name) -> tuple:
  """`axis_name` as a tuple of mesh axis names (one name or several, as `jax.lax` takes it)."""
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def check_every_axis_manual(axis_name) -> None:
  """Refuses an `axis_name` that is no mesh axis (a `jax.vmap` axis), and a `shard_map` that
  leaves a mesh axis of size > 1 to XLA (`axis_names` short of the mesh's): a device's place in a
  `fused_moe` call is its rank on `axis_name` and its group over the other manual axes, so the
  devices along an axis left to XLA would each run the same group and meet as one, in the same
  memory."""
  if axis_name is None:
    return
  abstract = jax.sharding.get_abstract_mesh()
  unmeshed = [n for n in axis_names(axis_name) if n not in abstract.axis_names]
  if unmeshed:
    # A jax.vmap axis: its members are one device's batch, and each would wait for the others.
    raise ValueError(f"fused_moe's axis_name {unmeshed} is not a mesh axis here (bound by "
                     f"jax.vmap?): its devices meet across a jax.shard_map (or jax.pmap) axis; "
                     f"reference_moe and all_to_all_moe also run over a vmap axis")
  left = [n for n, t in zip(abstract.axis_names, abstract.axis_types)
          if t != AxisType.Manual and abstract.shape[n] > 1]
  if left:
    raise ValueError(f"fused_moe needs a shard_map that is manual over every mesh axis of size "
                     f"> 1; {left} are not (leave shard_map's axis_names unset, or name them "
                     f"too)")


def _group_devices(axis_name) -> np.ndarray:
  """The concrete devices of every expert-parallel group, `[G, D]`, as `fused_moe` ranks them."""
  abstract = jax.sharding.get_abstract_mesh()
  mesh = _jax_internals.concrete_mesh()
  if mesh is None or mesh.axis_names != abstract.axis_names or \
      tuple(mesh.axis_sizes) != tuple(abstract.axis_sizes):
    raise ValueError(
        "fused_moe across processes must know where each device of the mesh lives: trace it "
        "under `jax.set_mesh(mesh)` with the mesh of the enclosing shard_map")
  check_every_axis_manual(axis_name)
  ep_axes = axis_names(axis_name)
  manual = [n for n, t in zip(abstract.axis_names, abstract.axis_types) if t == AxisType.Manual]
  # Groups are numbered over the other manual axes in mesh order, ranks over `axis_name`.
  others = [n for n in manual if n not in ep_axes]
  order = [abstract.axis_names.index(n) for n in others + list(ep_axes)]
  rest = [i for i in range(len(abstract.axis_names)) if i not in order]
  devices = np.transpose(mesh.devices, order + rest)
  d = int(np.prod([abstract.shape[n] for n in ep_axes]))
  return devices.reshape(-1, d)


def _uniform_blocks(table: np.ndarray, size: int) -> bool:
  """Whether each block of `size` consecutive ranks of every group (row) holds one value."""
  blocks = table.reshape(table.shape[0], -1, size)
  return bool((blocks == blocks[..., :1]).all())


def split(axis_name, num_devices: int) -> Split:
  """How a call over `axis_name` (D = `num_devices`) spans hosts and processes."""
  if axis_name is None or jax.process_count() == 1:
    return Split(1, num_devices, False, ())
  devices = _group_devices(axis_name)
  processes = np.vectorize(lambda dev: dev.process_index)(devices)
  hosts = _process_hosts(transport_in_force())[processes]
  # The largest block of consecutive ranks on one host, alike in every group.
  per_host = max(size for size in range(1, num_devices + 1)
                 if num_devices % size == 0 and _uniform_blocks(hosts, size))
  shared = not _uniform_blocks(processes, per_host)
  ids = tuple(int(dev.id) for dev in devices.flat) if shared else ()
  return Split(num_devices // per_host, per_host, shared, ids, devices.flat[0].platform)


def platform(split: Split | None = None) -> str:
  """The platform a call is traced for: its devices' across processes, else the mesh's, else
  the default backend's."""
  if split is not None and split.platform:
    return split.platform
  mesh = _jax_internals.concrete_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
