// The fused-MoE protocol between processes of one host, over their shared workspaces.
//
// Each device of a call site owns a region of its workspace (shared_memory.h) at the same
// offset on every device: a header, then the copies of its operands that peers read (x, ids,
// weights, dy: the one local copy that stages them) and the buffers peers write into (staging,
// d expert_weights). Rank 0's header holds the group's barriers, so peers meet without any
// process-local state; peers wait on them with futexes, which work across processes.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "xla_ffi/moe_call.h"
#include "xla_ffi/peer_group.h"

namespace ccf {

// The sizes a region depends on (item sizes in bytes).
struct RegionShape {
  int64_t tokens, hidden, k, slots, x_bytes, weights_bytes;
  int64_t experts_local, expert_elements, w_bytes;  // expert_elements: H * G*F + F * H
  int64_t plan_slots;  // S of the reassignment plan: S > 1 reserves room for helpers
  bool backward;
};

// Byte offsets inside one device's region, after its RegionHeader; -1 where a section does not
// exist. With a plan the owner stages its experts' weights for helpers to read (`w`: w_in then
// w_out per expert), and backward the helpers write their float32 partial weight gradients into
// the owner's region (`partials` [E_local, S - 1, expert_elements]), which the owner sums in
// slot order.
struct RegionLayout {
  OperandOffsets operands;
  int64_t w, partials, bytes;
};

// Python sizes workspaces with it too (`shared_region_bytes`).
RegionLayout LayoutRegion(const RegionShape& s);

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
  std::array<int64_t, 9> signature;
};
static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<uint32_t>::is_always_lock_free,
              "barriers in shared memory need lock-free atomics");

class SharedGroup final : public Rendezvous {
 public:
  // `headers[r]`: rank r's region header, mapped in this process.
  explicit SharedGroup(std::vector<RegionHeader*> headers) : headers_(std::move(headers)) {}

  std::string Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) override;
  void ReportFailure(const std::string& msg) override;
  std::string Failure() override;

 private:
  std::vector<RegionHeader*> headers_;
};

}  // namespace ccf
