// Workspaces shared between the processes of one host: one POSIX shared-memory segment per
// (device, chunk), created by the process that runs the device and mapped by every process of
// its host. Python names the segments and sequences their exchange through jax.distributed's
// key-value store (jax_ccfuser/_workspace.py); each is unlinked as soon as every process has
// mapped it, so the kernel frees it when the last process exits, however it exits.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace ccf {

// A device's signs of life, which its peers in other processes read to tell a peer that is gone
// from one that is merely late (SharedGroup). Per device, not per call site: a device waiting at
// a barrier of any site is alive. It sits in a page before the workspace of the device's first
// chunk, so call sites' regions (whose offsets Python hands out) never overlap it.
struct DeviceLiveness {
  // Clock::time_since_epoch() in ns (peer_group.h, CLOCK_MONOTONIC) when the device last came to,
  // waited at or left a barrier; written by the device only.
  std::atomic<int64_t> heard_ns;
  // The process that runs the device, written once before any other process maps the page: its
  // id; the PID and time namespaces that give the id and the start their meaning (inodes; 0
  // where unknown); its start in clock ticks since boot, by which a reused id is not taken for
  // it.
  int64_t pid;
  uint64_t pid_namespace;
  uint64_t time_namespace;
  uint64_t started;
  // Set by the device's process as it leaves on an uncaught exception (MarkDeparted): from then
  // on it makes no new call (those it queued are abandoned with it), though its id may live on a
  // while (jax.distributed's shutdown waits for the peers that wait for it).
  std::atomic<int32_t> departed;
};
static_assert(std::atomic<int64_t>::is_always_lock_free &&
                  std::atomic<int32_t>::is_always_lock_free,
              "liveness in shared memory needs lock-free atomics");

struct Segment {
  char* base = nullptr;
  int64_t bytes = 0;
  bool owned = false;  // created by this process: its device runs here
  DeviceLiveness* liveness = nullptr;  // the device's, for shared-memory segments
};

// Maps segment `name` of `bytes` as (device, chunk); `create` makes it (it must not exist yet,
// and starts zeroed), otherwise it opens the owner's. Chunk 0 (mapped first) holds the device's
// liveness before its `bytes`. Returns "" or why not. Mappings last as long as the process:
// compiled programs keep referring to them.
std::string MapSegment(const std::string& name, int64_t bytes, bool create, int32_t device,
                       int32_t chunk);

// Removes the name; the memory stays mapped wherever it is. Returns "" or why not.
std::string UnlinkSegment(const std::string& name);

// Registers a mapping made elsewhere as (device, chunk), in the registry MapSegment fills: the
// CUDA IPC workspaces (ipc_memory.h), whose `base` is GPU memory. Returns "" or why not.
std::string RegisterSegment(int32_t device, int32_t chunk, const Segment& segment);

// The mapping of (device, chunk), or nullptr.
const Segment* FindSegment(int32_t device, int32_t chunk);

// The liveness of the device whose shared-memory workspace holds `address`, or nullptr.
DeviceLiveness* LivenessAt(const void* address);

// The id of the process that ran the device if that process has exited or departed, else 0,
// also wherever this process cannot tell (another PID or time namespace, a /proc that hides the
// process).
int64_t ExitedProcess(const DeviceLiveness& liveness);

// Marks every device this process runs as departed, for its peers in other processes.
void MarkDeparted();

}  // namespace ccf
