#include "xla_ffi/peer_group.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <sstream>
#include <utility>

namespace ccf {

namespace {

using Clock = std::chrono::steady_clock;

// When each device of a group (group index, rank) last came to or left a barrier of any call
// site, and whether it waits at one now: a device that does either is alive.
class Liveness {
 public:
  void Arrived(int32_t group, int rank) { Set(group, rank, /*waiting=*/true); }
  void Left(int32_t group, int rank) { Set(group, rank, /*waiting=*/false); }

  // Whether `rank` came to or left a barrier at `since` or later, or waits at one now.
  bool HeardSince(int32_t group, int rank, Clock::time_point since) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = devices_.find({group, rank});
    return it != devices_.end() && (it->second.waiting || it->second.heard >= since);
  }

 private:
  struct Device {
    Clock::time_point heard;
    bool waiting;
  };

  void Set(int32_t group, int rank, bool waiting) {
    std::lock_guard<std::mutex> lock(mu_);
    devices_[{group, rank}] = {Clock::now(), waiting};
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
    : group_(group),
      num_devices_(num_devices),
      peers_(num_devices),
      gone_since_(num_devices, Clock::time_point::max()) {
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

xla::ffi::Error PeerGroup::Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) {
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
    ++b.generation;
    b.cv.notify_all();
    lock.unlock();
    Devices().Left(group_, rank);
    return xla::ffi::Error::Success();
  }
  // A peer found gone at an earlier call of this site and silent ever since is waited for only
  // until half a timeout after that: calls queued behind the failed one then fail at once,
  // while a peer that was merely silent (it skipped a call) has time to come back.
  const Clock::time_point start = Clock::now();
  Clock::time_point deadline = start + timeout;
  std::vector<bool> gone(num_devices_, false);
  {
    std::lock_guard<std::mutex> gone_lock(gone_mu_);
    for (int r = 0; r < num_devices_; ++r) {
      gone[r] = !b.seen[r] && gone_since_[r] != Clock::time_point::max() &&
                !Devices().HeardSince(group_, r, gone_since_[r]);
      if (gone[r]) deadline = std::min(deadline, gone_since_[r] + timeout / 2);
    }
  }
  const bool opened = b.cv.wait_until(lock, deadline, [&] { return b.generation != generation; });
  std::vector<bool> came = b.seen;
  // Withdraw, so this call does not count as an arrival in the next one.
  if (!opened && --b.arrived == 0) b.seen.assign(num_devices_, false);
  lock.unlock();
  Devices().Left(group_, rank);
  if (opened) return xla::ffi::Error::Success();
  const auto waited =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::max(deadline, start) - start);
  if (waited < timeout) {  // name the gone peers that kept others from waiting longer
    for (int r = 0; r < num_devices_; ++r) came[r] = came[r] || !gone[r];
    return BarrierTimeout(rank, phase, waited, came,
                          " They have reached no barrier since an earlier call of this site "
                          "waited " + std::to_string(timeout.count()) + " ms for them.");
  }
  // A peer that showed no sign of life at any barrier while this device waited is gone.
  std::lock_guard<std::mutex> gone_lock(gone_mu_);
  for (int r = 0; r < num_devices_; ++r)
    if (!came[r] && !Devices().HeardSince(group_, r, start)) gone_since_[r] = Clock::now();
  return BarrierTimeout(rank, phase, waited, came);
}

xla::ffi::Error BarrierTimeout(int rank, Phase phase, std::chrono::milliseconds waited,
                               const std::vector<bool>& arrived, const std::string& why) {
  static constexpr const char* kPhaseNames[] = {"publish", "compute", "release"};
  const int n = static_cast<int>(arrived.size());
  std::ostringstream msg;
  msg << "jax_ccfuser: device " << rank << " of " << n << " waited " << waited.count()
      << " ms at the " << kPhaseNames[static_cast<int>(phase)]
      << " barrier; these peers never arrived:";
  for (int r = 0; r < n; ++r)
    if (!arrived[r]) msg << ' ' << r;
  msg << ". Every device of the expert-parallel axis must make the same fused_moe calls "
         "(raise the limit with jax_ccfuser.peer_timeout(seconds) if peers are merely slow)."
      << why;
  return xla::ffi::Error(xla::ffi::ErrorCode::kDeadlineExceeded, msg.str());
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
