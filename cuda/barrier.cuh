// The device barrier between the GPUs of an expert-parallel group: what one thread of its block
// does, over the memory operations it needs (`Memory`). signal.cu runs it as a kernel with
// system-scope loads and stores; tests/barrier_protocol.cu runs the same steps on the host, a
// thread per member's thread, where a peer can be made late, dead or out of step at will.
//
// Each member of a call site owns kMaxPeers uint64 flags for the site, one per writer rank. The
// value a device writes into a peer's flag is the number of barriers passed at the site; it only
// rises, so a flag left by an earlier barrier can never satisfy a later one, and a fast peer that
// already moved on has only raised it by one. The host never waits: the kernel spins (acquire)
// on the device.
//
// Peers in other processes (CUDA IPC workspaces) have no host-side count to share, so the count
// of barriers passed at the site lives in each member's region beside its flags, raised by this
// kernel: the regions start zeroed and every member passes the same barriers at a site.
//
// `Memory` provides: load_acquire and store_release of a flag and a system-wide fence (the
// flags are written across devices), aborted / set_aborted of DeviceError::aborted, record (a
// fault with its member and values, the first one wins), now_ns and pause (the timeout's clock
// and the spin's back-off), sync_block (every thread of the block) and sync_members (threads
// [0, num_members)).
#pragma once

#include <cstdint>

#include "cuda/api.cuh"

namespace ccf::cuda {

// Gives the call up: the later kernels of this device leave peer memory alone (they read
// `aborted`), and every member's next barrier with this device fails instead of passing.
template <class Memory>
__device__ __forceinline__ void abort_group(const BarrierParams& p, Memory& memory) {
  memory.set_aborted(p.error);
  memory.fence();
  for (int32_t m = 0; m < p.num_members; ++m) memory.store_release(p.signals[m] + p.rank, kAbortFlag);
}

// Thread `i` of the barrier's block (kMaxPeers threads): thread i signals member i and waits for
// member i's signal. `stop` is the block's shared flag.
template <class Memory>
__device__ __forceinline__ void barrier_thread(const BarrierParams& p, int32_t i, bool* stop,
                                               Memory& memory) {
  if (i == 0) {
    // This call (or an earlier one) gave up: flags are per site, so this site's members learn
    // it here, at once, rather than after a timeout.
    *stop = memory.aborted(p.error);
    if (*stop) abort_group(p, memory);
    if (!*stop && p.rank_value != nullptr) {
      if (*p.rank_value != p.rank) {
        memory.record(p.error, kRankMismatch, p.rank, *p.rank_value, p.rank);
        *stop = true;
      } else if (*p.group_value != p.expected_group) {
        memory.record(p.error, kRankMismatch, p.rank, *p.group_value, p.expected_group);
        *stop = true;
      }
      if (*stop) abort_group(p, memory);
    }
    if (!*stop && p.signatures[p.rank] != nullptr) *p.signatures[p.rank] = p.signature;
  }
  // Every thread reads the count and whether the start barrier signalled before thread 0
  // raises or rewrites them.
  const uint64_t epoch = p.passed != nullptr ? *p.passed + 1 : p.epoch;
  const bool signalled = p.error->signalled != 0;
  memory.sync_block();
  if (i == 0) p.error->signalled = !p.end && !*stop;
  // Given up at the end of a call whose start this device signalled: members may have passed
  // the start and be writing into its buffers, so it still waits for them below. Any other
  // barrier given up returns at once (members cannot have passed a start it never signalled,
  // and each call queued behind a dead member would otherwise wait out the timeout).
  const bool draining = *stop && p.end && signalled;
  if (*stop && !draining) return;
  if (i >= p.num_members) return;
  if (!draining) {
    if (i == 0 && p.passed != nullptr) *p.passed = epoch;
    // Everything this device wrote before (earlier kernels on the stream, peer memory
    // included, and its signature) becomes visible system-wide before the flag does.
    memory.fence();
    memory.store_release(p.signals[i] + p.rank, epoch);
    // Every epoch is stored before any thread may store kAbortFlag over them (abort_group), so
    // an abort is never overwritten by an epoch.
    memory.sync_members(p.num_members);
  }

  const uint64_t* flag = p.signals[p.rank] + i;
  const uint64_t start = memory.now_ns();
  uint64_t seen;
  while ((seen = memory.load_acquire(flag)) < epoch) {
    if (draining && seen + 1 < epoch) return;  // member i never signalled the start
    // Another member's wait failed. At the start of a call no peer is past this barrier, so
    // none touches this device's buffers; at its end member i may still be writing into them
    // until it signals (an abort's kAbortFlag included), so the wait goes on.
    if (!p.end && memory.aborted(p.error)) return;
    if (memory.now_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
      if (!draining) {
        memory.record(p.error, kBarrierTimeout, i, static_cast<int64_t>(seen),
                      static_cast<int64_t>(epoch));
        abort_group(p, memory);
      }
      return;
    }
    memory.pause();
  }
  if (draining) return;
  if (seen > epoch + 1) {  // kAbortFlag included
    memory.record(p.error, kOutOfStep, i, static_cast<int64_t>(seen), static_cast<int64_t>(epoch));
    abort_group(p, memory);
    return;
  }
  if (p.signatures[i] != nullptr) {
    const uint64_t theirs = *static_cast<const volatile uint64_t*>(p.signatures[i]);
    if (theirs != p.signature) {
      memory.record(p.error, kShapeMismatch, i, static_cast<int64_t>(theirs),
                    static_cast<int64_t>(p.signature));
      abort_group(p, memory);
    }
  }
}

}  // namespace ccf::cuda
