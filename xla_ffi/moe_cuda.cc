// The fused MoE on NVIDIA GPUs: XLA FFI handlers "ccf_moe_fwd" / "ccf_moe_bwd" for platform
// CUDA, with the same operands and attributes as the CPU handlers (moe_cpu.cc).
//
// Per call, on each GPU of the expert-parallel group (DESIGN.md section 4; the kernels are
// described in cuda/api.cuh):
//   publish  its buffer addresses in the (call site, group) PeerGroup and meet the peers on the
//            host (peer_group.h: a timeout gives an error, never a hang);
//   enqueue  on XLA's stream: zero its staging, a device-side barrier (the peers' inputs are
//            ready), the work list built on the device from every peer's expert_ids, the
//            gather-GEMMs that read rows straight out of peer memory, the scatter of partial
//            sums into the sources' staging, a second device barrier, the sum of its own slots.
// The host never waits for the device on this path. Peers in other processes of the host
// (`workspace` >= 0) meet in their regions of the call site in the CUDA IPC workspaces
// (ipc_memory.h) instead: no host meeting, the region addresses come from the registry; this GPU
// copies its operands into its region on the stream and the device barriers' flags live in the
// regions. Single-GPU emulation of D devices (`emulated`, or D == 1) fills the same peer table
// with D blocks of the stacked operands and runs the same kernels; stream order replaces the
// barriers.
//
// Faults the device finds (an expert id out of range, a device barrier timeout, a changed rank)
// are recorded in device memory and copied back asynchronously; the first handler call on that
// GPU that finds the copy complete returns them as an error. The faulty call itself still
// finishes without touching memory out of bounds, and the tokens with a bad id get NaN.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/api.cuh"
#include "xla/ffi/api/ffi.h"
#include "common/activation.h"
#include "xla_ffi/moe_call.h"
#include "xla_ffi/host_dtype.h"
#include "xla_ffi/ipc_memory.h"
#include "xla_ffi/moe_dims.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/region_layout.h"
#include "xla_ffi/shared_memory.h"

namespace ffi = xla::ffi;

namespace ccf {
namespace {

ffi::Error Unimplemented(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "jax_ccfuser (CUDA): " + msg);
}

ffi::Error CudaFailure(const std::string& what, cudaError_t status) {
  return ffi::Error::Internal("jax_ccfuser: " + what + " failed: " + cudaGetErrorName(status) +
                              " (" + cudaGetErrorString(status) + ")");
}

// ---------------------------------------------------------------------------------------------
// Per-GPU state, created on a GPU's first call and kept for the process: peers hold the address
// of its signal buffer.

struct DeviceState {
  int ordinal = 0;
  int num_sms = 0;
  uint64_t* signal = nullptr;            // [kMaxDevices] flags the peers write (device memory)
  cuda::DeviceError* error = nullptr;    // the device's fault record (device memory)

  std::mutex mu;  // guards what follows: the handler threads of one GPU may differ call to call
  cuda::DeviceError* error_host = nullptr;  // pinned copy of `error`
  cudaEvent_t error_copied = nullptr;       // recorded after the copy
  bool error_copy_pending = false;
  void* workspace = nullptr;                // grow-only, stream-ordered (cudaMallocAsync)
  size_t workspace_bytes = 0;
  std::array<uint64_t, cuda::kMaxDevices> barriers_with{};  // barriers passed with each GPU
  std::array<bool, cuda::kMaxDevices> peer_access{};
  std::map<uint64_t, std::pair<int32_t, int32_t>> positions;  // call site -> (rank, group)
};

std::mutex states_mu;
std::map<int, std::unique_ptr<DeviceState>>& States() {
  static auto* states = new std::map<int, std::unique_ptr<DeviceState>>;
  return *states;
}

// Makes the state of GPU `ordinal`: zeroes the signal buffer and waits for that (once per process
// and GPU), since a peer may signal as soon as this GPU has published.
ffi::Error CreateDeviceState(int ordinal, cudaStream_t stream, std::unique_ptr<DeviceState>* out) {
  if (ordinal < 0 || ordinal >= cuda::kMaxDevices)
    return Unimplemented("device ordinal " + std::to_string(ordinal) + " is beyond the " +
                         std::to_string(cuda::kMaxDevices) + " GPUs a signal buffer covers");
  auto s = std::make_unique<DeviceState>();
  s->ordinal = ordinal;
  // XLA runs this handler with `ordinal` current already; the allocations below need it so.
  cudaError_t st = cudaSetDevice(ordinal);
  if (st == cudaSuccess)
    st = cudaDeviceGetAttribute(&s->num_sms, cudaDevAttrMultiProcessorCount, ordinal);
  if (st == cudaSuccess) st = cudaMalloc(&s->signal, sizeof(uint64_t) * cuda::kMaxDevices);
  if (st == cudaSuccess) st = cudaMalloc(&s->error, sizeof(cuda::DeviceError));
  if (st == cudaSuccess)
    st = cudaHostAlloc(&s->error_host, sizeof(cuda::DeviceError), cudaHostAllocDefault);
  if (st == cudaSuccess) st = cudaEventCreateWithFlags(&s->error_copied, cudaEventDisableTiming);
  if (st == cudaSuccess)
    st = cudaMemsetAsync(s->signal, 0, sizeof(uint64_t) * cuda::kMaxDevices, stream);
  if (st == cudaSuccess) st = cudaMemsetAsync(s->error, 0, sizeof(cuda::DeviceError), stream);
  if (st == cudaSuccess) st = cudaStreamSynchronize(stream);
  if (st != cudaSuccess) return CudaFailure("setting up GPU " + std::to_string(ordinal), st);
  *s->error_host = {};
  *out = std::move(s);
  return ffi::Error::Success();
}

// The state of GPU `ordinal`, made on its first call. The registry lock is not held while the
// device is set up (XLA runs one GPU's calls one after another, so only one thread makes it).
ffi::Error GetDeviceState(int ordinal, cudaStream_t stream, DeviceState** out) {
  {
    std::lock_guard<std::mutex> lock(states_mu);
    auto it = States().find(ordinal);
    if (it != States().end()) {
      *out = it->second.get();
      return ffi::Error::Success();
    }
  }
  std::unique_ptr<DeviceState> made;
  if (ffi::Error err = CreateDeviceState(ordinal, stream, &made); err.failure()) return err;
  std::lock_guard<std::mutex> lock(states_mu);
  std::unique_ptr<DeviceState>& slot = States()[ordinal];
  if (!slot) slot = std::move(made);
  *out = slot.get();
  return ffi::Error::Success();
}

// A peer's state; it exists once the peer has published (it is made before publishing).
DeviceState* FindDeviceState(int ordinal) {
  std::lock_guard<std::mutex> lock(states_mu);
  auto it = States().find(ordinal);
  return it == States().end() ? nullptr : it->second.get();
}

std::string DescribeDeviceError(const cuda::DeviceError& e, int ordinal) {
  const std::string where = " (found on GPU " + std::to_string(ordinal) +
                            " by an earlier fused_moe call: the CUDA path reports faults found on "
                            "the device from a later call on that GPU, once the faulty call's "
                            "work has finished)";
  switch (e.code) {
    case cuda::kBadExpertId:
      return "expert_ids[" + std::to_string(e.token) + ", " + std::to_string(e.k) + "] = " +
             std::to_string(e.value) + " on device " + std::to_string(e.source) +
             " is outside [0, " + std::to_string(e.limit) + ")" + where +
             "; that call's outputs for the token are NaN";
    case cuda::kBarrierTimeout:
      return "a device-side barrier timed out waiting for rank " + std::to_string(e.source) +
             " (its flag " + std::to_string(e.value) + " never reached " +
             std::to_string(e.limit) + ")" + where +
             "; the group's GPU barriers are out of step now, restart the process";
    case cuda::kRankMismatch:
      return "the rank/group operand changed to " + std::to_string(e.value) + " but was " +
             std::to_string(e.limit) + " when this call site first ran" + where;
    default:
      return "unknown device fault code " + std::to_string(e.code) + where;
  }
}

// Returns a fault an earlier call recorded, if its copy has landed (never waits), and clears the
// record on the device ahead of this call's kernels.
ffi::Error TakeDeviceError(DeviceState& s, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.error_copy_pending) return ffi::Error::Success();
  const cudaError_t st = cudaEventQuery(s.error_copied);
  if (st == cudaErrorNotReady) {
    cudaGetLastError();  // not a failure
    return ffi::Error::Success();
  }
  if (st != cudaSuccess) return CudaFailure("polling the device fault record", st);
  s.error_copy_pending = false;
  if (s.error_host->code == cuda::kDeviceOk) return ffi::Error::Success();
  const std::string msg = DescribeDeviceError(*s.error_host, s.ordinal);
  const bool bad_input = s.error_host->code == cuda::kBadExpertId;
  *s.error_host = {};
  if (cudaError_t clear = cudaMemsetAsync(s.error, 0, sizeof(cuda::DeviceError), stream);
      clear != cudaSuccess)
    return CudaFailure("clearing the device fault record", clear);
  return bad_input ? InvalidArgument(msg) : ffi::Error::Internal("jax_ccfuser: " + msg);
}

// Enqueues the copy of the fault record that a later call reads (one copy in flight at a time;
// the record is sticky until reported, so a skipped copy loses nothing).
ffi::Error ScheduleErrorCopy(DeviceState& s, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.error_copy_pending) return ffi::Error::Success();
  cudaError_t st = cudaMemcpyAsync(s.error_host, s.error, sizeof(cuda::DeviceError),
                                   cudaMemcpyDeviceToHost, stream);
  if (st == cudaSuccess) st = cudaEventRecord(s.error_copied, stream);
  if (st != cudaSuccess) return CudaFailure("copying the device fault record", st);
  s.error_copy_pending = true;
  return ffi::Error::Success();
}

// Grows the GPU's workspace to `bytes`, stream-ordered: kernels enqueued earlier keep the old
// block until they are done with it, and the host does not wait.
ffi::Error EnsureWorkspace(DeviceState& s, size_t bytes, cudaStream_t stream, void** out) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (bytes > s.workspace_bytes) {
    if (s.workspace) {
      if (cudaError_t st = cudaFreeAsync(s.workspace, stream); st != cudaSuccess)
        return CudaFailure("freeing the workspace", st);
      s.workspace = nullptr;
      s.workspace_bytes = 0;
    }
    if (cudaError_t st = cudaMallocAsync(&s.workspace, bytes, stream); st != cudaSuccess)
      return CudaFailure("allocating a " + std::to_string(bytes) + "-byte workspace", st);
    s.workspace_bytes = bytes;
  }
  *out = s.workspace;
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Decoding and checks.

cuda::DType ToDType(ffi::DataType t) {
  return t == ffi::DataType::F32 ? cuda::DType::kF32
         : t == ffi::DataType::BF16 ? cuda::DType::kBF16
                                    : cuda::DType::kF16;
}

// What the CUDA kernels support beyond the contract's checks.
ffi::Error CheckCudaLimits(const MoeDims& d, const CallAttrs& attrs, const PlanArray& workers,
                           const PlanArray& bounds, std::initializer_list<const void*> vectors) {
  const auto w = workers.dimensions(), b = bounds.dimensions();
  if (w[0] != d.group_experts() || b[0] != d.group_experts() || w[1] < 1 || b[1] != w[1] + 1)
    return InvalidArgument("plan arrays must be workers [E, S] and bounds [E, S + 1] with E = " +
                           std::to_string(d.group_experts()) + "; got " + ShapeString(workers) +
                           " and " + ShapeString(bounds));
  // The plan lives on the device: its helper slots are what the host can see of its helpers.
  if (w[1] != 1)
    return Unimplemented("reassignment plans (helper slots: workers " + ShapeString(workers) +
                         ") are not implemented on GPU yet; call fused_moe with plan=None");
  if (d.num_devices > cuda::kMaxPeers)
    return Unimplemented("expert-parallel groups of up to " + std::to_string(cuda::kMaxPeers) +
                         " devices; got " + std::to_string(d.num_devices));
  const int64_t here = attrs.emulated ? d.group_experts() : d.experts_local;
  if (here > cuda::kMaxExpertsHere)
    return Unimplemented(std::to_string(here) + " experts in one work list; at most " +
                         std::to_string(cuda::kMaxExpertsHere));
  const int64_t pairs = d.num_devices * d.tokens * d.k;
  if (pairs > INT32_MAX || d.hidden > INT32_MAX || d.gate_ffn > INT32_MAX)
    return Unimplemented("D * T * K = " + std::to_string(pairs) + " pairs, H and G*F must fit int32");
  // bf16/f16 tiles move 16-byte vectors along H and F.
  if (d.x_type != ffi::DataType::F32) {
    if (d.hidden % 8 || d.ffn % 8)
      return Unimplemented("bfloat16/float16 need H and F to be multiples of 8; got H=" +
                           std::to_string(d.hidden) + ", F=" + std::to_string(d.ffn));
    for (const void* p : vectors)
      if (reinterpret_cast<uintptr_t>(p) % 16)
        return InvalidArgument("operand buffers must be 16-byte aligned");
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// The peer table: device pointers of every (possibly emulated) device's buffers, the one
// structure both modes fill and every kernel reads through.

struct Call {
  MoeDims d;
  std::vector<PeerBuffers> peers;  // one per device of the group
  // The experts this call computes, [first_expert, first_expert + experts_here), their weights
  // (stacked like the operands), and the tokens whose slots it sums.
  int32_t first_expert = 0, experts_here = 0;
  const void* w_in = nullptr;
  const void* w_out = nullptr;
  const int32_t* own_ids = nullptr;
  float* own_staging = nullptr;
  // Backward: where peers write this device's d expert_weights (the output, or its region).
  void* own_d_weights = nullptr;
  int64_t own_tokens = 0;
  // Peers in other processes: this device's operands, copied into its region (where they read
  // them) ahead of the start barrier.
  struct Staged {
    void* to;
    const void* from;
    size_t bytes;
  };
  std::vector<Staged> staged;
  // Real peers only: the device barriers' members; `synchronized` false when emulating.
  bool synchronized = false;
  cuda::BarrierParams barrier{};
};

// This GPU's rank and group for `site`: read from the operands on its first call (the one
// host-device synchronisation of the path), then cached; the start barrier checks the cached
// values against the operands on the device at every call.
ffi::Error Position(DeviceState& s, uint64_t site, const ScalarS32& rank, const ScalarS32& group,
                    int num_devices, cudaStream_t stream, int32_t* rank_out, int32_t* group_out) {
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.positions.find(site);
    if (it != s.positions.end()) {
      *rank_out = it->second.first;
      *group_out = it->second.second;
      return ffi::Error::Success();
    }
  }
  int32_t values[2];
  cudaError_t st = cudaMemcpyAsync(&values[0], rank.typed_data(), sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream);
  if (st == cudaSuccess)
    st = cudaMemcpyAsync(&values[1], group.typed_data(), sizeof(int32_t), cudaMemcpyDeviceToHost,
                         stream);
  if (st == cudaSuccess) st = cudaStreamSynchronize(stream);
  if (st != cudaSuccess) return CudaFailure("reading the rank and group operands", st);
  if (values[0] < 0 || values[0] >= num_devices)
    return InvalidArgument("rank " + std::to_string(values[0]) + " outside the group of " +
                           std::to_string(num_devices) + " devices");
  std::lock_guard<std::mutex> lock(s.mu);
  s.positions[site] = {values[0], values[1]};
  *rank_out = values[0];
  *group_out = values[1];
  return ffi::Error::Success();
}

// Lets this GPU's kernels reach GPU `peer`'s memory (XLA has usually done so already).
ffi::Error EnablePeerAccess(DeviceState& me, int peer) {
  if (peer < 0 || peer >= cuda::kMaxDevices)
    return Unimplemented("GPU " + std::to_string(peer) + " is beyond the " +
                         std::to_string(cuda::kMaxDevices) + " GPUs peer access is tracked for");
  std::lock_guard<std::mutex> lock(me.mu);
  if (peer == me.ordinal || me.peer_access[peer]) return ffi::Error::Success();
  if (cudaError_t st = cudaSetDevice(me.ordinal); st != cudaSuccess)  // current already (XLA)
    return CudaFailure("selecting GPU " + std::to_string(me.ordinal), st);
  int can = 0;
  cudaError_t st = cudaDeviceCanAccessPeer(&can, me.ordinal, peer);
  if (st != cudaSuccess) return CudaFailure("querying peer access", st);
  if (!can)
    return Unimplemented("GPU " + std::to_string(me.ordinal) + " cannot access GPU " +
                         std::to_string(peer) + "'s memory (no peer-to-peer path)");
  st = cudaDeviceEnablePeerAccess(peer, 0);
  if (st == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // XLA enabled it already
  } else if (st != cudaSuccess) {
    return CudaFailure("enabling peer access to GPU " + std::to_string(peer), st);
  }
  me.peer_access[peer] = true;
  return ffi::Error::Success();
}

// Completes a real group's call once the members' flags are in `call->barrier`: the rest of the
// barrier members, and the experts and tokens this device handles.
void JoinGroup(const CallAttrs& attrs, DeviceState& me, int32_t rank, int32_t group, Call* call) {
  const MoeDims& d = call->d;
  cuda::BarrierParams& b = call->barrier;
  b.num_members = d.num_devices;
  b.rank = rank;
  b.timeout_ns = attrs.timeout_ms * 1000000;
  b.error = me.error;
  b.expected_group = group;
  call->synchronized = true;
  call->first_expert = rank * static_cast<int32_t>(d.experts_local);
  call->experts_here = static_cast<int32_t>(d.experts_local);
  call->own_tokens = d.tokens;
}

// Meets the peers of a real group in this process and fills the peer table and the barrier
// members.
ffi::Error ConnectInProcess(const CallAttrs& attrs, DeviceState& me, const ScalarS32& rank_op,
                            const ScalarS32& group_op, const PeerBuffers& own, cudaStream_t stream,
                            Call* call) {
  const MoeDims& d = call->d;
  int32_t rank = 0, group_index = 0;
  if (ffi::Error err = Position(me, attrs.site, rank_op, group_op, d.num_devices, stream, &rank,
                                &group_index);
      err.failure())
    return err;
  std::shared_ptr<PeerGroup> group = FindPeerGroup(attrs.site, group_index, d.num_devices);
  if (!group)
    return InvalidArgument("call site " + std::to_string(attrs.site) +
                           " is already in use by a group of another size");
  const auto timeout = std::chrono::milliseconds(attrs.timeout_ms);
  PeerBuffers published = own;
  published.signature = Signature(d);
  group->Publish(rank, published);
  if (ffi::Error err = group->Arrive(rank, Phase::kPublished, timeout); err.failure()) return err;
  for (int dev = 0; dev < d.num_devices; ++dev) call->peers.push_back(group->peer(dev));
  // The second host meeting: every device holds its copy of the table, so a fast device may
  // publish its next call's buffers (the kernels' own ordering is the device barriers').
  if (ffi::Error err = group->Arrive(rank, Phase::kComputed, timeout); err.failure()) return err;
  for (int dev = 0; dev < d.num_devices; ++dev)
    if (call->peers[dev].signature != published.signature)
      return ffi::Error::Internal(
          "jax_ccfuser: device " + std::to_string(dev) +
          " called this site with other shapes or dtypes than device " + std::to_string(rank));

  // The barrier members: each peer's GPU (from where its buffers live) and signal buffer.
  cuda::BarrierParams& b = call->barrier;
  for (int dev = 0; dev < d.num_devices; ++dev) {
    cudaPointerAttributes where;
    if (cudaError_t st = cudaPointerGetAttributes(&where, call->peers[dev].ids); st != cudaSuccess)
      return CudaFailure("locating device " + std::to_string(dev) + "'s buffers", st);
    DeviceState* peer = FindDeviceState(where.device);
    if (where.type != cudaMemoryTypeDevice || peer == nullptr)
      return ffi::Error::Internal("jax_ccfuser: device " + std::to_string(dev) +
                                  "'s expert_ids are not in the memory of a GPU running this op");
    b.signals[dev] = peer->signal;
    b.slots[dev] = where.device;
    for (int other = 0; other < dev; ++other)
      if (b.slots[other] == where.device)
        return InvalidArgument("devices " + std::to_string(other) + " and " + std::to_string(dev) +
                               " of the group are the same GPU " + std::to_string(where.device));
  }
  for (int dev = 0; dev < d.num_devices; ++dev)
    if (ffi::Error err = EnablePeerAccess(me, b.slots[dev]); err.failure()) return err;
  JoinGroup(attrs, me, rank, group_index, call);
  return ffi::Error::Success();
}

// Meets peers in other processes of the host through the call site's regions in the CUDA IPC
// workspaces: every member's buffers are its region (registry + offset + layout), this device's
// operands are staged into its own on the stream, and the device barriers' flags and counts are
// in the regions. Nothing is exchanged on the host, so there is no host meeting either.
ffi::Error ConnectIpc(const CallAttrs& attrs, DeviceState& me, const ScalarS32& rank_op,
                         const ScalarS32& group_op, const PeerBuffers& own, cudaStream_t stream,
                         Call* call) {
  const MoeDims& d = call->d;
  const int64_t n = d.num_devices;
  int32_t rank = 0, group = 0;
  if (ffi::Error err =
          Position(me, attrs.site, rank_op, group_op, d.num_devices, stream, &rank, &group);
      err.failure())
    return err;
  // The kernels move 16-byte vectors through the regions.
  if (attrs.workspace_offset % cuda::kWorkspaceAlignment)
    return ffi::Error::Internal("jax_ccfuser: call site region at offset " +
                                std::to_string(attrs.workspace_offset) + " is not " +
                                std::to_string(cuda::kWorkspaceAlignment) + "-byte aligned");
  const bool backward = own.dy != nullptr;
  const IpcRegionLayout at =
      LayoutIpcRegion(d.tokens, d.hidden, d.k, d.slots, ffi::ByteWidth(d.x_type),
                      ffi::ByteWidth(d.weights_type), backward);
  char* mine = nullptr;
  std::vector<int> local_gpus;  // where the members this process runs keep their regions
  for (int64_t r = 0; r < n; ++r) {
    const Segment* seg;
    if (ffi::Error err = FindRegion(attrs, group, n, r, r == rank, at.bytes, &seg); err.failure())
      return err;
    const int32_t device = attrs.devices[group * n + r];
    char* base = seg->base + attrs.workspace_offset;
    if (seg->owned) {
      cudaPointerAttributes where;
      if (cudaError_t st = cudaPointerGetAttributes(&where, seg->base); st != cudaSuccess)
        return CudaFailure("locating device " + std::to_string(device) + "'s workspace", st);
      if (r == rank && where.device != me.ordinal)
        return Misplaced(device, r,
                         "has its shared workspace on GPU " + std::to_string(where.device) +
                             " but runs on GPU " + std::to_string(me.ordinal));
      local_gpus.push_back(where.device);
    }
    if (r == rank) mine = base;
    call->peers.push_back(RegionPeer(base, at.operands));
    call->barrier.signals[r] = reinterpret_cast<uint64_t*>(base + at.signals);
    call->barrier.slots[r] = static_cast<int32_t>(r);
  }
  // A peer's mapping opened from its IPC handle is read by the one GPU it was opened on.
  if (local_gpus.size() > 1 && static_cast<int64_t>(local_gpus.size()) < n)
    return Unimplemented("this process runs " + std::to_string(local_gpus.size()) + " of the " +
                         std::to_string(n) + " devices of a group that spans processes; across "
                         "processes each runs one device of a group (one process per GPU)");
  for (int gpu : local_gpus)
    if (ffi::Error err = EnablePeerAccess(me, gpu); err.failure()) return err;

  const size_t x_bytes = d.tokens * d.hidden * ffi::ByteWidth(d.x_type);
  const size_t weights_bytes = d.tokens * d.k * ffi::ByteWidth(d.weights_type);
  const OperandOffsets& o = at.operands;
  call->staged = {{mine + o.x, own.x, x_bytes},
                  {mine + o.ids, own.ids, d.tokens * d.k * sizeof(int32_t)},
                  {mine + o.weights, own.weights, weights_bytes}};
  if (backward) call->staged.push_back({mine + o.dy, own.dy, x_bytes});
  call->own_staging = call->peers[rank].staging;
  call->own_d_weights = call->peers[rank].d_weights;
  call->barrier.passed = reinterpret_cast<uint64_t*>(mine + at.passed);
  JoinGroup(attrs, me, rank, group, call);
  return ffi::Error::Success();
}

// Builds the call: the emulated (or single) devices over the stacked blocks of this call's
// buffers, or a real group met through the registry or the shared workspaces.
ffi::Error ConnectPeers(const CallAttrs& attrs, DeviceState& me, const ScalarS32& rank,
                        const ScalarS32& group, const PeerBuffers& own, cudaStream_t stream,
                        Call* call) {
  const MoeDims& d = call->d;
  call->w_in = own.w_in;
  call->w_out = own.w_out;
  call->own_ids = own.ids;
  call->own_staging = own.staging;
  call->own_d_weights = own.d_weights;
  if (!attrs.emulated && d.num_devices > 1)
    return attrs.workspace >= 0 ? ConnectIpc(attrs, me, rank, group, own, stream, call)
                                : ConnectInProcess(attrs, me, rank, group, own, stream, call);
  for (int dev = 0; dev < d.num_devices; ++dev) call->peers.push_back(EmulatedPeer(own, d, dev));
  call->first_expert = 0;
  call->experts_here = static_cast<int32_t>(d.group_experts());
  call->own_tokens = d.num_devices * d.tokens;
  return ffi::Error::Success();
}

// The epochs of this GPU's next device barrier with the call's members (in this process, where
// the slots are the members' ordinals).
void NextEpochs(DeviceState& me, cuda::BarrierParams* b) {
  std::lock_guard<std::mutex> lock(me.mu);
  for (int i = 0; i < b->num_members; ++i) b->epochs[i] = ++me.barriers_with[b->slots[i]];
}

// ---------------------------------------------------------------------------------------------
// Workspace layout. `Carve` runs twice: once without a base to size the workspace, then over it.

struct Arena {
  char* base;
  size_t used = 0;

  template <typename T>
  T* Take(int64_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    const size_t bytes = sizeof(T) * static_cast<size_t>(count);
    used += (bytes + cuda::kWorkspaceAlignment - 1) / cuda::kWorkspaceAlignment *
            cuda::kWorkspaceAlignment;
    return p;
  }
};

cuda::WorkList CarveWorkList(const Call& c, Arena& arena) {
  const int64_t pairs = c.d.num_devices * c.d.tokens * c.d.k;
  const int64_t chunks = cuda::work_list_chunks(pairs);
  cuda::WorkList w;
  w.pair_code = arena.Take<int32_t>(pairs);
  w.pair_pos = arena.Take<int32_t>(pairs);
  w.chunk_counts = arena.Take<int32_t>(c.experts_here * chunks);
  w.expert_count = arena.Take<int32_t>(c.experts_here);
  w.expert_offset = arena.Take<int32_t>(c.experts_here + 1);
  w.tile_offset = arena.Take<int32_t>(c.experts_here + 1);
  w.items = arena.Take<cuda::WorkItem>(pairs);
  return w;
}

// ---------------------------------------------------------------------------------------------
// Tier 1: the launch sequence on raw pointers.

// Records the first failing launch; later launches are skipped, except the device barriers,
// which always go out once the peers have met, so that no peer waits for a barrier this GPU
// never enqueues and the pairs' barrier counts stay in step.
class Launcher {
 public:
  template <typename F>
  void Run(const char* what, F launch) {
    if (status_ == cudaSuccess) Record(what, launch());
  }
  template <typename F>
  void Always(const char* what, F launch) {
    Record(what, launch());
  }
  ffi::Error Result() const {
    return status_ == cudaSuccess ? ffi::Error::Success()
                                  : CudaFailure(std::string("launching ") + what_, status_);
  }

 private:
  void Record(const char* what, cudaError_t st) {
    if (st != cudaSuccess && status_ == cudaSuccess) {
      status_ = st;
      what_ = what;
    }
  }
  cudaError_t status_ = cudaSuccess;
  const char* what_ = "";
};

cuda::Routing MakeRouting(const Call& c) {
  cuda::Routing r{};
  for (int dev = 0; dev < c.d.num_devices; ++dev) r.ids[dev] = c.peers[dev].ids;
  r.num_sources = c.d.num_devices;
  r.num_tokens = static_cast<int32_t>(c.d.tokens);
  r.top_k = static_cast<int32_t>(c.d.k);
  r.experts_per_device = static_cast<int32_t>(c.d.experts_local);
  r.first_expert = c.first_expert;
  r.num_experts_here = c.experts_here;
  r.experts_total = c.d.experts_total;
  return r;
}

void LaunchWorkList(const Call& c, const cuda::WorkList& list, cuda::DeviceError* error,
                    cudaStream_t stream, Launcher& launcher) {
  const cuda::Routing routing = MakeRouting(c);
  const int tile_m = cuda::expert_gemm_tile_m(ToDType(c.d.x_type));
  launcher.Run("count_pairs", [&] { return cuda::count_pairs(routing, list, error, stream); });
  launcher.Run("scan_counts", [&] { return cuda::scan_counts(routing, list, stream); });
  launcher.Run("fill_work_list",
               [&] { return cuda::fill_work_list(routing, list, tile_m, stream); });
}

// The start barrier (which also checks the cached rank and group) or the end barrier of a real
// group; nothing when emulating, where stream order does the job.
void DeviceBarrier(const Call& c, DeviceState& me, const ScalarS32* rank, const ScalarS32* group,
                   cudaStream_t stream, Launcher& launcher) {
  if (!c.synchronized) return;
  cuda::BarrierParams b = c.barrier;
  if (b.passed == nullptr) NextEpochs(me, &b);  // flags in regions count on the device
  b.rank_value = rank ? rank->typed_data() : nullptr;
  b.group_value = group ? group->typed_data() : nullptr;
  launcher.Always("barrier", [&] { return cuda::barrier(b, stream); });
}

// The start of a call: this device's operands staged where peers in other processes read them,
// the buffers peers write into zeroed (they may as soon as the start barrier opens), the start
// barrier.
void OpenCall(const Call& c, DeviceState& me, const ScalarS32& rank, const ScalarS32& group,
              cudaStream_t stream, Launcher& launcher) {
  for (const Call::Staged& copy : c.staged)
    launcher.Run("staging operands into the shared region", [&] {
      return cudaMemcpyAsync(copy.to, copy.from, copy.bytes, cudaMemcpyDeviceToDevice, stream);
    });
  launcher.Run("zeroing staging", [&] {
    return cudaMemsetAsync(c.own_staging, 0, sizeof(float) * c.own_tokens * c.d.slots * c.d.hidden,
                           stream);
  });
  // Backward: every (token, k) with a valid id is written by its expert's GPU; zero them anyway
  // so a failed call leaves no uninitialised memory behind.
  if (c.own_d_weights != nullptr)
    launcher.Run("zeroing d_expert_weights", [&] {
      return cudaMemsetAsync(c.own_d_weights, 0,
                             ffi::ByteWidth(c.d.weights_type) * c.own_tokens * c.d.k, stream);
    });
  DeviceBarrier(c, me, &rank, &group, stream, launcher);
}

cuda::GemmOperand Gathered(const Call& c, const void* PeerBuffers::*field, int64_t ld) {
  cuda::GemmOperand op{};
  op.source = cuda::RowSource::kGathered;
  for (int dev = 0; dev < c.d.num_devices; ++dev) op.peers[dev] = c.peers[dev].*field;
  op.ld = ld;
  return op;
}

cuda::GemmOperand PairRows(const void* data, int64_t ld) {
  cuda::GemmOperand op{};
  op.source = cuda::RowSource::kPair;
  op.data = data;
  op.ld = ld;
  return op;
}

cuda::GemmOperand ExpertRows(const void* data, int64_t ld, int64_t expert_stride) {
  cuda::GemmOperand op{};
  op.source = cuda::RowSource::kExpert;
  op.data = data;
  op.ld = ld;
  op.expert_stride = expert_stride;
  return op;
}

cuda::GemmParams GemmOver(const Call& c, const cuda::WorkList& list, cuda::GemmShape shape,
                          int64_t m, int64_t n, int64_t k, cuda::GemmOperand a,
                          cuda::GemmOperand b, cuda::Epilogue epilogue) {
  cuda::GemmParams p{};
  p.shape = shape;
  p.m = static_cast<int32_t>(m);
  p.n = static_cast<int32_t>(n);
  p.k = static_cast<int32_t>(k);
  p.a = a;
  p.b = b;
  p.items = list.items;
  p.expert_offset = list.expert_offset;
  p.tile_offset = list.tile_offset;
  p.num_experts_here = c.experts_here;
  p.epilogue = epilogue;
  p.activation = static_cast<int32_t>(c.d.activation);
  p.gated = IsGated(c.d.activation);
  p.weights_f32 = c.d.weights_type == ffi::DataType::F32;
  p.top_k = static_cast<int32_t>(c.d.k);
  for (int dev = 0; dev < c.d.num_devices; ++dev) p.weights[dev] = c.peers[dev].weights;
  return p;
}

cuda::ScatterParams ScatterOver(const Call& c, const cuda::WorkList& list, const float* rows) {
  cuda::ScatterParams p{};
  p.pair_code = list.pair_code;
  p.pair_pos = list.pair_pos;
  p.num_sources = c.d.num_devices;
  p.num_tokens = static_cast<int32_t>(c.d.tokens);
  p.top_k = static_cast<int32_t>(c.d.k);
  p.hidden = static_cast<int32_t>(c.d.hidden);
  p.num_slots = c.d.slots;
  p.rows = rows;
  p.weights_f32 = c.d.weights_type == ffi::DataType::F32;
  for (int dev = 0; dev < c.d.num_devices; ++dev) {
    p.weights[dev] = c.peers[dev].weights;
    p.staging[dev] = c.peers[dev].staging;
    p.d_weights[dev] = c.peers[dev].d_weights;
  }
  return p;
}

cuda::CombineParams CombineOver(const Call& c, void* out, void* d_weights) {
  cuda::CombineParams p{};
  p.ids = c.own_ids;
  p.staging = c.own_staging;
  p.out = out;
  p.num_tokens = static_cast<int32_t>(c.own_tokens);
  p.top_k = static_cast<int32_t>(c.d.k);
  p.hidden = static_cast<int32_t>(c.d.hidden);
  p.num_slots = c.d.slots;
  p.experts_per_device = static_cast<int32_t>(c.d.experts_local);
  p.num_experts = static_cast<int32_t>(c.d.group_experts());
  p.experts_total = c.d.experts_total;
  p.d_weights = d_weights;
  p.weights_f32 = c.d.weights_type == ffi::DataType::F32;
  return p;
}

struct ForwardScratch {
  cuda::WorkList list;
  void* a;      // [pairs, F] act(x @ w_in), x's dtype
  float* rows;  // [pairs, H] a @ w_out
};

ForwardScratch CarveForward(const Call& c, Arena& arena) {
  const int64_t pairs = c.d.num_devices * c.d.tokens * c.d.k;
  ForwardScratch s;
  s.list = CarveWorkList(c, arena);
  s.a = arena.Take<char>(pairs * c.d.ffn * ffi::ByteWidth(c.d.x_type));
  s.rows = arena.Take<float>(pairs * c.d.hidden);
  return s;
}

void RunForward(const Call& c, DeviceState& me, const ForwardScratch& s, const ScalarS32& rank,
                const ScalarS32& group, void* y, cudaStream_t stream, Launcher& launcher) {
  const MoeDims& d = c.d;
  const cuda::DType dtype = ToDType(d.x_type);
  const int64_t h = d.hidden, f = d.ffn, gf = d.gate_ffn;
  OpenCall(c, me, rank, group, stream, launcher);
  LaunchWorkList(c, s.list, me.error, stream, launcher);

  // GEMM1: gather x rows from their sources, @ w_in[e], activation (gated: gate and up columns
  // side by side in one tile).
  cuda::GemmParams g1 = GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, f, h,
                                 Gathered(c, &PeerBuffers::x, h),
                                 ExpertRows(c.w_in, gf, h * gf), cuda::Epilogue::kActivation);
  g1.n_split = IsGated(d.activation) ? static_cast<int32_t>(f) : 0;
  g1.out = s.a;
  g1.out_ld = f;
  launcher.Run("GEMM1", [&] {
    return cuda::expert_gemm(dtype, cuda::Major::kK, cuda::Major::kMN, g1, me.num_sms, stream);
  });
  // GEMM2: a @ w_out[e] into float32 rows.
  cuda::GemmParams g2 = GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, h, f,
                                 PairRows(s.a, f), ExpertRows(c.w_out, h, f * h),
                                 cuda::Epilogue::kStoreF32);
  g2.out = s.rows;
  g2.out_ld = h;
  launcher.Run("GEMM2", [&] {
    return cuda::expert_gemm(dtype, cuda::Major::kK, cuda::Major::kMN, g2, me.num_sms, stream);
  });
  cuda::ScatterParams scatter = ScatterOver(c, s.list, s.rows);
  scatter.weighted = 1;
  launcher.Run("scatter_slots", [&] { return cuda::scatter_slots(dtype, scatter, stream); });
  DeviceBarrier(c, me, nullptr, nullptr, stream, launcher);
  launcher.Run("combine_slots", [&] {
    return cuda::combine_slots(dtype, CombineOver(c, y, nullptr), stream);
  });
}

struct BackwardScratch {
  cuda::WorkList list;
  float* h;             // [pairs, G*F] x @ w_in, recomputed
  void* aw;             // [pairs, F] w * act(h), x's dtype
  void* dh;             // [pairs, G*F] x's dtype
  float* dot_partial;   // [pairs, F tiles]
  float* rows;          // [pairs, H] dh @ w_in^T
  int32_t num_partials;
};

BackwardScratch CarveBackward(const Call& c, Arena& arena) {
  const int64_t pairs = c.d.num_devices * c.d.tokens * c.d.k;
  const int64_t width = ffi::ByteWidth(c.d.x_type);
  const int tile_n = cuda::expert_gemm_tile_n(ToDType(c.d.x_type));
  BackwardScratch s;
  s.list = CarveWorkList(c, arena);
  s.num_partials = static_cast<int32_t>((c.d.ffn + tile_n - 1) / tile_n);
  s.h = arena.Take<float>(pairs * c.d.gate_ffn);
  s.aw = arena.Take<char>(pairs * c.d.ffn * width);
  s.dh = arena.Take<char>(pairs * c.d.gate_ffn * width);
  s.dot_partial = arena.Take<float>(pairs * s.num_partials);
  s.rows = arena.Take<float>(pairs * c.d.hidden);
  return s;
}

void RunBackward(const Call& c, DeviceState& me, const BackwardScratch& s, const ScalarS32& rank,
                 const ScalarS32& group, void* dx, void* d_weights, void* dw_in, void* dw_out,
                 cudaStream_t stream, Launcher& launcher) {
  const MoeDims& d = c.d;
  const cuda::DType dtype = ToDType(d.x_type);
  const int64_t h = d.hidden, f = d.ffn, gf = d.gate_ffn;
  OpenCall(c, me, rank, group, stream, launcher);
  LaunchWorkList(c, s.list, me.error, stream, launcher);

  // h = x @ w_in[e], float32.
  cuda::GemmParams h_gemm = GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, gf, h,
                                     Gathered(c, &PeerBuffers::x, h),
                                     ExpertRows(c.w_in, gf, h * gf), cuda::Epilogue::kStoreF32);
  h_gemm.out = s.h;
  h_gemm.out_ld = gf;
  launcher.Run("h = x @ w_in", [&] {
    return cuda::expert_gemm(dtype, cuda::Major::kK, cuda::Major::kMN, h_gemm, me.num_sms,
                             stream);
  });
  // u = dy @ w_out[e]^T; the epilogue forms w*a, dh and the partial dot(a, u).
  cuda::GemmParams u_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, f, h, Gathered(c, &PeerBuffers::dy, h),
               ExpertRows(c.w_out, h, f * h), cuda::Epilogue::kActivationBackward);
  u_gemm.h = s.h;
  u_gemm.aw = s.aw;
  u_gemm.dh = s.dh;
  u_gemm.dot_partial = s.dot_partial;
  launcher.Run("u = dy @ w_out^T", [&] {
    return cuda::expert_gemm(dtype, cuda::Major::kK, cuda::Major::kK, u_gemm, me.num_sms, stream);
  });
  // dW_out[e] = (w a)^T dy and dW_in[e] = x^T dh, reduced over the expert's pairs in order.
  cuda::GemmParams dw_out_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairReduction, f, h, 0, PairRows(s.aw, f),
               Gathered(c, &PeerBuffers::dy, h), cuda::Epilogue::kStoreExpert);
  dw_out_gemm.out = dw_out;
  dw_out_gemm.out_ld = h;
  dw_out_gemm.out_expert_stride = f * h;
  launcher.Run("dw_out", [&] {
    return cuda::expert_gemm(dtype, cuda::Major::kMN, cuda::Major::kMN, dw_out_gemm, me.num_sms,
                             stream);
  });
  cuda::GemmParams dw_in_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairReduction, h, gf, 0,
               Gathered(c, &PeerBuffers::x, h), PairRows(s.dh, gf), cuda::Epilogue::kStoreExpert);
  dw_in_gemm.out = dw_in;
  dw_in_gemm.out_ld = gf;
  dw_in_gemm.out_expert_stride = h * gf;
  launcher.Run("dw_in", [&] {
    return cuda::expert_gemm(dtype, cuda::Major::kMN, cuda::Major::kMN, dw_in_gemm, me.num_sms,
                             stream);
  });
  // dx rows = dh @ w_in[e]^T.
  cuda::GemmParams dx_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, h, gf, PairRows(s.dh, gf),
               ExpertRows(c.w_in, gf, h * gf), cuda::Epilogue::kStoreF32);
  dx_gemm.out = s.rows;
  dx_gemm.out_ld = h;
  launcher.Run("dx = dh @ w_in^T", [&] {
    return cuda::expert_gemm(dtype, cuda::Major::kK, cuda::Major::kK, dx_gemm, me.num_sms,
                             stream);
  });
  cuda::ScatterParams scatter = ScatterOver(c, s.list, s.rows);
  scatter.weighted = 0;  // w is in dh already
  scatter.dot_partial = s.dot_partial;
  scatter.num_partials = s.num_partials;
  launcher.Run("scatter_slots", [&] { return cuda::scatter_slots(dtype, scatter, stream); });
  DeviceBarrier(c, me, nullptr, nullptr, stream, launcher);
  launcher.Run("combine_slots", [&] {
    return cuda::combine_slots(dtype, CombineOver(c, dx, c.own_d_weights), stream);
  });
  if (c.own_d_weights != d_weights)  // peers wrote them into this device's region
    launcher.Run("copying d_expert_weights out of the region", [&] {
      return cudaMemcpyAsync(d_weights, c.own_d_weights,
                             ffi::ByteWidth(d.weights_type) * c.own_tokens * d.k,
                             cudaMemcpyDeviceToDevice, stream);
    });
}

// ---------------------------------------------------------------------------------------------
// Tier 2: decode, validate, connect, lay out the workspace, launch.

// The steps every handler takes before its launches: the GPU's state, a fault an earlier call
// recorded (returned in `earlier`, to be reported only after this call has met its peers and
// enqueued its barriers, so that no peer waits for a GPU that bailed out), the peers.
ffi::Error Prepare(const CallAttrs& attrs, int32_t ordinal, cudaStream_t stream,
                   const ScalarS32& rank, const ScalarS32& group, const PeerBuffers& own,
                   DeviceState** state, ffi::Error* earlier, Call* call) {
  cudaGetLastError();  // a stale error of someone else's on this thread is not ours
  if (ffi::Error err = GetDeviceState(ordinal, stream, state); err.failure()) return err;
  *earlier = TakeDeviceError(**state, stream);
  return ConnectPeers(attrs, **state, rank, group, own, stream, call);
}

// What a handler returns once its launches are enqueued: the first failure among them, this
// GPU's earlier device fault, or success with the fault record's copy scheduled.
ffi::Error Finish(DeviceState& state, const Launcher& launcher, ffi::Error earlier,
                  cudaStream_t stream) {
  if (ffi::Error err = launcher.Result(); err.failure()) return err;
  if (earlier.failure()) return earlier;
  return ScheduleErrorCopy(state, stream);
}

// After the peers met, a call that cannot run still sends this GPU's two device barriers: the
// peers wait for them, and the end barrier keeps this call's buffers alive (stream-ordered)
// until the peers have stopped writing into them.
ffi::Error Abandon(const Call& call, DeviceState& state, const ScalarS32& rank,
                   const ScalarS32& group, cudaStream_t stream, ffi::Error why) {
  Launcher launcher;
  DeviceBarrier(call, state, &rank, &group, stream, launcher);
  DeviceBarrier(call, state, nullptr, nullptr, stream, launcher);
  return why;
}

template <typename Scratch, Scratch (*kCarve)(const Call&, Arena&)>
ffi::Error Carve(DeviceState& state, const Call& call, cudaStream_t stream, Scratch* scratch) {
  Arena sizing{nullptr};
  kCarve(call, sizing);
  void* base;
  if (ffi::Error err = EnsureWorkspace(state, sizing.used, stream, &base); err.failure())
    return err;
  Arena arena{static_cast<char*>(base)};
  *scratch = kCarve(call, arena);
  return ffi::Error::Success();
}

ffi::Error MoeForwardImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::S32> ids, ffi::AnyBuffer weights, ffi::AnyBuffer w_in,
                          ffi::AnyBuffer w_out, PlanArray plan_workers, PlanArray plan_bounds,
                          ScalarS32 rank, ScalarS32 group, CallAttrs attrs,
                          ffi::Result<ffi::AnyBuffer> y, ffi::Result<Staging> staging) {
  Call call;
  if (ffi::Error err = DecodeDims(x, ids, weights, w_in, w_out, attrs, &call.d); err.failure())
    return err;
  if (ffi::Error err = CheckCudaLimits(call.d, attrs, plan_workers, plan_bounds,
                                       {x.untyped_data(), w_in.untyped_data(),
                                        w_out.untyped_data()});
      err.failure())
    return err;
  if (ffi::Error err = CheckForwardResults(call.d, x, *y, *staging); err.failure()) return err;
  if (x.element_count() == 0) return ffi::Error::Success();

  DeviceState* state;
  ffi::Error earlier;
  if (ffi::Error err = Prepare(attrs, ordinal, stream, rank, group,
                               OwnBuffers(x, ids, weights, w_in, w_out, *staging), &state,
                               &earlier, &call);
      err.failure())
    return err;
  ForwardScratch scratch;
  if (ffi::Error err = Carve<ForwardScratch, CarveForward>(*state, call, stream, &scratch);
      err.failure())
    return Abandon(call, *state, rank, group, stream, std::move(err));
  Launcher launcher;
  RunForward(call, *state, scratch, rank, group, y->untyped_data(), stream, launcher);
  return Finish(*state, launcher, std::move(earlier), stream);
}

ffi::Error MoeBackwardImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer x,
                           ffi::Buffer<ffi::S32> ids, ffi::AnyBuffer weights, ffi::AnyBuffer w_in,
                           ffi::AnyBuffer w_out, PlanArray plan_workers, PlanArray plan_bounds,
                           ffi::AnyBuffer dy, ScalarS32 rank, ScalarS32 group, CallAttrs attrs,
                           ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> d_weights,
                           ffi::Result<ffi::AnyBuffer> dw_in, ffi::Result<ffi::AnyBuffer> dw_out,
                           ffi::Result<Staging> staging) {
  Call call;
  if (ffi::Error err = DecodeDims(x, ids, weights, w_in, w_out, attrs, &call.d); err.failure())
    return err;
  const MoeDims& d = call.d;
  if (ffi::Error err = CheckCudaLimits(d, attrs, plan_workers, plan_bounds,
                                       {x.untyped_data(), dy.untyped_data(), w_in.untyped_data(),
                                        w_out.untyped_data()});
      err.failure())
    return err;
  if (ffi::Error err = CheckBackwardBuffers(d, x, w_in, w_out, dy, *dx, *d_weights, *dw_in,
                                            *dw_out, *staging);
      err.failure())
    return err;
  if (x.element_count() == 0) return ffi::Error::Success();

  PeerBuffers own = OwnBuffers(x, ids, weights, w_in, w_out, *staging);
  own.dy = dy.untyped_data();
  own.d_weights = d_weights->untyped_data();
  DeviceState* state;
  ffi::Error earlier;
  if (ffi::Error err = Prepare(attrs, ordinal, stream, rank, group, own, &state, &earlier, &call);
      err.failure())
    return err;
  BackwardScratch scratch;
  if (ffi::Error err = Carve<BackwardScratch, CarveBackward>(*state, call, stream, &scratch);
      err.failure())
    return Abandon(call, *state, rank, group, stream, std::move(err));
  Launcher launcher;
  RunBackward(call, *state, scratch, rank, group, dx->untyped_data(), d_weights->untyped_data(),
              dw_in->untyped_data(), dw_out->untyped_data(), stream, launcher);
  return Finish(*state, launcher, std::move(earlier), stream);
}

}  // namespace
}  // namespace ccf

// ---------------------------------------------------------------------------------------------
// Tier 3: the bindings.

// XLA's stream and this GPU's ordinal, then the operands both platforms take.
#define CCF_CUDA_CONTEXT \
  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeForwardCuda, ccf::MoeForwardImpl,
                              ccf::BindForward(CCF_CUDA_CONTEXT));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeBackwardCuda, ccf::MoeBackwardImpl,
                              ccf::BindBackward(CCF_CUDA_CONTEXT));
