// One GPU's state in this process, from its first fused call to the end of the process: its
// fault record, its place at every call site (rank, group, barrier flags), the peers it may read,
// and the sticky "broken" state a barrier fault leaves behind.
//
// Faults the kernels find (an expert id out of range, a device barrier that timed out, met a
// group out of step or peers with other shapes) are recorded in device memory and copied back
// asynchronously; the first call on that GPU that finds the copy complete reports them. A bad
// id is reported once. A barrier fault breaks the group for good: the kernel has stored
// kAbortFlag at every member (cuda/signal.cu), so each member's next barrier fails too, and this
// GPU fails every later call with the same error before it meets anyone.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <cuda_runtime.h>

#include "cuda/api.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/moe_call.h"

namespace ccf {

xla::ffi::Error Unimplemented(const std::string& msg);
xla::ffi::Error CudaFailure(const std::string& what, cudaError_t status);

// This GPU's place at one call site, read from the rank and group operands on the site's first
// call (the one host-device synchronisation of the path) and cached: the start barrier checks
// the operands against it on the device at every call.
struct SitePlace {
  int32_t rank = 0;
  int32_t group = 0;
  // Peers in this process: the site's flags on this GPU, [kMaxPeers] written by each rank
  // (device memory, zeroed before any peer can see them), and the barriers passed at the site.
  // Peers in other processes keep both in their regions instead.
  uint64_t* signals = nullptr;
  uint64_t barriers = 0;
};

struct DeviceState {
  int ordinal = 0;
  int num_sms = 0;
  // The pair-row GEMMs run as CUTLASS's grouped GEMMs (a Hopper GPU with the build's sm_90a
  // code), unless JAX_CCFUSER_GROUPED_GEMMS=0 asks for the SM80 kernels (to compare them).
  bool grouped_gemms = false;
  cuda::DeviceError* error = nullptr;  // the fault record (device memory)

  std::mutex mu;  // guards what follows: the handler threads of one GPU may differ call to call
  cuda::DeviceError* error_host = nullptr;  // pinned copy of `error`
  cudaEvent_t error_copied = nullptr;       // recorded after the copy
  bool error_copy_pending = false;
  std::string broken;  // set for good by a barrier fault or a call abandoned midway
  std::array<bool, cuda::kMaxDevices> peer_access{};
  std::map<uint64_t, SitePlace> sites;  // nodes stay put: callers keep pointers

  // The stream that fetches the peers' rows while the GEMMs run on XLA's, and an event after
  // each peer's (cuda_launch.cc's source phases). One call at a time enqueues on them: the
  // handler holds `pipeline_mu` while it enqueues its launches.
  std::mutex pipeline_mu;
  cudaStream_t side = nullptr;
  std::array<cudaEvent_t, cuda::kMaxPeers + 1> fetched{};
};

// Whether the current GPU's calls run the pair-row GEMMs as CUTLASS's grouped GEMMs
// (DeviceState::grouped_gemms).
bool GroupedGemms();

// The state of GPU `ordinal`, made on its first call. Where making it fails, the next call
// tries again, unless `broken_if_failed`: then the state stays, broken with the cause, for calls
// whose peers (in other processes) count this GPU's barriers whether it comes or not.
xla::ffi::Error GetDeviceState(int ordinal, cudaStream_t stream, bool broken_if_failed,
                               DeviceState** out);

// The error every call of a broken GPU returns, or success.
xla::ffi::Error Broken(DeviceState& s);

// Marks the GPU broken: a call gave up after taking its place in a group whose peers go on
// counting barriers, so this GPU can never meet them in step again.
void MarkBroken(DeviceState& s, const std::string& why);

// A fault an earlier call recorded, if its copy has landed (never waits). A bad expert id is
// returned once and cleared ahead of this call's kernels; a barrier fault marks the GPU broken.
xla::ffi::Error TakeDeviceError(DeviceState& s, cudaStream_t stream);

// Enqueues the copy of the fault record that a later call reads (one copy in flight at a time;
// the record is sticky until reported, so a skipped copy loses nothing).
xla::ffi::Error ScheduleErrorCopy(DeviceState& s, cudaStream_t stream);

// This GPU's place at `site`, made on the site's first call (with the site's zeroed flags when
// `own_signals`, for peers in this process).
xla::ffi::Error Place(DeviceState& s, uint64_t site, const ScalarS32& rank,
                      const ScalarS32& group, int num_devices, bool own_signals,
                      cudaStream_t stream, SitePlace** out);

// The epoch of this GPU's next barrier at a site whose peers are in this process.
uint64_t NextBarrier(DeviceState& s, SitePlace& place);

// Lets this GPU's kernels reach GPU `peer`'s memory (XLA has usually done so already).
xla::ffi::Error EnablePeerAccess(DeviceState& me, int peer);

// Whether this GPU's kernels can read and write `ptr`, device `dev`'s buffer `what` on another
// GPU: peer access covers memory from cuMemAlloc (XLA's default allocator) only; memory from a
// stream-ordered pool (XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async) or the virtual memory API needs
// access granted per allocation, and a load from it would fault and kill the process.
xla::ffi::Error CheckPeerMemory(const void* ptr, int dev, const char* what);

}  // namespace ccf
