#include "xla_ffi/peer_group.h"

#include <atomic>
#include <map>
#include <sstream>
#include <utility>

namespace ccf {

PeerGroup::PeerGroup(int num_devices) : num_devices_(num_devices), peers_(num_devices) {
  for (Barrier& b : barriers_) b.seen.assign(num_devices, false);
}

void PeerGroup::ReportFailure(const std::string& msg) {
  std::lock_guard<std::mutex> lock(failure_mu_);
  if (failure_.empty()) failure_ = msg;
}

std::string PeerGroup::Failure() {
  std::lock_guard<std::mutex> lock(failure_mu_);
  return failure_;
}

std::string PeerGroup::Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) {
  Barrier& b = barriers_[static_cast<int>(phase)];
  std::unique_lock<std::mutex> lock(b.mu);
  const uint64_t generation = b.generation;
  b.seen[rank] = true;
  if (++b.arrived == num_devices_) {
    if (phase == Phase::kPublished) {
      std::lock_guard<std::mutex> failure_lock(failure_mu_);
      failure_.clear();
    }
    b.arrived = 0;
    b.seen.assign(num_devices_, false);
    ++b.generation;
    b.cv.notify_all();
    return {};
  }
  if (b.cv.wait_for(lock, timeout, [&] { return b.generation != generation; })) return {};
  // Withdraw, so this call does not count as an arrival in the next one.
  std::vector<bool> seen = b.seen;
  if (--b.arrived == 0) b.seen.assign(num_devices_, false);
  return BarrierTimeout(rank, phase, timeout, seen);
}

std::string BarrierTimeout(int rank, Phase phase, std::chrono::milliseconds timeout,
                           const std::vector<bool>& arrived) {
  static constexpr const char* kPhaseNames[] = {"publish", "compute", "release"};
  const int n = static_cast<int>(arrived.size());
  std::ostringstream msg;
  msg << "jax_ccfuser: device " << rank << " of " << n << " waited " << timeout.count()
      << " ms at the " << kPhaseNames[static_cast<int>(phase)]
      << " barrier; these peers never arrived:";
  for (int r = 0; r < n; ++r)
    if (!arrived[r]) msg << ' ' << r;
  msg << ". Every device of the expert-parallel axis must make the same fused_moe calls "
         "(raise the limit with jax_ccfuser.peer_timeout(seconds) if peers are merely slow).";
  return msg.str();
}

namespace {
std::mutex registry_mu;
std::map<std::pair<uint64_t, int32_t>, std::shared_ptr<PeerGroup>>& Registry() {
  static auto* registry = new std::map<std::pair<uint64_t, int32_t>, std::shared_ptr<PeerGroup>>;
  return *registry;
}
}  // namespace

std::shared_ptr<PeerGroup> FindPeerGroup(uint64_t site, int32_t group, int num_devices) {
  // Held only for the lookup: never while waiting at a barrier.
  std::lock_guard<std::mutex> lock(registry_mu);
  std::shared_ptr<PeerGroup>& slot = Registry()[{site, group}];
  if (!slot) slot = std::make_shared<PeerGroup>(num_devices);
  if (slot->num_devices() != num_devices) return nullptr;
  return slot;
}

namespace {
std::atomic<int> injected_fault_rank{-1};
}  // namespace

void FailNextCallForTesting(int rank) { injected_fault_rank.store(rank); }

bool TakeInjectedFault(int rank) {
  int expected = rank;
  return injected_fault_rank.compare_exchange_strong(expected, -1);
}

int64_t PeerGroupCount() {
  std::lock_guard<std::mutex> lock(registry_mu);
  return static_cast<int64_t>(Registry().size());
}

}  // namespace ccf
