#include "xla_ffi/peer_group.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <sstream>
#include <utility>

namespace ccf {

namespace {

using Clock = std::chrono::steady_clock;

// What the barriers of every call site know of each device of a group (group index, rank): when
// it last came to or left one, whether it waits at one now, and whether a timeout has named it
// missing since. A device missing for a whole timeout after that is gone: waiting for it again
// would only add one timeout per queued call.
class Liveness {
 public:
  void Arrived(int32_t group, int rank) { Set(group, rank, /*waiting=*/true); }
  void Left(int32_t group, int rank) { Set(group, rank, /*waiting=*/false); }

  // Marks `rank` missing as of now, unless a timeout already did and it has not been heard
  // from since.
  void Missing(int32_t group, int rank) {
    std::lock_guard<std::mutex> lock(mu_);
    Device& d = devices_[{group, rank}];
    if (d.suspect) return;
    d.heard = Clock::now();
    d.suspect = true;
  }

  // When waiting for `rank` becomes pointless: `timeout` after a timeout named it missing, if it
  // has not come to or left a barrier since and waits at none; otherwise never.
  Clock::time_point GiveUpAt(int32_t group, int rank, std::chrono::milliseconds timeout) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = devices_.find({group, rank});
    if (it == devices_.end() || !it->second.suspect || it->second.waiting)
      return Clock::time_point::max();
    return it->second.heard + timeout;
  }

 private:
  struct Device {
    Clock::time_point heard;  // last came to or left a barrier, or was named missing
    bool waiting = false, suspect = false;
  };

  void Set(int32_t group, int rank, bool waiting) {
    std::lock_guard<std::mutex> lock(mu_);
    devices_[{group, rank}] = {Clock::now(), waiting, false};
  }

  std::mutex mu_;
  std::map<std::pair<int32_t, int>, Device> devices_;
};

Liveness& Devices() {
  static auto* liveness = new Liveness;
  return *liveness;
}

}  // namespace

PeerGroup::PeerGroup(int32_t group, int num_devices)
    : group_(group), num_devices_(num_devices), peers_(num_devices) {
  for (Barrier& b : barriers_) {
    b.seen.assign(num_devices, false);
    b.waiting.assign(num_devices, false);
  }
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
  Devices().Arrived(group_, rank);
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
    b.waiting.assign(num_devices_, false);
    ++b.generation;
    b.cv.notify_all();
    lock.unlock();
    Devices().Left(group_, rank);
    return {};
  }
  b.waiting[rank] = true;
  const Clock::time_point start = Clock::now();
  const auto opened = [&] { return b.generation != generation; };
  while (!opened()) {
    Clock::time_point deadline = start + timeout;
    for (int r = 0; r < num_devices_; ++r)
      if (!b.waiting[r]) deadline = std::min(deadline, Devices().GiveUpAt(group_, r, timeout));
    if (b.cv.wait_until(lock, deadline, opened)) break;
    if (Clock::now() < deadline) continue;
    // Withdraw, so this call does not count as an arrival in the next one.
    b.waiting[rank] = false;
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::max(deadline, start) - start);
    // A full timeout names the devices that never came; an early one only those given up on.
    std::vector<bool> came = b.seen;
    if (waited < timeout)
      for (int r = 0; r < num_devices_; ++r)
        came[r] = b.waiting[r] || Devices().GiveUpAt(group_, r, timeout) > deadline;
    if (--b.arrived == 0) b.seen.assign(num_devices_, false);
    lock.unlock();
    for (int r = 0; r < num_devices_; ++r)
      if (!came[r]) Devices().Missing(group_, r);
    Devices().Left(group_, rank);
    std::string msg = BarrierTimeout(rank, phase, waited, came);
    if (waited < timeout)
      msg += " A timeout " + std::to_string(timeout.count()) +
             " ms ago or earlier named them missing, and they have not reached any barrier "
             "since.";
    return msg;
  }
  lock.unlock();
  Devices().Left(group_, rank);
  return {};
}

std::string BarrierTimeout(int rank, Phase phase, std::chrono::milliseconds waited,
                           const std::vector<bool>& arrived) {
  static constexpr const char* kPhaseNames[] = {"publish", "compute", "release"};
  const int n = static_cast<int>(arrived.size());
  std::ostringstream msg;
  msg << "jax_ccfuser: device " << rank << " of " << n << " waited " << waited.count()
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
  if (!slot) slot = std::make_shared<PeerGroup>(group, num_devices);
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
