"""Shared-memory workspaces: one per device, mapped by every process of its host.

A call site whose peers live in other processes of the host gets a region at the same offset of
every device's workspace when it is traced (every process traces the same program in the same
order, so they agree on it without talking). A workspace grows in chunks: each new chunk is
created by the processes that run the devices, mapped by the other processes of the host once
`jax.distributed`'s key-value store says it exists, and unlinked as soon as every process has
mapped it, so the kernel frees it when the last process exits, however it exits. Names carry the
creating process id: one left behind by a process that died while a chunk was being set up is
removed by the next process that starts one, or exits.
"""

import atexit
import os
import secrets
import threading
import time

import jax

from jax_ccfuser import _extension
from jax_ccfuser._topology import exchange, host_names, key_value_client

_PREFIX = "jax_ccfuser."
_SHM = "/dev/shm"
_ALIGN = 4096
_MIN_CHUNK = 1 << 22
_STALE_S = 60


def _name(pid: int, job: str, device: int, chunk: int) -> str:
  return f"{_PREFIX}{pid}.{job}.{device}.{chunk}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def sweep(own: bool = False) -> None:
  """Removes segment names whose creating process is gone (and this process's, with `own`).

  Only names older than a minute: a process in another PID namespace sharing /dev/shm looks
  dead from here, and its names live only for the seconds its chunk takes to set up.
  """
  if not os.path.isdir(_SHM):
    return
  for entry in os.scandir(_SHM):
    if not entry.name.startswith(_PREFIX):
      continue
    try:
      pid = int(entry.name[len(_PREFIX):].split(".")[0])
      age = time.time() - entry.stat().st_mtime
    except (ValueError, OSError):
      continue
    if (own and pid == os.getpid()) or (age > _STALE_S and not _alive(pid)):
      _extension.cpu.unlink_segment("/" + entry.name)


class _Workspaces:
  """This process's view of the job's workspaces: chunks and the regions handed out in them."""

  def __init__(self, timeout_ms: int):
    sweep()
    atexit.register(sweep, own=True)
    client = key_value_client()
    if jax.process_index() == 0:
      client.key_value_set("jax_ccfuser/job", secrets.token_hex(4))
    self.job = client.blocking_key_value_get("jax_ccfuser/job", timeout_ms)
    self.pids = [int(p) for p in exchange(f"{self.job}/pid", str(os.getpid()), timeout_ms)]
    hosts = host_names()
    mine = hosts[jax.process_index()]
    self.neighbours = [p for p, h in enumerate(hosts) if h == mine and p != jax.process_index()]
    self.chunks = []  # bytes of each
    self.used = 0     # of the last chunk
    self.regions = {}

  def region(self, key, nbytes: int, timeout_ms: int):
    """The `(chunk, offset)` of call site `key`'s `nbytes` region, allocated on first use."""
    if key not in self.regions:
      nbytes = -(-nbytes // _ALIGN) * _ALIGN
      if not self.chunks or self.used + nbytes > self.chunks[-1]:
        self._grow(max(nbytes, 2 * (self.chunks[-1] if self.chunks else 0), _MIN_CHUNK),
                   timeout_ms)
      self.regions[key] = (len(self.chunks) - 1, self.used)
      self.used += nbytes
    return self.regions[key]

  def _grow(self, nbytes: int, timeout_ms: int) -> None:
    chunk = len(self.chunks)
    local = [d.id for d in jax.local_devices()]
    free = os.statvfs(_SHM).f_bavail * os.statvfs(_SHM).f_frsize if os.path.isdir(_SHM) else 0
    if free < nbytes * len(local):
      raise RuntimeError(
          f"jax_ccfuser: {nbytes * len(local) >> 20} MiB of shared memory needed for the "
          f"workspaces of {len(local)} devices, {free >> 20} MiB free in {_SHM} (in a container, "
          f"raise it, e.g. `docker run --shm-size`)")
    created = []
    try:
      for device in local:
        name = "/" + _name(os.getpid(), self.job, device, chunk)
        _check(_extension.cpu.map_segment(name, nbytes, True, device, chunk))
        created.append(name)
      client = key_value_client()
      client.wait_at_barrier(f"jax_ccfuser/{self.job}/{chunk}/created", timeout_ms)
      for p in self.neighbours:
        for device in (d.id for d in jax.devices() if d.process_index == p):
          _check(_extension.cpu.map_segment("/" + _name(self.pids[p], self.job, device, chunk),
                                            nbytes, False, device, chunk))
      client.wait_at_barrier(f"jax_ccfuser/{self.job}/{chunk}/mapped", timeout_ms)
    finally:
      for name in created:
        _extension.cpu.unlink_segment(name)
    self.chunks.append(nbytes)
    self.used = 0


def _check(error: str) -> None:
  if error:
    raise RuntimeError(error)


_workspaces = None
_lock = threading.Lock()  # tracing may run in several threads


def region(key, nbytes: int, timeout_ms: int):
  """The `(chunk, offset)` of call site `key` in every device's workspace (see module doc)."""
  global _workspaces
  with _lock:
    if _workspaces is None:
      _workspaces = _Workspaces(timeout_ms)
    return _workspaces.region(key, nbytes, timeout_ms)
