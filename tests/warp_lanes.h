// Device code run as host code: a warp's 32 lanes as fibers (ucontext) on one thread, each until
// it waits at a warp collective, which completes once all 32 wait at it, so shuffles and ballots
// exchange values as on the GPU; a collective that not every lane reaches (a divergent full-mask
// collective) parts the lanes, which run_warp reports. Include it before the device code's
// header: it defines the warp intrinsics, threadIdx, blockIdx and gridDim as the running lane's,
// and __launch_bounds__ (the toolkit's headers define it for nvcc alone). Used by
// tests/slot_sums.cu and tests/row_passes.cu, host programs that
// tests/test_device_code_on_host.py builds.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include <cuda_runtime.h>

// The fibers of one warp at a time, and the scheduler that ends each round of collectives.
namespace lanes {

inline uint3 thread, block;  // the running lane's threadIdx and blockIdx
// gridDim: whoever launches a grid whose kernel reads it sets it (tests/slot_sums.cu's read none)
inline dim3 grid;

enum Op { kBallot, kShuffle, kSync };

struct Lane {
  ucontext_t context;
  std::vector<char> stack = std::vector<char>(256 * 1024);
  bool done;
  Op op;           // the collective it waits at
  uint64_t value;  // its operand there, then its result
  int source;      // a shuffle's lane to read
};

inline ucontext_t scheduler;
inline Lane lane[32];
inline int warp_index, current;
inline const std::function<void()>* kernel;
inline bool started = false;

// Hands the thread from `from` to the next lane after `after` still running, or after the last
// one to the scheduler: lane to lane, a switch a lane (swapcontext is most of the run time).
inline void pass(ucontext_t* from, int after) {
  int next = after + 1;
  while (next < 32 && lane[next].done) ++next;
  if (next == 32) {
    swapcontext(from, &scheduler);
    return;
  }
  current = next;
  thread = make_uint3(warp_index * 32 + next, 0, 0);
  swapcontext(from, &lane[next].context);
}

// A lane runs the kernel for one warp after another.
inline void lane_main(int l) {
  for (;;) {
    (*kernel)();
    lane[l].done = true;
    pass(&lane[l].context, l);
  }
}

// At the first warp, and after lanes parted at a collective (they stay where they stood).
inline void start_lanes() {
  for (int l = 0; l < 32; ++l) {
    getcontext(&lane[l].context);
    lane[l].context.uc_stack.ss_sp = lane[l].stack.data();
    lane[l].context.uc_stack.ss_size = lane[l].stack.size();
    makecontext(&lane[l].context, reinterpret_cast<void (*)()>(lane_main), 1, l);
  }
  started = true;
}

inline uint64_t collective(Op op, uint64_t value, int source = 0) {
  Lane& me = lane[current];
  me.op = op;
  me.value = value;
  me.source = source;
  pass(&me.context, current);
  return me.value;
}

// Runs warp `warp` of block `b` to its end; false if its lanes part at a collective.
inline bool run_warp(uint3 b, int warp, const std::function<void()>& k) {
  if (!started) start_lanes();
  kernel = &k;
  block = b;
  warp_index = warp;
  for (Lane& l : lane) l.done = false;
  for (;;) {
    pass(&scheduler, -1);  // a round: every lane on to its next collective, or its end
    int done = 0;
    for (const Lane& l : lane) done += l.done;
    if (done == 32) return true;
    for (const Lane& l : lane)
      if (l.done || l.op != lane[0].op) {
        start_lanes();
        return false;
      }
    uint64_t values[32], ballot = 0;
    for (int l = 0; l < 32; ++l) {
      values[l] = lane[l].value;
      ballot |= uint64_t{values[l] != 0} << l;
    }
    for (Lane& l : lane) l.value = l.op == kBallot ? ballot : values[l.source % 32];
  }
}

}  // namespace lanes

// The warp intrinsics the headers use, all with the full mask, on the fibers above.
inline unsigned __ballot_sync(unsigned, int predicate) {
  return static_cast<unsigned>(lanes::collective(lanes::kBallot, predicate != 0));
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
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
  return __shfl_sync(mask, value, lanes::current ^ lane_mask);
}
inline void __syncwarp(unsigned = 0xffffffffu) { lanes::collective(lanes::kSync, 0); }
inline int __popc(unsigned bits) { return __builtin_popcount(bits); }
// One thread runs every device here: its stores are seen in order.
inline void __threadfence_system() {}

#define threadIdx lanes::thread
#define blockIdx lanes::block
#define gridDim lanes::grid
#define __launch_bounds__(threads)  // which the toolkit's headers define for nvcc alone
