// The peer-buffer registry and barrier protocol shared by every handler of one process.
//
// The devices of one expert-parallel group run one call site's handler concurrently, each on
// its own thread, in no fixed order. Each publishes the addresses of its buffers in the
// `PeerGroup` of (call site, group), then meets the others at a barrier; after it, every device
// reads its peers' buffers directly. A barrier has a timeout, so a peer that never arrives gives
// an error instead of a hang, and a device that gives up withdraws its arrival, so the next call
// starts clean.
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ccf {

// Weight gradients a device computed for experts it helped with (defined by the handlers).
struct HelpedGradients;

// The addresses one device publishes for one call. Peers only read through them after the
// publish barrier and stop before the barrier that ends the call.
struct PeerBuffers {
  const void* x = nullptr;        // [T, H]
  const int32_t* ids = nullptr;   // [T, K]
  const void* weights = nullptr;  // [T, K]
  const void* w_in = nullptr;     // [E_local, H, G*F]
  const void* w_out = nullptr;    // [E_local, F, H]
  const void* dy = nullptr;       // [T, H], backward only
  float* staging = nullptr;       // [T, S, H]: peers accumulate this device's partial sums here
  void* d_weights = nullptr;      // [T, K], backward only: peers write d expert_weights here
  const HelpedGradients* helped = nullptr;  // backward only: owners read them after compute
  // Backward with helpers: float32 partial weight gradients, where the helper in plan slot s of
  // local expert e writes its own, for a plan of S helpers: [E_local, S, H*G*F + F*H] from peers
  // in other processes of the CPU path, [E_local, S + 1, ...] on GPU (slot 0, the owner's,
  // included).
  float* partials = nullptr;
  // (T, H, K, F, E_local, E, dtype codes, activation): every peer must agree, checked after
  // the barrier.
  std::array<int64_t, 9> signature{};
  // CUDA: the GPU the device runs on, and its barrier flags for the call site, [kMaxPeers]
  // written by each rank (cuda_device.h's SitePlace).
  int32_t gpu = -1;
  uint64_t* signals = nullptr;
};

// The phases of one call at which all peers meet.
// kReleased (backward only) keeps helpers' weight-gradient partials alive until every owner has
// summed them.
enum class Phase : int { kPublished = 0, kComputed = 1, kReleased = 2, kNumPhases = 3 };

// Where the devices of one call meet: in this process (`PeerGroup`) or in shared memory
// between the processes of a host (`SharedGroup`, shared_group.h).
class Rendezvous {
 public:
  virtual ~Rendezvous() = default;

  // Waits until all devices arrived at `phase`. On timeout the arrival is withdrawn and a
  // DEADLINE_EXCEEDED error names the missing ranks.
  virtual xla::ffi::Error Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) = 0;

  // A device whose call fails after publishing says so here, then still meets its peers at the
  // compute barrier, so they never touch its buffers after it returns; after that barrier every
  // device reads `Failure()` and returns the same error.
  virtual void ReportFailure(const std::string& msg) = 0;
  virtual std::string Failure() = 0;
};

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC: one clock for every process of a host

// What a rendezvous knows of its peers' signs of life, kept where every device of the group sees
// it: in this process (`PeerGroup`) or in shared memory (`SharedGroup`).
class Silence {
 public:
  virtual ~Silence() = default;

  // Whether `rank` came to or left a barrier of any call site at `since` or later, or waits at
  // one now.
  virtual bool HeardSince(int rank, Clock::time_point since) = 0;
  // When a timeout of this call site found `rank` gone; time_point::max() while none did.
  virtual Clock::time_point GoneSince(int rank) = 0;
  virtual void SetGoneSince(int rank, Clock::time_point when) = 0;
  // The id of `rank`'s process if that process has exited, else 0: it will never arrive. Devices
  // of one process only leave it together.
  virtual int64_t Exited(int rank) { return 0; }
};

// One device's wait at a barrier, by the rule both rendezvous share. A peer that never came and
// showed no sign of life at any barrier of any site while a device waited a whole timeout is
// gone: later calls of the site wait for it only until half a timeout after that while it stays
// silent, so the calls queued behind one that timed out all fail within about 1.5 timeouts in
// all (not a timeout each), and a peer that merely skipped a call has time to come back. A peer
// whose process has exited ends the wait once it is seen, a step into it at most.
class BarrierWait {
 public:
  // Starts now, for a barrier of `members` ranks of expert-parallel group `group` (its index over
  // the mesh's other axes, named in the error: on a 2-D mesh each group numbers its ranks alike).
  BarrierWait(Silence& silence, int32_t group, int members, std::chrono::milliseconds timeout);

  // When the wait ends: the timeout, or half a timeout after a gone peer was found gone while
  // it stays silent. A gone peer heard since (come back, or the caller's own sibling device
  // arriving a moment later) is waited for in full again, so poll this as the wait goes on.
  Clock::time_point deadline();

  // The longest a waiting device sleeps before it looks again (at `deadline`, and across
  // processes to show it is alive): a quarter of the timeout, at most 100 ms.
  std::chrono::nanoseconds step() const;

  // The error of a wait that ended with the barrier still closed, naming the missing ranks
  // (only the gone or exited ones when they cut the wait short): DEADLINE_EXCEEDED, or
  // UNAVAILABLE where a peer's process has exited. `came[r]` says whether rank r reached the
  // barrier. Records the peers silent throughout as gone.
  xla::ffi::Error Failed(int rank, Phase phase, std::vector<bool> came);

 private:
  Silence& silence_;
  const int32_t group_;
  const std::chrono::milliseconds timeout_;
  const Clock::time_point start_;
  Clock::time_point deadline_;
  std::vector<bool> gone_;  // the peers that cut the wait short
  std::vector<Clock::time_point> gone_since_;  // when each was found gone
  std::vector<int64_t> exited_;  // per rank: its process's id once found exited, else 0
  Clock::time_point exit_found_ = Clock::time_point::max();  // when the first was
};

class PeerGroup final : public Rendezvous, private Silence {
 public:
  PeerGroup(int32_t group, int num_devices);

  int num_devices() const { return num_devices_; }

  void Publish(int rank, const PeerBuffers& buffers) { peers_[rank] = buffers; }
  const PeerBuffers& peer(int rank) const { return peers_[rank]; }

  // The failure is cleared when the next call's publish barrier opens (by then every device has
  // read it).
  void ReportFailure(const std::string& msg) override;
  std::string Failure() override;

  // Waits up to `timeout`, less where a peer is gone (`BarrierWait`), at the publish barrier;
  // at the later ones, until every device comes: they all passed the publish barrier of this
  // call in this process, so they come, and their peers use their buffers until then.
  xla::ffi::Error Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) override;

 private:
  bool HeardSince(int rank, Clock::time_point since) override;
  Clock::time_point GoneSince(int rank) override;
  void SetGoneSince(int rank, Clock::time_point when) override;

  struct Barrier {
    std::mutex mu;
    std::condition_variable cv;
    uint64_t generation = 0;
    Clock::time_point opened_at;  // when the last generation opened
    int arrived = 0;  // waiting now
    // Devices that reached this barrier since it last opened, including ones that gave up
    // waiting: a timeout names the devices that never came, or that are silent since.
    std::vector<bool> seen;
  };

  const int32_t group_;
  const int num_devices_;
  std::vector<PeerBuffers> peers_;
  std::mutex failure_mu_;
  std::string failure_;  // guarded by failure_mu_
  std::array<Barrier, static_cast<int>(Phase::kNumPhases)> barriers_;
  std::mutex gone_mu_;
  // Per rank: when a timeout of this site found it gone; max() while it is not.
  std::vector<Clock::time_point> gone_since_;  // guarded by gone_mu_
};

// The group of (call site, group index) in `found`, created on first use; InvalidArgument,
// naming both sizes, where `num_devices` is not the group's.
xla::ffi::Error FindPeerGroup(uint64_t site, int32_t group, int num_devices,
                              std::shared_ptr<PeerGroup>* found);

// Number of live groups, for tests that check the registry does not grow.
int64_t PeerGroupCount();

// Fault injection for tests: the next call on device `rank` of a real group fails right after
// publishing its buffers, as a peer whose call goes wrong midway would.
void FailNextCallForTesting(int rank);
bool TakeInjectedFault(int rank);

}  // namespace ccf
