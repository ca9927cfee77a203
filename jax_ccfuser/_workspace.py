"""Shared workspaces: one per device, mapped by every process of its host.

A call site whose peers live in other processes of the host gets a region at the same offset of
every device's workspace when it is traced (every process traces the same program in the same
order, so they agree on it without talking). A workspace grows in chunks: each new chunk is
created by the process that runs the device and mapped by the other processes of the host once
`jax.distributed`'s key-value store says it exists.

On CPU a chunk is a POSIX shared-memory segment, unlinked as soon as every process has mapped
it, so the kernel frees it when the last process exits, however it exits. Names carry the
creating process id: one left behind by a process that died while a chunk was being set up is
removed by the host's other processes as they find it gone (once its first chunk is mapped,
which tells them), else by the next process that sets one up, or exits. On GPU a chunk is
device memory shared through its CUDA IPC handle, which the key-value store carries.

The same store checks the trace order: the n-th region, and the n-th call across processes (whose
rows meet in shared memory or XLA's collectives), must be the same call, taking the same path,
in every process.
"""

import atexit
import os
import secrets
import sys
import threading
import time

import jax

from jax_ccfuser import _config, _extension
from jax_ccfuser._topology import exchange, host_names, key_value_client

_PREFIX = "jax_ccfuser."
# The job's name if this is process 0: the same however often its set-up is tried.
_JOB_NAME = secrets.token_hex(4)
_SHM = "/dev/shm"
_ALIGN = 4096
_MIN_CHUNK = 1 << 22
_STALE_S = 60
_POLL_MS = 200  # a set-up's wait between looks at whether a neighbour has exited
_SAME_CALLS = ("the processes must trace the same fused_moe calls, within the peer timeout of "
               "each other")


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

  Only names older than a chunk's set-up may take (two waits of the peer timeout, and a minute):
  a process in another PID namespace sharing /dev/shm looks dead from here, and its names live
  while its chunk is set up (a live job's peers may still be tracing a minute later).
  """
  stale_s = _STALE_S + 2 * _config.peer_timeout_ms() / 1000
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
    if (own and pid == os.getpid()) or (age > stale_s and not _alive(pid)):
      _extension.cpu.unlink_segment("/" + entry.name)


_failing = False   # whether the interpreter reported an exception nobody caught
_watching = False  # whether the exit hooks are installed


def _note_uncaught(hook):
  """Wraps `sys.excepthook`, which the interpreter calls only for an exception nobody caught
  (sys.last_value is no sign: pytest and interactive sessions leave it set after a handled one)."""
  def excepthook(*exc_info):
    global _failing
    _failing = True
    hook(*exc_info)
  return excepthook


def _depart_if_failing() -> None:
  """A process leaving on an uncaught exception makes no new calls, but lives on in
  jax.distributed's shutdown, which waits for its peers, who wait for its next call: marked
  departed, it ends their wait at once (an UNAVAILABLE error naming it) rather than after the
  peer timeout. Calls it had queued are abandoned with it (a peer waiting for one fails too). A
  clean exit, and an interactive session (where an error at the prompt is no exit), mark
  nothing: calls it queued may still be on their way."""
  if _failing and not hasattr(sys, "ps1"):
    _extension.cpu.mark_departed()


def _watch_exit() -> None:
  """Installs the exit hooks once, however often a job's set-up is tried (each try would
  otherwise wrap the excepthook again and register its hooks twice). Registered after
  jax.distributed's shutdown hook, so they run before it."""
  global _watching
  if not _watching:
    _watching = True
    atexit.register(sweep, own=True)
    sys.excepthook = _note_uncaught(sys.excepthook)
    atexit.register(_depart_if_failing)


def _build() -> str:
  """This process's jax_ccfuser version and a fingerprint of its shared regions' layouts (one
  region's bytes for fixed sizes, in shared memory and, where built, in CUDA IPC workspaces):
  processes must agree on all of them."""
  import jax_ccfuser  # the package, initialised by the time a job is set up
  layouts = [_extension.cpu.shared_region_bytes(3, 5, 2, 2, 4, 4, 2, 7, 4, 1, True)]
  if _extension.cuda is not None:
    layouts.append(_extension.cuda.shared_region_bytes(3, 5, 2, 2, 4, 4, True))
  return "/".join(map(str, [jax_ccfuser.__version__, *layouts]))


class _Job:
  """What every process of the job agrees on once: a name, process ids, who shares the host."""

  def __init__(self, timeout_ms: int):
    sweep()
    _watch_exit()
    self.name = exchange("job", _JOB_NAME, timeout_ms)[0]  # process 0's
    builds = exchange(f"{self.name}/build", _build(), timeout_ms)
    if len(set(builds)) > 1:
      raise RuntimeError(
          f"jax_ccfuser: the processes run different builds (version and shared-region layout, "
          f"by process: {builds}): their calls would meet in memory laid out differently; "
          f"install one build for every process")
    self.pids = [int(p) for p in exchange(f"{self.name}/pid", str(os.getpid()), timeout_ms)]
    hosts = host_names()
    mine = hosts[jax.process_index()]
    self.neighbours = [p for p, h in enumerate(hosts) if h == mine and p != jax.process_index()]


def _agree(job: _Job, calls: str, index: int, call: str, timeout_ms: int) -> None:
  """Checks that every process traces the same call as its `index`-th of `calls`: regions are
  handed out, and calls across processes meet (in shared memory or XLA's collectives), in trace
  order, so a process that traced another call there would meet its peers at calls other than
  theirs (silently, where the shapes agree). The first process to trace it is not refused: it
  meets no one, and waits out its peer timeout."""
  client = key_value_client()
  key = f"jax_ccfuser/{job.name}/{calls}/{index}"
  try:
    client.key_value_set(key, call)  # the first process to trace it says what it is
    return
  except jax.errors.JaxRuntimeError:  # already said
    theirs = client.blocking_key_value_get(key, timeout_ms)
  if theirs != call:
    raise ValueError(
        f"jax_ccfuser: this process traced its call number {index} of fused_moe across "
        f"processes as the {call}, another process as the {theirs}: every process must trace "
        f"the same fused_moe calls in the same order, along the same path (the same "
        f"jax_ccfuser.transport; the first trace of each jitted function counts)")


class _Workspaces:
  """This process's view of one platform's workspaces: chunks and the regions handed out."""

  def __init__(self, job: _Job, platform: str):
    self.job, self.platform = job, platform
    self.chunks = []   # bytes of each
    self.shared = None  # the chunk small regions fill, and its bytes used
    self.regions = {}
    self.failed = None  # why a chunk could not be set up, if one could not

  def region(self, key, nbytes: int, timeout_ms: int, call: str):
    """The `(chunk, offset)` of call site `key`'s `nbytes` region, allocated on first use; `call`
    says what the call is, for `_agree`."""
    if key not in self.regions:
      _agree(self.job, f"{self.platform}/region", len(self.regions), call, timeout_ms)
      nbytes = -(-nbytes // _ALIGN) * _ALIGN
      # A chunk's memory is taken whole when it is made (device memory on GPU, reserved shared
      # memory on CPU): a region of 4 MiB or more gets a chunk of its size, smaller ones fill
      # 4 MiB chunks in turn, and no chunk is made larger than what it holds.
      if nbytes >= _MIN_CHUNK:
        self.regions[key] = (self._grow(nbytes, timeout_ms), 0)
      else:
        if self.shared is None or self.shared[1] + nbytes > _MIN_CHUNK:
          self.shared = [self._grow(_MIN_CHUNK, timeout_ms), 0]
        self.regions[key] = tuple(self.shared)
        self.shared[1] += nbytes
    return self.regions[key]

  def _grow(self, nbytes: int, timeout_ms: int) -> int:
    """Sets up a new chunk of `nbytes` with the host's other processes; returns its index."""
    # A chunk that failed half set up (this process's part made and registered, the other
    # processes' not, or the other way round) cannot be tried again in step with them.
    if self.failed is not None:
      raise RuntimeError(f"jax_ccfuser: the {self.platform} workspaces shared with this "
                         f"host's other processes could not grow earlier ({self.failed}); "
                         f"restart the processes")
    grow = self._grow_shared_memory if self.platform == "cpu" else self._grow_ipc
    try:
      grow(len(self.chunks), nbytes, timeout_ms)
    except Exception as error:
      self.failed = f"{type(error).__name__}: {error}"
      raise
    self.chunks.append(nbytes)
    return len(self.chunks) - 1

  def _key(self, chunk: int, step: str, process: int) -> str:
    return f"jax_ccfuser/{self.job.name}/{self.platform}/{chunk}/{step}/{process}"

  def _barrier(self, chunk: int, step: str, timeout_ms: int) -> None:
    """Waits until every process of the host (they alone share the chunk) has done `step`,
    in short waits between which it asks whether one has exited: a process that died while
    the chunk was set up was otherwise waited for the whole timeout and blamed on the trace
    order, and its names of the chunk, which no one else removes for minutes, go with it. A
    process that gave up says so in its key (`_give_up`)."""
    client = key_value_client()
    client.key_value_set(self._key(chunk, step, jax.process_index()), "done")
    deadline = time.monotonic() + timeout_ms / 1000
    waiting = list(self.job.neighbours)
    while waiting:
      try:
        said = client.blocking_key_value_get(self._key(chunk, step, waiting[0]), _POLL_MS)
      except jax.errors.JaxRuntimeError as error:
        if "DEADLINE_EXCEEDED" not in str(error):
          raise  # the key-value store itself failed: waiting on cannot help
        for p in waiting:
          if pid := self._exited(p):
            for d in self._neighbour_devices():
              if d.process_index == p:
                _extension.cpu.unlink_segment("/" + _name(pid, self.job.name, d.id, chunk))
            raise RuntimeError(
                f"jax_ccfuser: process {p} (pid {pid}) exited while shared workspace chunk "
                f"{chunk} was set up (before it had {step} its part)") from error
        if time.monotonic() > deadline:
          raise TimeoutError(
              f"jax_ccfuser: process {waiting[0]} had not {step} its part of shared workspace "
              f"chunk {chunk} after {timeout_ms} ms: {_SAME_CALLS}") from error
        continue
      self._check_not_given_up(waiting[0], chunk, said)
      waiting.pop(0)

  def _check_not_given_up(self, process: int, chunk: int, said: str) -> None:
    if said != "done":
      raise TimeoutError(f"jax_ccfuser: process {process} gave up on shared workspace chunk "
                         f"{chunk} ({said}): {_SAME_CALLS}")

  def _give_up(self, chunk: int, error: Exception) -> None:
    """Tells the host's other processes that this one will not finish setting up `chunk`: one
    that came late would otherwise find its "done" from a step before and map names it
    has removed."""
    try:
      client = key_value_client()
      for step in ("created", "mapped", "opened"):
        client.key_value_set(self._key(chunk, step, jax.process_index()),
                             f"failed: {type(error).__name__}: {error}", allow_overwrite=True)
    except RuntimeError:  # no store, or it is gone: so are the processes that would read it
      pass

  def _exited(self, process: int) -> int:
    """The pid of `process` if it has exited, else 0; known once its first chunk is mapped here
    (across PID namespaces only where it marked itself departed)."""
    if self.platform != "cpu":
      return 0
    devices = [d for d in self._neighbour_devices() if d.process_index == process]
    return next((pid for d in devices if (pid := _extension.cpu.exited_process(d.id))), 0)

  def _neighbour_devices(self):
    return [d for d in jax.devices(self.platform) if d.process_index in self.job.neighbours]

  def _grow_shared_memory(self, chunk: int, nbytes: int, timeout_ms: int) -> None:
    local = [d.id for d in jax.local_devices(backend=self.platform)]
    free = 0
    if os.path.isdir(_SHM):
      fs = os.statvfs(_SHM)
      free = fs.f_bavail * fs.f_frsize
    if free < nbytes * len(local):
      raise RuntimeError(
          f"jax_ccfuser: {nbytes * len(local) >> 20} MiB of shared memory needed for the "
          f"workspaces of {len(local)} devices, {free >> 20} MiB free in {_SHM} (in a container, "
          f"raise it, e.g. `docker run --shm-size`)")
    created = []
    try:
      for device in local:
        name = "/" + _name(os.getpid(), self.job.name, device, chunk)
        _check(_extension.cpu.map_segment(name, nbytes, True, device, chunk))
        created.append(name)
      self._barrier(chunk, "created", timeout_ms)
      for d in self._neighbour_devices():
        name = "/" + _name(self.job.pids[d.process_index], self.job.name, d.id, chunk)
        error = _extension.cpu.map_segment(name, nbytes, False, d.id, chunk)
        if error:
          # Its maker may have given up (and removed it) after saying it was made.
          self._check_not_given_up(d.process_index, chunk, key_value_client().key_value_try_get(
              self._key(chunk, "created", d.process_index)))
          raise RuntimeError(
              f"{error}: made by process {d.process_index}, which names its host as this one's "
              f"({host_names()[d.process_index]!r}) but whose shared memory this process cannot "
              f"see; set JAX_CCFUSER_HOST to tell the hosts apart, or use "
              f"jax_ccfuser.transport('collectives')")
      self._barrier(chunk, "mapped", timeout_ms)
    except Exception as error:
      self._give_up(chunk, error)  # before its names go, so no one maps them in between
      raise
    finally:
      for name in created:
        _extension.cpu.unlink_segment(name)

  def _grow_ipc(self, chunk: int, nbytes: int, timeout_ms: int) -> None:
    """CUDA IPC: the owner's allocation, its handle through the key-value store (compiled, not
    yet run on a GPU: see cuda/api.cuh)."""
    try:
      local = jax.local_devices(backend=self.platform)
      if len(local) != 1:
        raise NotImplementedError(
            "fused_moe across processes of a host on GPU needs one GPU per process (CUDA IPC "
            f"workspaces); this process drives {len(local)}: use "
            "jax_ccfuser.transport('collectives')")
      cuda, client, mine = _extension.cuda, key_value_client(), local[0]
      key = lambda device: f"jax_ccfuser/{self.job.name}/ipc/{chunk}/{device}"
      handle, error = cuda.ipc_allocate(mine.local_hardware_id, nbytes, mine.id, chunk)
      _check(error)
      client.key_value_set_bytes(key(mine.id), handle)
      for d in self._neighbour_devices():
        _check(cuda.ipc_open(mine.local_hardware_id,
                             client.blocking_key_value_get_bytes(key(d.id), timeout_ms), nbytes,
                             d.id, chunk))
      self._barrier(chunk, "opened", timeout_ms)
    except Exception as error:
      self._give_up(chunk, error)
      raise


def _check(error: str) -> None:
  if error:
    raise RuntimeError(error)


_job = None
_workspaces = {}
_across_processes = {}  # platform: calls across processes traced so far
_lock = threading.Lock()  # tracing may run in several threads


def _the_job(timeout_ms: int) -> _Job:
  global _job
  if _job is None:
    _job = _Job(timeout_ms)
  return _job


def region(key, nbytes: int, timeout_ms: int, platform: str, call: str):
  """The `(chunk, offset)` of call site `key` in every `platform` device's workspace; `call` says
  what the call is (the processes must reserve regions for the same calls in the same order)."""
  with _lock:
    if platform not in _workspaces:
      _workspaces[platform] = _Workspaces(_the_job(timeout_ms), platform)
    return _workspaces[platform].region(key, nbytes, timeout_ms, call)


def agree_across_processes(platform: str, call: str, timeout_ms: int) -> None:
  """Checks, while `call` (what it is and the path its rows take) is traced, that every process
  traces the same calls across processes in the same order, along the same path: they meet in
  XLA's collectives in that order, and a process that took another path than its peers (another
  `jax_ccfuser.transport`) would wait for them where they never come."""
  with _lock:
    job = _the_job(timeout_ms)  # first: a set-up that timed out takes no call number
    index = _across_processes.get(platform, 0)
    _across_processes[platform] = index + 1
    _agree(job, f"{platform}/across_processes", index, call, timeout_ms)
