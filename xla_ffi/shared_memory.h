// Workspaces shared between the processes of one host: one POSIX shared-memory segment per
// (device, chunk), created by the process that runs the device and mapped by every process of
// its host. Python names the segments and sequences their exchange through jax.distributed's
// key-value store (jax_ccfuser/_workspace.py); each is unlinked as soon as every process has
// mapped it, so the kernel frees it when the last process exits, however it exits.
#pragma once

#include <cstdint>
#include <string>

namespace ccf {

struct Segment {
  char* base = nullptr;
  int64_t bytes = 0;
  bool owned = false;  // created by this process: its device runs here
};

// Maps segment `name` of `bytes` as (device, chunk); `create` makes it (it must not exist yet,
// and starts zeroed), otherwise it opens the owner's. Returns "" or why not. Mappings last as
// long as the process: compiled programs keep referring to them.
std::string MapSegment(const std::string& name, int64_t bytes, bool create, int32_t device,
                       int32_t chunk);

// Removes the name; the memory stays mapped wherever it is. Returns "" or why not.
std::string UnlinkSegment(const std::string& name);

// Registers a mapping made elsewhere as (device, chunk), in the registry MapSegment fills: the
// CUDA IPC workspaces (ipc_memory.h), whose `base` is GPU memory. Returns "" or why not.
std::string RegisterSegment(int32_t device, int32_t chunk, const Segment& segment);

// The mapping of (device, chunk), or nullptr.
const Segment* FindSegment(int32_t device, int32_t chunk);

}  // namespace ccf
