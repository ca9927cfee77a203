// One device's region of a call site whose peers live in other processes of the host: where it
// is (a chunk of the device's shared workspace, shared_memory.h) and what it holds, for the CPU
// shared-memory path (shared_group.h) and the CUDA IPC path (ipc_memory.h) alike.
//
// A region starts with its platform's barrier state, then the copies of the device's operands
// that peers read (x, ids, weights, dy: the one local copy that stages them) and the buffers
// peers write into (staging, d expert_weights). Python sizes the workspaces with the same layouts
// (`shared_region_bytes`).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/moe_call.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/shared_memory.h"

namespace ccf {

// The operand sections of a region, as byte offsets (dy and d_weights exist backward only, -1
// otherwise).
struct OperandOffsets {
  int64_t x, ids, weights, staging, dy, d_weights;
};

// The buffers of the region at `base`.
PeerBuffers RegionPeer(char* base, const OperandOffsets& at);

// CPU: the header of every device's region. Rank 0's holds the group's barriers, so peers meet
// without any process-local state; peers wait on them with futexes, which work across processes.
struct RegionHeader {
  static constexpr int kPhases = static_cast<int>(Phase::kNumPhases);
  // Rank 0's only.
  struct alignas(64) Barrier {
    std::atomic<uint64_t> state;       // (generation << 32) | devices waiting
    std::atomic<uint32_t> generation;  // times opened: the word waiters sleep on
  };
  Barrier barriers[kPhases];
  std::atomic<uint32_t> failed_at;  // the compute barrier's generation whose call failed
  char failure[512];
  // Every rank's own.
  std::atomic<uint32_t> arrived_for[kPhases];  // 1 + the generation it last came to
  // Set once the rank gave up waiting at a barrier after a call's publish barrier opened: a
  // peer still computing that call may write its region later, so the site fails from then on.
  std::atomic<uint32_t> gave_up_midway;
  std::array<int64_t, 9> signature;
  // When a timeout at this call site found the rank gone (BarrierWait), as DeviceLiveness
  // counts time; 0 while none did. Written by its peers.
  std::atomic<int64_t> gone_since_ns;
};
static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<uint32_t>::is_always_lock_free &&
                  std::atomic<int64_t>::is_always_lock_free,
              "barriers in shared memory need lock-free atomics");

// CPU: the sizes a region depends on (item sizes in bytes).
struct RegionShape {
  int64_t tokens, hidden, k, slots, x_bytes, weights_bytes;
  int64_t experts_local, expert_elements, w_bytes;  // expert_elements: H * G*F + F * H
  int64_t plan_slots;  // S + 1 of a plan of S helpers: S > 0 reserves room for helpers
  bool backward;
};

// CPU: byte offsets inside one device's region, after its RegionHeader; -1 where a section does
// not exist. With a plan the owner stages its experts' weights for helpers to read (`w`: w_in
// then w_out per expert), and backward the helpers write their float32 partial weight gradients
// into the owner's region (`partials` [E_local, S, expert_elements] for S helpers), which the owner
// sums in slot order.
struct RegionLayout {
  OperandOffsets operands;
  int64_t w, partials, bytes;
};

RegionLayout LayoutRegion(const RegionShape& s);

// CUDA: byte offsets inside one device's region. Its barrier state is the device barrier's flags
// (cuda/signal.cu), which peers write, the count of barriers the device has passed and its shape
// signature; the operands follow as on CPU.
struct IpcRegionLayout {
  int64_t signals;    // uint64 [kMaxPeers]: flag r is written by rank r
  int64_t passed;     // uint64: barriers this device has passed at the call site
  int64_t signature;  // uint64: the hash of the shapes the device traced, which peers compare
  OperandOffsets operands;
  int64_t bytes;
};

IpcRegionLayout LayoutIpcRegion(int64_t tokens, int64_t hidden, int64_t k, int64_t slots,
                                int64_t x_bytes, int64_t weights_bytes, bool backward);

// The error of a call whose devices are not where the mesh it was traced for put them.
xla::ffi::Error Misplaced(int32_t device, int64_t rank, const std::string& why);

// Rank `rank`'s `bytes` region: at attrs.workspace_offset of the workspace chunk of its device
// (attrs.devices[group * num_devices + rank]), which this process must own when `mine`.
xla::ffi::Error FindRegion(const CallAttrs& attrs, int32_t group, int64_t num_devices,
                           int64_t rank, bool mine, int64_t bytes, const Segment** segment);

}  // namespace ccf
