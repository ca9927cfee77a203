#include "xla_ffi/cpu/shared_group.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <ctime>

namespace ccf {

namespace {
// Not FUTEX_PRIVATE: the word lives in memory shared with other processes.
void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, std::chrono::nanoseconds wait) {
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(wait);
  timespec ts{static_cast<time_t>(seconds.count()),
              static_cast<long>((wait - seconds).count())};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void FutexWakeAll(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}
}  // namespace

SharedGroup::SharedGroup(int32_t group, std::vector<RegionHeader*> headers)
    : group_(group), headers_(std::move(headers)) {
  for (RegionHeader* h : headers_) liveness_.push_back(LivenessAt(h));
}

void SharedGroup::Heard(int rank, Clock::time_point when) {
  liveness_[rank]->heard_ns.store(when.time_since_epoch().count(), std::memory_order_relaxed);
}

bool SharedGroup::HeardSince(int rank, Clock::time_point since) {
  return liveness_[rank]->heard_ns.load(std::memory_order_relaxed) >=
         since.time_since_epoch().count();
}

Clock::time_point SharedGroup::GoneSince(int rank) {
  const int64_t ns = headers_[rank]->gone_since_ns.load(std::memory_order_relaxed);
  return ns == 0 ? Clock::time_point::max() : Clock::time_point(Clock::duration(ns));
}

void SharedGroup::SetGoneSince(int rank, Clock::time_point when) {
  headers_[rank]->gone_since_ns.store(when.time_since_epoch().count(),
                                      std::memory_order_relaxed);
}

int64_t SharedGroup::Exited(int rank) { return ExitedProcess(*liveness_[rank]); }

int SharedGroup::GaveUpMidway() const {
  for (size_t r = 0; r < headers_.size(); ++r)
    if (headers_[r]->gave_up_midway.load(std::memory_order_acquire)) return static_cast<int>(r);
  return -1;
}

xla::ffi::Error SharedGroup::Broken(int rank, int gave_up) const {
  return xla::ffi::Error(
      xla::ffi::ErrorCode::kFailedPrecondition,
      "jax_ccfuser: device " + std::to_string(rank) + " of " + std::to_string(headers_.size()) +
          " in group " + std::to_string(group_) + ": device " + std::to_string(gave_up) +
          " gave up waiting for its peers in the middle of an earlier call of this site, whose "
          "slow or stopped peer may still write into its shared region; so every call of the "
          "site fails from then on. Restart the job (a longer jax_ccfuser.peer_timeout keeps a "
          "merely slow peer from tripping it).");
}

xla::ffi::Error SharedGroup::Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) {
  Heard(rank, Clock::now());
  const bool publish = phase == Phase::kPublished;
  if (int gave_up = publish ? GaveUpMidway() : -1; gave_up >= 0) return Broken(rank, gave_up);
  const int p = static_cast<int>(phase);
  const uint32_t n = static_cast<uint32_t>(headers_.size());
  RegionHeader::Barrier& b = headers_[0]->barriers[p];
  uint64_t s = b.state.load(std::memory_order_acquire);
  uint32_t generation;
  for (;;) {
    generation = static_cast<uint32_t>(s >> 32);
    const bool last = static_cast<uint32_t>(s) + 1 == n;
    const uint64_t next = last ? static_cast<uint64_t>(generation + 1) << 32 : s + 1;
    if (b.state.compare_exchange_weak(s, next, std::memory_order_acq_rel)) {
      if (!last) break;
      b.generation.store(generation + 1, std::memory_order_release);
      FutexWakeAll(&b.generation);
      return xla::ffi::Error::Success();
    }
  }
  headers_[rank]->arrived_for[p].store(generation + 1, std::memory_order_relaxed);
  // The ranks that reached this barrier in the generation it is in.
  const auto came = [&] {
    std::vector<bool> arrived(n);
    for (uint32_t r = 0; r < n; ++r)
      arrived[r] = headers_[r]->arrived_for[p].load(std::memory_order_relaxed) == generation + 1;
    return arrived;
  };
  BarrierWait wait(*this, group_, static_cast<int>(n), timeout);
  // A device waiting here shows it is alive by refreshing its time (`Heard`) at every step of
  // the wait rather than by a flag: a process that dies while waiting then falls silent, as one
  // that never came.
  int gave_up = -1;
  for (;;) {
    // The time is read before the barrier is seen still closed, so no word of this device is
    // dated after the barrier opened: its peers leave it then and may wait at the next one
    // before this thread runs again, and must not take a late word for a sign of life after
    // their wait began (a device that then falls silent is gone).
    const Clock::time_point now = Clock::now();
    if (b.generation.load(std::memory_order_acquire) != generation) break;
    Heard(rank, now);
    if (publish && (gave_up = GaveUpMidway()) >= 0) break;
    const auto left = wait.deadline() - now;
    if (left <= std::chrono::nanoseconds(0)) break;
    // Woken by the last arrival; the cap also bounds a wake-up lost to a dying peer.
    FutexWait(&b.generation, generation, std::min<std::chrono::nanoseconds>(left, wait.step()));
  }
  // Withdraw unless the barrier opened meanwhile, so this call is no arrival in the next one.
  s = b.state.load(std::memory_order_acquire);
  for (;;) {
    if (static_cast<uint32_t>(s >> 32) != generation) return xla::ffi::Error::Success();
    if (b.state.compare_exchange_weak(s, s - 1, std::memory_order_acq_rel)) break;
  }
  if (gave_up >= 0) return Broken(rank, gave_up);
  // Unlike a process's own devices, a peer process may be gone without a trace (in another PID
  // namespace) or stopped: past the publish barrier the wait still ends, and the site with it.
  if (!publish) headers_[rank]->gave_up_midway.store(1, std::memory_order_release);
  return wait.Failed(rank, phase, came());
}

void SharedGroup::ReportFailure(const std::string& msg) {
  RegionHeader& h = *headers_[0];
  // The compute barrier this call is about to meet at opens as generation `at`.
  const uint32_t at =
      headers_[0]->barriers[static_cast<int>(Phase::kComputed)].generation.load(
          std::memory_order_acquire) + 1;
  uint32_t seen = h.failed_at.load(std::memory_order_acquire);
  while (seen != at)
    if (h.failed_at.compare_exchange_weak(seen, at, std::memory_order_acq_rel)) {
      // The first to report writes the message; the barrier publishes it.
      const size_t len = std::min(msg.size(), sizeof(h.failure) - 1);
      std::memcpy(h.failure, msg.data(), len);
      h.failure[len] = '\0';
      return;
    }
}

std::string SharedGroup::Failure() {
  const RegionHeader& h = *headers_[0];
  const uint32_t opened =
      h.barriers[static_cast<int>(Phase::kComputed)].generation.load(std::memory_order_acquire);
  if (h.failed_at.load(std::memory_order_acquire) != opened) return {};
  return std::string(h.failure);
}

}  // namespace ccf
