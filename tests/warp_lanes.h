// Device code run as host code: a block's threads (or one warp's 32 lanes) as fibers (ucontext)
// on one thread, each until it waits at a collective. A warp collective completes once all 32
// lanes of its warp wait at it, so shuffles, ballots and matches exchange values as on the GPU;
// __syncthreads completes once every thread of the block still running waits at it. A collective
// that not every lane of the warp reaches (a divergent full-mask collective), or a barrier that
// threads waiting at a warp collective keep from completing, parts the threads, which run_warp
// and run_block report. Include it before the device code's header: it defines the warp
// intrinsics, __syncthreads, threadIdx, blockIdx and gridDim as the running thread's, and
// __launch_bounds__ (the toolkit's headers define it for nvcc alone). Used by tests/slot_sums.cu,
// tests/row_passes.cu, tests/work_list.cu and tests/fetch_rows.cu, host programs that
// tests/test_device_code_on_host.py builds.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include <cuda_runtime.h>

// The fibers of one block at a time, and the scheduler that ends each round of collectives.
namespace lanes {

inline uint3 thread, block;  // the running thread's threadIdx and blockIdx
// gridDim: whoever launches a grid whose kernel reads it sets it (tests/slot_sums.cu's read none)
inline dim3 grid;

enum Op { kBallot, kShuffle, kSync, kMatch, kBlockSync };

constexpr int kMaxThreads = 1024;

struct Lane {
  ucontext_t context;
  std::vector<char> stack;
  bool done, waiting;
  Op op;           // the collective it waits at
  uint64_t value;  // its operand there, then its result
  int source;      // a shuffle's lane to read
};

inline ucontext_t scheduler;
inline Lane lane[kMaxThreads];  // not moved once made: a context holds pointers into itself
inline int first_thread, threads, current, started = 0;
inline const std::function<void()>* kernel;

// Hands the thread from `from` to the next one after `after` that neither ended nor waits, or
// after the last one to the scheduler: fiber to fiber, a switch a thread (swapcontext is most of
// the run time).
inline void pass(ucontext_t* from, int after) {
  int next = after + 1;
  while (next < threads && (lane[next].done || lane[next].waiting)) ++next;
  if (next == threads) {
    swapcontext(from, &scheduler);
    return;
  }
  current = next;
  thread = make_uint3(first_thread + next, 0, 0);
  swapcontext(from, &lane[next].context);
}

// A fiber runs the kernel for one block (or warp) after another.
inline void lane_main(int l) {
  for (;;) {
    (*kernel)();
    lane[l].done = true;
    pass(&lane[l].context, l);
  }
}

// The first `n` fibers from their start: at the first run that needs them, and after threads
// parted at a collective (they stay where they stood).
inline void start_lanes(int n) {
  for (int l = 0; l < n; ++l) {
    lane[l].stack.resize(256 * 1024);
    getcontext(&lane[l].context);
    lane[l].context.uc_stack.ss_sp = lane[l].stack.data();
    lane[l].context.uc_stack.ss_size = lane[l].stack.size();
    makecontext(&lane[l].context, reinterpret_cast<void (*)()>(lane_main), 1, l);
  }
  started = n;
}

inline uint64_t collective(Op op, uint64_t value, int source = 0) {
  Lane& me = lane[current];
  me.op = op;
  me.value = value;
  me.source = source;
  me.waiting = true;
  pass(&me.context, current);
  return me.value;
}

// Completes the collective warp `w`'s lanes wait at; false if they do not all wait at one.
inline bool complete_warp(int w) {
  Lane* warp = lane + 32 * w;
  for (int l = 0; l < 32; ++l)
    if (warp[l].done || !warp[l].waiting || warp[l].op != warp[0].op) return false;
  uint64_t values[32], ballot = 0;
  for (int l = 0; l < 32; ++l) {
    values[l] = warp[l].value;
    ballot |= uint64_t{values[l] != 0} << l;
  }
  for (int l = 0; l < 32; ++l) {
    Lane& me = warp[l];
    if (me.op == kBallot) {
      me.value = ballot;
    } else if (me.op == kMatch) {
      me.value = 0;
      for (int j = 0; j < 32; ++j) me.value |= uint64_t{values[j] == values[l]} << j;
    } else if (me.op == kShuffle) {
      me.value = values[me.source % 32];
    }
    me.waiting = false;
  }
  return true;
}

// Runs threads [first, first + n) of block `b` (whole warps) to their end; false if they part.
inline bool run_threads(uint3 b, int first, int n, const std::function<void()>& k) {
  if (started < n) start_lanes(n);
  kernel = &k;
  block = b;
  first_thread = first;
  threads = n;
  for (int l = 0; l < n; ++l) lane[l].done = lane[l].waiting = false;
  for (;;) {
    pass(&scheduler, -1);  // a round: every thread on to its next collective, or its end
    const auto ended = [](const Lane& l) { return l.done; };
    if (std::all_of(lane, lane + n, ended)) return true;
    bool at_warp_ops = false, parted = false;
    for (int w = 0; w < n / 32; ++w) {
      const Lane* warp = lane + 32 * w;
      if (std::none_of(warp, warp + 32, [](const Lane& l) {
            return !l.done && l.waiting && l.op != kBlockSync;
          }))
        continue;
      at_warp_ops = true;
      parted |= !complete_warp(w);
    }
    if (parted) {
      start_lanes(started);
      return false;
    }
    // Only barriers are waited at: every running thread of the block is at __syncthreads.
    if (!at_warp_ops)
      for (int l = 0; l < n; ++l) lane[l].waiting = false;
  }
}

// Runs warp `warp` of block `b` alone to its end (kernels whose warps never wait on each other).
inline bool run_warp(uint3 b, int warp, const std::function<void()>& k) {
  return run_threads(b, warp * 32, 32, k);
}

// Runs the `n` threads of block `b` to their end, barriers included.
inline bool run_block(uint3 b, int n, const std::function<void()>& k) {
  return run_threads(b, 0, n, k);
}

}  // namespace lanes

// The warp intrinsics the headers use, all with the full mask, on the fibers above.
inline unsigned __ballot_sync(unsigned, int predicate) {
  return static_cast<unsigned>(lanes::collective(lanes::kBallot, predicate != 0));
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
// The lanes whose value equals this lane's (work_list.cuh's per-expert counts and ranks).
inline unsigned __match_any_sync(unsigned, int value) {
  return static_cast<unsigned>(lanes::collective(lanes::kMatch, static_cast<uint32_t>(value)));
}
template <class V>
V __shfl_sync(unsigned, V value, int source) {
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  bits = lanes::collective(lanes::kShuffle, bits, source);
  std::memcpy(&value, &bits, sizeof(V));
  return value;
}
// pair_rows.cuh's warp_sum: each lane reads lane ^ lane_mask.
template <class V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
  return __shfl_sync(mask, value, (lanes::current % 32) ^ lane_mask);
}
inline void __syncwarp(unsigned = 0xffffffffu) { lanes::collective(lanes::kSync, 0); }
inline void __syncthreads() { lanes::collective(lanes::kBlockSync, 0); }
inline int __popc(unsigned bits) { return __builtin_popcount(bits); }
inline int __ffs(unsigned bits) { return __builtin_ffs(static_cast<int>(bits)); }
// One thread runs every device here: its stores are seen in order.
inline void __threadfence_system() {}

#define threadIdx lanes::thread
#define blockIdx lanes::block
#define gridDim lanes::grid
#define __launch_bounds__(threads)  // which the toolkit's headers define for nvcc alone
