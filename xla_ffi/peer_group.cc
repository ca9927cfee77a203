#include "xla_ffi/peer_group.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <sstream>
#include <utility>

namespace ccf {

namespace {

// When each device of a group (group index, rank) last came to or left a barrier of any call
// site, and whether it waits at one now: a device that does either is alive. A device leaves an
// opened barrier at the time it opened, whenever its thread gets to say so: its peers leave that
// barrier too and may wait at the next one before then, and must not take the late word for a
// sign of life after their wait began (a device that then falls silent is gone).
class Liveness {
 public:
  void Arrived(int32_t group, int rank) { Set(group, rank, Clock::now(), /*waiting=*/true); }
  void Left(int32_t group, int rank, Clock::time_point when) {
    Set(group, rank, when, /*waiting=*/false);
  }

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

  void Set(int32_t group, int rank, Clock::time_point when, bool waiting) {
    std::lock_guard<std::mutex> lock(mu_);
    devices_[{group, rank}] = {when, waiting};
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

bool PeerGroup::HeardSince(int rank, Clock::time_point since) {
  return Devices().HeardSince(group_, rank, since);
}

Clock::time_point PeerGroup::GoneSince(int rank) {
  std::lock_guard<std::mutex> lock(gone_mu_);
  return gone_since_[rank];
}

void PeerGroup::SetGoneSince(int rank, Clock::time_point when) {
  std::lock_guard<std::mutex> lock(gone_mu_);
  gone_since_[rank] = when;
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
    b.opened_at = Clock::now();
    const Clock::time_point opened_at = b.opened_at;
    b.cv.notify_all();
    lock.unlock();
    Devices().Left(group_, rank, opened_at);
    return xla::ffi::Error::Success();
  }
  BarrierWait wait(*this, group_, num_devices_, timeout);
  // Past the publish barrier every device of this process is computing the same call and comes,
  // however long it takes, while its peers' reads and writes of this device's buffers last: a
  // device that stopped waiting would let XLA free buffers they still write (no timeout there).
  const bool published = phase != Phase::kPublished;
  // In steps, so that a gone peer heard meanwhile extends the wait (BarrierWait::deadline).
  bool opened;
  for (;;) {
    opened = b.generation != generation;
    const Clock::time_point now = Clock::now(), end = wait.deadline();
    if (opened || (now >= end && !published)) break;
    b.cv.wait_until(lock, published ? now + wait.step()
                                    : std::min<Clock::time_point>(end, now + wait.step()));
  }
  std::vector<bool> came = b.seen;
  // Withdraw, so this call does not count as an arrival in the next one.
  if (!opened && --b.arrived == 0) b.seen.assign(num_devices_, false);
  // No peer leaves before the barrier opens again with this device: opened_at is this one's.
  const Clock::time_point left_at = opened ? b.opened_at : Clock::now();
  lock.unlock();
  Devices().Left(group_, rank, left_at);
  if (opened) return xla::ffi::Error::Success();
  return wait.Failed(rank, phase, std::move(came));
}

namespace {

constexpr const char* kSameCalls =
    " Every device of the expert-parallel axis must make the same fused_moe calls (raise the "
    "limit with jax_ccfuser.peer_timeout(seconds) if peers are merely slow).";

// How an error of a wait at a barrier of `members` begins.
std::string Waited(int32_t group, int rank, int members, Phase phase,
                   std::chrono::milliseconds waited) {
  static constexpr const char* kPhaseNames[] = {"publish", "compute", "release"};
  return "jax_ccfuser: device " + std::to_string(rank) + " of " + std::to_string(members) +
         " in group " + std::to_string(group) + " waited " + std::to_string(waited.count()) +
         " ms at the " + kPhaseNames[static_cast<int>(phase)] + " barrier";
}

// The error of a barrier that did not open after waiting `waited`; `arrived[r]` says whether rank
// r came, `why` ends the message.
xla::ffi::Error BarrierTimeout(int32_t group, int rank, Phase phase,
                               std::chrono::milliseconds waited, const std::vector<bool>& arrived,
                               const std::string& why = kSameCalls) {
  const int n = static_cast<int>(arrived.size());
  std::ostringstream msg;
  msg << Waited(group, rank, n, phase, waited) << "; these peers never arrived:";
  for (int r = 0; r < n; ++r)
    if (!arrived[r]) msg << ' ' << r;
  msg << '.' << why;
  return xla::ffi::Error(xla::ffi::ErrorCode::kDeadlineExceeded, msg.str());
}

}  // namespace

BarrierWait::BarrierWait(Silence& silence, int32_t group, int members,
                         std::chrono::milliseconds timeout)
    : silence_(silence),
      group_(group),
      timeout_(timeout),
      start_(Clock::now()),
      deadline_(start_ + timeout),
      gone_(members, false),
      gone_since_(members),
      exited_(members, 0) {
  // A peer that came to this barrier and gave up waiting may be gone too: only a sign of life
  // since it was found gone (waiting here now is one) keeps it from being so.
  for (size_t r = 0; r < gone_.size(); ++r) {
    gone_since_[r] = silence.GoneSince(static_cast<int>(r));
    gone_[r] = gone_since_[r] != Clock::time_point::max();
  }
  deadline();
}

std::chrono::nanoseconds BarrierWait::step() const {
  return std::min<std::chrono::nanoseconds>(std::chrono::milliseconds(100), timeout_ / 4);
}

Clock::time_point BarrierWait::deadline() {
  const Clock::time_point now = Clock::now();
  deadline_ = start_ + timeout_;
  for (size_t r = 0; r < gone_.size(); ++r) {
    const int peer = static_cast<int>(r);
    if (gone_[r] && silence_.HeardSince(peer, gone_since_[r])) gone_[r] = false;
    if (gone_[r]) deadline_ = std::min(deadline_, gone_since_[r] + timeout_ / 2);
    // Asked of a peer silent for a step of this wait, or at once of one an earlier wait found
    // gone: a barrier that opens at once has no time to read /proc.
    if (!exited_[r] && (gone_[r] || now - start_ >= step()) &&
        !silence_.HeardSince(peer, start_)) {
      exited_[r] = silence_.Exited(peer);
      if (exited_[r]) exit_found_ = std::min(exit_found_, now);
    }
  }
  deadline_ = std::min(deadline_, exit_found_);
  return deadline_;
}

xla::ffi::Error BarrierWait::Failed(int rank, Phase phase, std::vector<bool> came) {
  const auto waited =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::max(deadline_, start_) - start_);
  // Some may have come to this barrier before their process ended: not "never arrived".
  std::string ranks;
  std::vector<int64_t> pids;
  for (size_t r = 0; r < exited_.size(); ++r) {
    if (!exited_[r]) continue;
    silence_.SetGoneSince(static_cast<int>(r), Clock::now());
    ranks += " " + std::to_string(r);
    if (std::find(pids.begin(), pids.end(), exited_[r]) == pids.end()) pids.push_back(exited_[r]);
  }
  if (!pids.empty()) {
    const bool one = pids.size() == 1;
    std::string msg = Waited(group_, rank, static_cast<int>(exited_.size()), phase, waited) +
                      " for devices" + ranks +
                      (one ? ", whose process (pid " : ", whose processes (pids ");
    for (size_t i = 0; i < pids.size(); ++i) msg += (i ? ", " : "") + std::to_string(pids[i]);
    msg += one ? ") has exited: its own output says why."
               : ") have exited: their own output says why.";
    return xla::ffi::Error(xla::ffi::ErrorCode::kUnavailable, msg);
  }
  if (waited < timeout_) {
    std::vector<bool> here(gone_.size());
    for (size_t r = 0; r < gone_.size(); ++r) here[r] = !gone_[r];
    return BarrierTimeout(group_, rank, phase, waited, here,
                          std::string(kSameCalls) +
                              " They have reached no barrier since an earlier call of this site "
                              "waited " + std::to_string(timeout_.count()) + " ms for them.");
  }
  // Silent throughout, whether it never came or came before this wait and gave up: gone. One
  // that came and gave up waiting during it is not named.
  for (size_t r = 0; r < came.size(); ++r)
    if (!silence_.HeardSince(static_cast<int>(r), start_)) {
      silence_.SetGoneSince(static_cast<int>(r), Clock::now());
      came[r] = false;
    }
  return BarrierTimeout(group_, rank, phase, waited, came);
}

namespace {
std::mutex registry_mu;
std::map<std::pair<uint64_t, int32_t>, std::shared_ptr<PeerGroup>>& Registry() {
  static auto* registry = new std::map<std::pair<uint64_t, int32_t>, std::shared_ptr<PeerGroup>>;
  return *registry;
}
}  // namespace

xla::ffi::Error FindPeerGroup(uint64_t site, int32_t group, int num_devices,
                              std::shared_ptr<PeerGroup>* found) {
  // Held only for the lookup: never while waiting at a barrier.
  std::lock_guard<std::mutex> lock(registry_mu);
  std::shared_ptr<PeerGroup>& slot = Registry()[{site, group}];
  if (!slot) slot = std::make_shared<PeerGroup>(group, num_devices);
  if (slot->num_devices() != num_devices)
    return xla::ffi::Error::InvalidArgument(
        "jax_ccfuser: call site " + std::to_string(site) + " is already in use by a group of " +
        std::to_string(slot->num_devices()) + " devices; this call has " +
        std::to_string(num_devices) + ". A function from jax.export keeps the call-site "
        "numbers of the process that traced it: run it where fused_moe traces no call of another "
        "group size");
  *found = slot;
  return xla::ffi::Error::Success();
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
