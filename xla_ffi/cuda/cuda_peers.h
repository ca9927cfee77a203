// Connecting one CUDA call to its peers: the peer table every kernel reads through (device
// pointers of every, possibly emulated, device's buffers) and the device barrier's members.
//
// Three ways to fill it, as on CPU (moe_cpu.cc's ConnectPeers):
//   emulated   D devices stacked in this call's own buffers on one GPU; stream order replaces
//              the barriers;
//   in process the GPUs of one process publish their buffers in the (site, group) PeerGroup and
//              meet twice on the host; whatever can still fail once they know each other (shapes
//              that differ, no path to a peer GPU, memory peers cannot read) is reported to the
//              group before the second meeting, so either every member enqueues its barriers
//              or none does, and the members' barrier counts stay equal;
//   IPC        peers in other processes of the host meet in the call site's regions in the CUDA
//              IPC workspaces (ipc_memory.h); there is no host meeting, so a device that fails
//              after taking its place stops for good (MarkBroken) and its peers' barriers time
//              out rather than pair with the wrong call.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/api.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/cuda/cuda_device.h"
#include "xla_ffi/moe_call.h"
#include "xla_ffi/moe_dims.h"
#include "xla_ffi/peer_group.h"

namespace ccf {

struct Call {
  MoeDims d;
  std::vector<PeerBuffers> peers;  // one per device of the group
  // The reassignment plan on the device (workers null: none).
  cuda::PlanView plan{};
  // This device's rank in its group; -1 when emulating, where the call is every device's.
  int32_t me = -1;
  // The source whose bad expert ids this device records (cuda::Routing::recorded_source): its
  // own rank in a group of this process, whose members share an earlier call's fault at their
  // host meeting; -1, every source's, where a device reports on its own (emulated, or peers in
  // other processes, each of which must stop its own program).
  int32_t recorded_source = -1;
  // The experts the work list covers, [first_expert, first_expert + experts_here): this
  // device's (every emulated device's), or with a plan the whole group's; the experts whose
  // weights and gradients are this call's (own_experts: E_local, or D * E_local emulated);
  // their weights (stacked like the operands); and the tokens whose slots it sums.
  int32_t first_expert = 0, experts_here = 0, own_experts = 0;
  const void* w_in = nullptr;
  const void* w_out = nullptr;
  const int32_t* own_ids = nullptr;
  float* own_staging = nullptr;
  // Backward: where peers write this device's d expert_weights (the output, or its region).
  void* own_d_weights = nullptr;
  int64_t own_tokens = 0;
  // The h rows this device keeps (forward) or kept (backward) for its first `kept_rows` pairs,
  // in its own buffer (residuals="hidden"; cuda::GemmParams::kept); null: none.
  float* kept = nullptr;
  int64_t kept_rows = 0;
  // The M-tiles of the work list whose rows the scratch holds at a time (SizeChunks).
  int32_t chunk_tiles = 0;
  // The GPU runs the pair-row GEMMs as grouped GEMMs (DeviceState::grouped_gemms, 16-bit
  // dtypes), on this many SMs; on `fetching_sms` of them while rows are being fetched beside
  // them (num_sms less the call's fetch_sms attribute).
  bool grouped_gemms = false;
  int num_sms = 0;
  int fetching_sms = 0;
  // float32 GEMMs as TF32 (cuda::GemmParams::tf32; the handler's Tf32).
  bool tf32 = false;
  // Backward: dw_in and dw_out are wanted (the weight_grads attribute); else they are zeroed and
  // their GEMMs skipped (frozen experts).
  bool weight_grads = true;
  // Peers in other processes: this device's operands, copied into its region (where they read
  // them) ahead of the start barrier.
  struct Staged {
    void* to;
    const void* from;
    size_t bytes;
  };
  std::vector<Staged> staged;
  // Real peers only: the device barriers' members and this device's place at the site;
  // `place` null when emulating.
  SitePlace* place = nullptr;
  cuda::BarrierParams barrier{};
};

// The experts whose weights one call owns: the group's when emulating, else this device's.
int32_t OwnExperts(const CallAttrs& attrs, const MoeDims& d);
// The experts one call's work list covers: its own, or the group's with a reassignment plan.
int32_t ExpertsHere(const CallAttrs& attrs, const MoeDims& d, bool planned);

// Fills `call` (whose dims are decoded) for this device, whose own buffers are `own`.
// `earlier`: a fault an earlier call of this GPU recorded, or success. The members of a group in
// this process share it at their host meeting and all return it (the GPU that found it returns
// `earlier` itself); elsewhere it is left to be reported once the launches are enqueued.
xla::ffi::Error ConnectPeers(const CallAttrs& attrs, DeviceState& me, const ScalarS32& rank,
                             const ScalarS32& group, const PeerBuffers& own, cudaStream_t stream,
                             xla::ffi::Error* earlier, Call* call);

}  // namespace ccf
