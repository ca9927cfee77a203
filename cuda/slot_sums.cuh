// The two halves of the combine: the expert side sends each source token one summed row per
// destination device (scatter_slots), the source side sums its slots (combine_slots); and, with
// a reassignment plan, the owners' sums of their experts' weight-gradient partials
// (sum_partials). combine.cu launches them.
//
// One warp per token; lanes stride over the hidden dimension, so every output element is summed
// by one thread in a fixed order.
// A header so that host code runs them as well: tests/slot_sums.cu, a warp's lanes as fibers,
// checks their sums bitwise over work lists it builds, however they run (in chunks or not, one
// or four columns a lane, an emulated group or real peers).
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/config.hpp>
#include <cutlass/numeric_types.h>

#include "cuda/api.cuh"
#include "cuda/numeric.cuh"
#include "cuda/slots.cuh"
#include "cuda/token_grid.cuh"

namespace ccf::cuda {

// kVector: floats a lane moves at a time (4 where H and every row and slot start allow 16-byte
// accesses, else 1); the sums are the same either way.
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads)
    scatter_slots(const __grid_constant__ ScatterParams p) {
  extern __shared__ int32_t s_order[];  // [kTokenWarps, K]
  const int32_t lane = threadIdx.x % 32;
  const int32_t g = warp_token();  // source * num_tokens + token
  const int32_t source = g / p.pairs.num_tokens;
  // One answer for the warp: a peer's abort may land while its lanes read the flag, and the
  // warp's collectives below need all 32 lanes.
  const bool gave_up = __any_sync(
      0xffffffffu, g < p.pairs.num_sources * p.pairs.num_tokens && p.flags != nullptr &&
                       *static_cast<const volatile uint64_t*>(p.flags + source) == kAbortFlag);
  if (g < p.pairs.num_sources * p.pairs.num_tokens && !gave_up) {
    const int32_t token = g - source * p.pairs.num_tokens;
    const int64_t first = static_cast<int64_t>(g) * p.pairs.top_k;  // the token's first pair
    const int64_t weight_row = static_cast<int64_t>(token) * p.pairs.top_k;
    const int32_t* codes = p.pairs.pair_code + first;  // [K] the token's pairs
    const int32_t* pair_rows = p.pairs.pair_row + first;
    // The token's pairs in the chunk by slot, and by scratch row within a slot: order[0, count).
    // Each slot's pairs are then one run of it, which the sums below walk without looking at
    // the other slots' pairs for every element (a token's K pairs spread over up to D slots).
    int32_t* order = s_order + (threadIdx.x / 32) * p.pairs.top_k;
    int32_t count = 0;
    for (int32_t k0 = 0; k0 < p.pairs.top_k; k0 += 32) {
      const int32_t k = k0 + lane;
      const bool in = k < p.pairs.top_k && in_chunk(p.pairs, first + k);
      if (in) {
        const int32_t slot = codes[k] % kMaxPeers;
        int32_t rank = 0;
        for (int32_t j = 0; j < p.pairs.top_k; ++j) {
          if (!in_chunk(p.pairs, first + j)) continue;
          const int32_t other = codes[j] % kMaxPeers;
          rank += other < slot || (other == slot && pair_rows[j] < pair_rows[k]);
        }
        order[rank] = k;
      }
      count += __popc(__ballot_sync(0xffffffffu, in));
    }
    __syncwarp();
    // Each slot these pairs use: the run order[n0, n1).
    for (int32_t n0 = 0, n1; n0 < count; n0 = n1) {
      const int32_t slot = codes[order[n0]] % kMaxPeers;
      for (n1 = n0 + 1; n1 < count && codes[order[n1]] % kMaxPeers == slot; ++n1) {
      }
      // The staging holds the sum of the slot's rows of earlier chunks, if it has any.
      bool earlier = false;
      for (int32_t k = 0; k < p.pairs.top_k; ++k)
        earlier |= codes[k] >= 0 && codes[k] % kMaxPeers == slot &&
                   pair_rows[k] < p.pairs.row_begin;
      float* dst =
          p.staging[source] + (static_cast<int64_t>(token) * p.num_slots + slot) * p.hidden;
      // The run's first 32 pairs' weights (1 unweighted: w * row is then row, bitwise) and row
      // offsets, one pair a lane, handed round by shuffles: looked up once, not per element.
      const int32_t run = n1 - n0;
      float lane_weight = 1.0f;
      int64_t lane_offset = 0;
      auto lookup = [&](int32_t n, float& weight, int64_t& offset) {
        const int32_t k = order[n];
        weight = p.weighted ? load_float<T>(p.weights[source], weight_row + k, p.weights_f32)
                            : 1.0f;
        offset = (pair_rows[k] - p.pairs.row_begin) * p.hidden;
      };
      if (lane < run) lookup(n0 + lane, lane_weight, lane_offset);
      // The whole warp runs every step (the shuffles need all 32 lanes); lanes past H idle. A
      // step covers kSpans spans of the warp's 32 * kVector columns, whose loads go out
      // together: a span at a time, each span's loads waited behind the last span's store.
      // Every column's sum runs in the same order either way.
      constexpr int kSpans = 4;
      constexpr int32_t kSpan = 32 * kVector;
      for (int32_t h0 = 0; h0 < p.hidden; h0 += kSpans * kSpan) {
        Floats<kVector> sum[kSpans];
        CUTE_UNROLL
        for (int u = 0; u < kSpans; ++u) {
          const int32_t h = h0 + u * kSpan + lane * kVector;
          if (h < p.hidden && earlier) sum[u] = Floats<kVector>::load(dst + h);
        }
        for (int32_t n = n0; n < n1; ++n) {
          float weight;
          int64_t offset;
          if (n - n0 < 32) {
            weight = __shfl_sync(0xffffffffu, lane_weight, n - n0);
            offset = __shfl_sync(0xffffffffu, lane_offset, n - n0);
          } else {
            lookup(n, weight, offset);
          }
          CUTE_UNROLL
          for (int u = 0; u < kSpans; ++u) {
            const int32_t h = h0 + u * kSpan + lane * kVector;
            if (h >= p.hidden) continue;
            const Floats<kVector> row = Floats<kVector>::load(p.rows + offset + h);
            CUTE_UNROLL
            for (int i = 0; i < kVector; ++i) sum[u].v[i] += weight * row.v[i];
          }
        }
        CUTE_UNROLL
        for (int u = 0; u < kSpans; ++u) {
          const int32_t h = h0 + u * kSpan + lane * kVector;
          if (h < p.hidden) sum[u].store(dst + h);
        }
      }
    }
    if (p.dot_partial != nullptr) {
      for (int32_t k = lane; k < p.pairs.top_k; k += 32) {
        if (!in_chunk(p.pairs, first + k)) continue;
        const float* partial = p.dot_partial + (pair_rows[k] - p.pairs.row_begin) * p.num_partials;
        float dot = 0.0f;
        for (int32_t j = 0; j < p.num_partials; ++j) dot += partial[j];
        store_float<T>(p.d_weights[source], weight_row + k, dot, p.weights_f32);
      }
    }
  }
  // The rows went to peer memory: order them before this device's next barrier signal.
  __threadfence_system();
}

// kVector as in scatter_slots: the columns a lane sums at a time; the sums are the same.
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads) combine_slots(const CombineParams p) {
  const int32_t lane = threadIdx.x % 32;
  const int32_t t = warp_token();
  if (t >= p.num_tokens) return;
  const int32_t* row = p.ids + static_cast<int64_t>(t) * p.top_k;

  // Slots in use = the distinct computing devices of this group among the token's pairs (as
  // classify_pair and assign_plan count them); a bad id poisons the row.
  const int32_t* devices =
      p.pair_device != nullptr ? p.pair_device + static_cast<int64_t>(t) * p.top_k : nullptr;
  auto device_of = [&](int32_t k) {
    return devices != nullptr ? devices[k]
                              : owning_device(row[k], p.num_experts, p.experts_per_device);
  };
  bool bad = false;
  for (int32_t k = 0; k < p.top_k; ++k) bad |= row[k] < 0 || row[k] >= p.experts_total;
  const int32_t num_used = devices_below(INT32_MAX, p.top_k, device_of);

  // A call whose barrier aborted has slots its peers may never have written.
  const bool aborted = *p.aborted != 0;
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.hidden;
  const float* slots = p.staging + static_cast<int64_t>(t) * p.num_slots * p.hidden;
  for (int32_t h = lane * kVector; h < p.hidden; h += 32 * kVector) {
    // Only the slots in use are written (the staging is not zeroed): a token whose pairs all go
    // to other groups has none, and sums to 0.
    Floats<kVector> sum;
    if (bad || aborted) {
      CUTE_UNROLL
      for (int i = 0; i < kVector; ++i) sum.v[i] = NAN;
    } else if (num_used > 0) {
      // Every slot's load goes out before the first add, so the adds wait on one round of
      // loads, not one per slot; they then run in slot order.
      Floats<kVector> slot[kMaxPeers];
      CUTE_UNROLL
      for (int32_t s = 0; s < kMaxPeers; ++s)
        if (s < num_used) slot[s] = Floats<kVector>::load(slots + int64_t{s} * p.hidden + h);
      sum = slot[0];
      CUTE_UNROLL
      for (int32_t s = 1; s < kMaxPeers; ++s) {
        if (s >= num_used) break;
        CUTE_UNROLL
        for (int i = 0; i < kVector; ++i) sum.v[i] += slot[s].v[i];
      }
    }
    sum.template store_as<T>(out + h);
  }
  if (p.d_weights != nullptr) {
    for (int32_t k = lane; k < p.top_k; k += 32) {
      if (aborted || row[k] < 0 || row[k] >= p.experts_total) {
        store_float<T>(p.d_weights, static_cast<int64_t>(t) * p.top_k + k, NAN, p.weights_f32);
      }
    }
  }
}

// One thread per element of an expert's weight gradients, both matrices in a row: the plan's
// slots of the expert in slot order (slot 0, the owner, first), rounded once. A plan's unused
// slots (-1) are its last: reassign orders an expert's helpers by their rows, largest first.
template <class T>
__global__ void __launch_bounds__(kTokenThreads) sum_partials(const PartialSumParams p) {
  const int64_t elements = p.in_elements + p.out_elements;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTokenThreads + threadIdx.x;
  const int32_t e = blockIdx.y;
  if (i >= elements) return;
  const int32_t* workers = p.workers + static_cast<int64_t>(e) * p.slots;
  const float* partial = p.partials + static_cast<int64_t>(e) * p.slots * elements + i;
  float sum = NAN;
  if (*p.aborted == 0) {
    sum = partial[0];
    for (int32_t s = 1; s < p.slots && workers[s] >= 0; ++s) sum += partial[s * elements];
  }
  if (i < p.in_elements) {
    static_cast<T*>(p.dw_in)[e * p.in_elements + i] = T(sum);
  } else {
    static_cast<T*>(p.dw_out)[e * p.out_elements + (i - p.in_elements)] = T(sum);
  }
}

}  // namespace ccf::cuda
