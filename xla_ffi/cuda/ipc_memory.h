// Workspaces shared between the processes of one host on GPU: the CUDA counterpart of
// shared_memory.h. The process that runs a device allocates each of its chunks in that GPU's
// memory and hands out a CUDA IPC handle; Python passes the handles through jax.distributed's
// key-value store, and every other process of the host opens them. Both end up in the registry
// of shared_memory.h as (device, chunk), so the handler finds a peer's region as the CPU one does.
// Mappings last as long as the process: compiled programs keep referring to them.
//
// An opened mapping is read by the GPU it was opened on, and the registry holds one mapping per
// (device, chunk): a process that runs a device of a group spanning processes runs that group's
// rank alone (one process per GPU), and opens its peers' chunks on that GPU.
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace ccf {

// Allocates a zeroed `bytes` buffer on local GPU `ordinal` as (device, chunk)'s workspace and
// stores its IPC handle in `handle`. Returns "" or why not.
std::string IpcAllocate(int ordinal, int64_t bytes, int32_t device, int32_t chunk,
                        cudaIpcMemHandle_t* handle);

// Opens another process's `bytes` workspace chunk (device, chunk) from its `handle`, on local GPU
// `ordinal`. Returns "" or why not.
std::string IpcOpen(int ordinal, const cudaIpcMemHandle_t& handle, int64_t bytes, int32_t device,
                    int32_t chunk);

}  // namespace ccf
