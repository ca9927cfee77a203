// The device-built work list: every (source, token, k) pair routed to an expert of this device,
// in the fixed order (expert, source, token, k), without a host round trip.
//
// The P = D * T * K pairs, flattened as i = (source * T + token) * K + k, are split into chunks of
// kPairsPerChunk; one warp owns a chunk in all three kernels. A pair's position is
//   expert_offset[e] + (pairs of e in earlier chunks) + (pairs of e before it in its chunk),
// so positions depend on the data only, never on scheduling.
//
// With a reassignment plan the list covers every expert of the group on every device, so each
// device knows every pair's position in its expert's order and so which device the plan names
// for it (`assign_plan`); the GEMMs then walk this device's (expert, plan slot) groups.
//
// A header so that host code runs them as well: tests/work_list.cu, each block's threads as
// fibers, checks the list they build against the order above over random routings, plans and
// chunkings, however the blocks run. work_list.cu launches them.
#pragma once

#include <cstdint>

#include <cub/block/block_scan.cuh>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/slots.cuh"

namespace ccf::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Blocks of a warp per chunk (count_pairs, fill_work_list).
inline int chunk_blocks(int num_chunks) { return (num_chunks + kListWarps - 1) / kListWarps; }

// Blocks of a thread per item (assign_plan_pairs: a (source, token); place_rows: a pair).
inline unsigned item_blocks(int64_t items) {
  return static_cast<unsigned>((items + kListThreads - 1) / kListThreads);
}

struct PairIndex {
  int32_t source, token, k;
};

__device__ __forceinline__ PairIndex decode_pair(const Routing& r, int32_t i) {
  const int32_t per_source = r.num_tokens * r.top_k;
  PairIndex p;
  p.source = i / per_source;
  const int32_t rest = i - p.source * per_source;
  p.token = rest / r.top_k;
  p.k = rest - p.token * r.top_k;
  return p;
}

// The pair's code: local expert * kMaxPeers + slot, or -1 when another device or group computes
// it or its id is out of range (recorded in `error`). The slot is the rank of this pair's device
// among the token's distinct computing devices of this group, ascending: the source's
// combine_slots counts the same devices.
__device__ inline int32_t classify_pair(const Routing& r, int32_t i, DeviceError* error) {
  const PairIndex p = decode_pair(r, i);
  const int32_t* row = r.ids[p.source] + static_cast<int64_t>(p.token) * r.top_k;
  const int32_t id = row[p.k];
  if (id < 0 || id >= r.experts_total) {
    if (r.recorded_source < 0 || r.recorded_source == p.source)
      record_device_error(error, kBadExpertId, p.source, p.token, p.k, id, r.experts_total);
    return -1;
  }
  const int32_t local = id - r.first_expert;
  if (local < 0 || local >= r.num_experts_here) return -1;

  const int32_t device = id / r.experts_per_device;
  const int32_t slot = devices_below(device, r.top_k, [&](int32_t j) {
    return owning_device(row[j], r.num_sources * r.experts_per_device, r.experts_per_device);
  });
  return local * kMaxPeers + slot;
}

__device__ __forceinline__ int32_t num_pairs(const Routing& r) {
  return r.num_sources * r.num_tokens * r.top_k;
}

__device__ __forceinline__ int32_t local_expert(int32_t code) {
  return code >= 0 ? code / kMaxPeers : -1;
}

// Classifies every pair and counts each chunk's pairs per local expert. After an aborted barrier
// no peer's ids are read: every pair is "not here", so the list is empty and no later kernel of
// the call touches peer memory through it.
__global__ void __launch_bounds__(kListThreads)
    count_pairs(const Routing r, const WorkList list, int32_t num_chunks, DeviceError* error) {
  extern __shared__ int32_t s_counts[];  // [kListWarps, E_here]
  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int32_t* counts = s_counts + warp * r.num_experts_here;
  const int32_t chunk = blockIdx.x * kListWarps + warp;
  if (chunk >= num_chunks) return;  // warp-uniform; no block-wide sync below
  const bool aborted = *r.aborted != 0;

  for (int32_t e = lane; e < r.num_experts_here; e += 32) counts[e] = 0;
  __syncwarp();
  const int32_t total = num_pairs(r);
  for (int32_t round = 0; round < kPairsPerChunk / 32; ++round) {
    const int32_t i = chunk * kPairsPerChunk + round * 32 + lane;
    int32_t e = -1;
    if (i < total) {
      const int32_t code = aborted ? -1 : classify_pair(r, i, error);
      list.pair_code[i] = code;
      e = local_expert(code);
    }
    const unsigned same = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(same) - 1) counts[e] += __popc(same);
    __syncwarp();
  }
  for (int32_t e = lane; e < r.num_experts_here; e += 32) {
    list.chunk_counts[static_cast<int64_t>(e) * num_chunks + chunk] = counts[e];
  }
}

// One block per expert: its chunk counts become exclusive offsets, its total expert_count.
__global__ void __launch_bounds__(kListThreads)
    scan_counts(const WorkList list, int32_t num_chunks) {
  using BlockScan = cub::BlockScan<int32_t, kListThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  const int32_t e = blockIdx.x;
  int32_t* counts = list.chunk_counts + static_cast<int64_t>(e) * num_chunks;
  int32_t running = 0;
  for (int32_t base = 0; base < num_chunks; base += kListThreads) {
    const int32_t c = base + threadIdx.x;
    int32_t value = c < num_chunks ? counts[c] : 0;
    int32_t block_total;
    BlockScan(temp).ExclusiveSum(value, value, block_total);
    if (c < num_chunks) counts[c] = running + value;
    running += block_total;
    __syncthreads();  // `temp` is reused by the next round
  }
  if (threadIdx.x == 0) list.expert_count[e] = running;
}

// Places every local pair at its position. Each block first derives the expert offsets (a scan
// of E_here counts, cheaper to redo than to launch for); block 0 publishes them and the M-tile
// table for the GEMMs.
__global__ void __launch_bounds__(kListThreads)
    fill_work_list(const Routing r, const WorkList list, int32_t num_chunks) {
  constexpr int kItems = kMaxExpertsHere / kListThreads;
  static_assert(kMaxExpertsHere % kListThreads == 0, "experts split evenly over the threads");
  using BlockScan = cub::BlockScan<int32_t, kListThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  __shared__ int32_t s_offset[kMaxExpertsHere];
  extern __shared__ int32_t s_run[];  // [kListWarps, E_here] next position per expert

  const int32_t experts = r.num_experts_here;
  int32_t values[kItems];
  for (int j = 0; j < kItems; ++j) {
    const int32_t e = threadIdx.x * kItems + j;
    values[j] = e < experts ? list.expert_count[e] : 0;
  }
  int32_t total;
  BlockScan(temp).ExclusiveSum(values, values, total);
  for (int j = 0; j < kItems; ++j) {
    const int32_t e = threadIdx.x * kItems + j;
    if (e < experts) s_offset[e] = values[j];
  }
  if (blockIdx.x == 0) {
    // Without a plan the groups are the experts; with one, assign_plan makes them.
    const bool groups = r.plan.workers == nullptr;
    for (int j = 0; j < kItems; ++j) {
      const int32_t e = threadIdx.x * kItems + j;
      if (e < experts) {
        if (!groups) list.expert_offset[e] = values[j];
        const int32_t count = list.expert_count[e];
        if (groups) {
          list.group_begin[e] = values[j];
          list.group_end[e] = values[j] + count;
          list.group_expert[e] = r.first_expert + e;
        }
        values[j] = (count + list.tile_m - 1) / list.tile_m;
      } else {
        values[j] = 0;
      }
    }
    __syncthreads();  // `temp` is reused
    int32_t total_tiles;
    BlockScan(temp).ExclusiveSum(values, values, total_tiles);
    for (int j = 0; j < kItems && groups; ++j) {
      const int32_t e = threadIdx.x * kItems + j;
      if (e < experts) list.tile_offset[e] = values[j];
    }
    if (threadIdx.x == 0) {
      if (groups) list.tile_offset[experts] = total_tiles;
      else list.expert_offset[experts] = total;
    }
  }
  __syncthreads();

  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t chunk = blockIdx.x * kListWarps + warp;
  if (chunk >= num_chunks) return;
  int32_t* run = s_run + warp * experts;
  for (int32_t e = lane; e < experts; e += 32) {
    run[e] = s_offset[e] + list.chunk_counts[static_cast<int64_t>(e) * num_chunks + chunk];
  }
  __syncwarp();
  const int32_t all = num_pairs(r);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int32_t round = 0; round < kPairsPerChunk / 32; ++round) {
    const int32_t i = chunk * kPairsPerChunk + round * 32 + lane;
    const int32_t e = i < all ? local_expert(list.pair_code[i]) : -1;
    const unsigned same = __match_any_sync(kFullMask, e);
    const int32_t rank = __popc(same & lanes_below);
    if (e >= 0) {
      const int32_t pos = run[e] + rank;
      const PairIndex p = decode_pair(r, i);
      list.items[pos] = WorkItem{p.source, p.token, p.k};
      list.pair_pos[i] = pos;
    }
    __syncwarp();
    if (e >= 0 && rank == 0) run[e] += __popc(same);
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Reassignment plans.

// Plan slot s of expert e (whose rows are [0, count) in its order): the device computing it and
// the rows it covers, [lo, hi), as the CPU handler's PlanView::WorkerOf reads a plan. Slot 0 is
// always in use; slots from the first unused one (-1) on cover nothing; the last slot in use runs
// to `count`; bounds are clamped to be ascending within [0, count), so the slots always cut the
// rows into consecutive slices, one worker each, whatever the plan holds. A worker outside the
// group is read as the owner.
struct PlanSlot {
  int32_t worker, lo, hi;
};

__device__ inline PlanSlot plan_slot(const Routing& r, int32_t e, int32_t s, int32_t count) {
  const int32_t* workers = r.plan.workers + static_cast<int64_t>(e) * r.plan.slots;
  const int32_t* bounds = r.plan.bounds + static_cast<int64_t>(e) * (r.plan.slots + 1);
  const int32_t owner = e / r.experts_per_device;
  int32_t lo = 0;
  for (int32_t j = 0; j < r.plan.slots && (j == 0 || workers[j] >= 0); ++j) {
    const bool last = j + 1 == r.plan.slots || workers[j + 1] < 0;
    const int32_t hi = last ? count : min(max(bounds[j + 1], lo), count);
    const int32_t worker = workers[j] >= 0 && workers[j] < r.num_sources ? workers[j] : owner;
    if (j == s) return {worker, lo, hi};
    lo = hi;
  }
  return {-1, count, count};
}

// The device computing position `pos` of expert e's rows.
__device__ inline int32_t plan_worker(const Routing& r, int32_t e, int32_t pos, int32_t count) {
  for (int32_t s = 0; s < r.plan.slots; ++s) {
    const PlanSlot slot = plan_slot(r, e, s, count);
    if (slot.worker < 0) break;
    if (pos < slot.hi) return slot.worker;
  }
  return e / r.experts_per_device;  // no rows at all: unreachable for a routed pair
}

// One thread per (source, token): each pair's computing device, then the staging slots as
// classify_pair counts them (the rank of the pair's device among the token's distinct devices).
__global__ void __launch_bounds__(kListThreads)
    assign_plan_pairs(const Routing r, const WorkList list) {
  const int32_t g = blockIdx.x * kListThreads + threadIdx.x;  // source * T + token
  if (g >= r.num_sources * r.num_tokens) return;
  const int64_t first = static_cast<int64_t>(g) * r.top_k;
  for (int32_t k = 0; k < r.top_k; ++k) {
    const int32_t code = list.pair_code[first + k];
    int32_t device = -1;
    if (code >= 0) {
      const int32_t e = code / kMaxPeers;
      device = plan_worker(r, e, list.pair_pos[first + k] - list.expert_offset[e],
                           list.expert_count[e]);
    }
    list.pair_device[first + k] = device;
  }
  for (int32_t k = 0; k < r.top_k; ++k) {
    const int32_t code = list.pair_code[first + k];
    const int32_t device = list.pair_device[first + k];
    if (code < 0) continue;
    const int32_t slot = devices_below(device, r.top_k,
                                       [&](int32_t j) { return list.pair_device[first + j]; });
    const bool here = r.me < 0 || device == r.me;
    list.pair_code[first + k] = here ? (code / kMaxPeers) * kMaxPeers + slot : -1;
  }
}

// One block: the groups g = e * S + s, this device's (every device's when emulating) with their
// rows, the others empty, and the M-tile table over them.
__global__ void __launch_bounds__(kListThreads) assign_plan_groups(const Routing r,
                                                                   const WorkList list) {
  constexpr int kItems = kMaxExpertsHere / kListThreads;
  using BlockScan = cub::BlockScan<int32_t, kListThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  // After an aborted barrier no group is here: an empty one would still write its zero
  // weight-gradient partial into its owner's memory.
  const bool aborted = *r.aborted != 0;
  int32_t tiles[kItems];
  for (int j = 0; j < kItems; ++j) {
    const int32_t g = threadIdx.x * kItems + j;
    tiles[j] = 0;
    if (g >= list.num_groups) continue;
    const int32_t e = g / r.plan.slots, s = g % r.plan.slots;
    const PlanSlot slot = plan_slot(r, e, s, list.expert_count[e]);
    const bool here = !aborted && slot.worker >= 0 && (r.me < 0 || slot.worker == r.me);
    const int32_t begin = list.expert_offset[e] + slot.lo;
    list.group_begin[g] = begin;
    list.group_end[g] = here ? list.expert_offset[e] + slot.hi : begin;
    list.group_expert[g] = here ? e : -1;
    if (here) tiles[j] = (slot.hi - slot.lo + list.tile_m - 1) / list.tile_m;
  }
  int32_t total_tiles;
  BlockScan(temp).ExclusiveSum(tiles, tiles, total_tiles);
  for (int j = 0; j < kItems; ++j) {
    const int32_t g = threadIdx.x * kItems + j;
    if (g < list.num_groups) list.tile_offset[g] = tiles[j];
  }
  if (threadIdx.x == 0) list.tile_offset[list.num_groups] = total_tiles;
}

// One thread per pair: a local pair's group is the last whose first position is at most its
// own (the groups ascend through the list; an empty group before it may share its first).
__global__ void __launch_bounds__(kListThreads) place_rows(const Routing r, const WorkList list) {
  const int32_t i = blockIdx.x * kListThreads + threadIdx.x;
  if (i >= num_pairs(r) || list.pair_code[i] < 0) return;
  const int32_t pos = list.pair_pos[i];
  int32_t lo = 0, hi = list.num_groups - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (list.group_begin[mid] <= pos) lo = mid; else hi = mid - 1;
  }
  list.pair_row[i] = static_cast<int32_t>(int64_t{list.tile_offset[lo]} * list.tile_m +
                                          (pos - list.group_begin[lo]));
}

}  // namespace ccf::cuda
