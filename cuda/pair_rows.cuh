// What the GEMMs over pair rows share: which rows (the grouped GEMMs) or tiles (expert_gemm) of
// the list a launch computes, where a pair keeps its h, and what GEMM1 and the backward's u GEMM
// do with one pair's float32 row. The row functions serve expert_gemm.cu (fused, reading the
// accumulator tile in shared memory) and activation.cu (a pass over the float32 rows Hopper's
// grouped GEMMs wrote), so both round alike. One warp per row, kVector consecutive columns a
// lane at a time: `at(j)` reads columns [j, j + kVector) of the row's C as Floats<kVector>, and
// [j_begin, j_end) is whole vectors (Floats' alignment too).
// Host code runs them as well: tests/pair_rows.cu checks four columns a lane against one, and
// tests/row_passes.cu a launch's rows and tiles against the passes'.
#pragma once

#include <algorithm>  // std::min and std::max: constexpr, so device code calls them too
#include <cstdint>

#include "common/activation.h"
#include "cuda/api.cuh"
#include "cuda/gemm_units.cuh"
#include "cuda/numeric.cuh"

namespace ccf::cuda {

// Where group `group`'s device's part of the list begins: the first `kept_rows` pairs from
// there keep their h. Only with `p.kept`, which is never set with a plan (a group is then the
// list's expert, not a device's).
__device__ __forceinline__ int64_t device_part_begin(const GemmParams& p, int32_t group) {
  return p.group_begin[group / p.experts_per_device * p.experts_per_device];
}

// The list position past the kept pairs of group `group`'s device.
__device__ __forceinline__ int64_t kept_end(const GemmParams& p, int32_t group) {
  return device_part_begin(p, group) + p.kept_rows;
}

// The row of `p.kept` where pair `pos` of group `group` keeps its h, or -1 when it keeps none.
__device__ __forceinline__ int64_t kept_index(const GemmParams& p, int32_t group, int64_t pos) {
  if (p.kept == nullptr) return -1;
  const int64_t index = pos - device_part_begin(p, group);
  return index < p.kept_rows ? group / p.experts_per_device * p.kept_rows + index : -1;
}

// First position in [lo, hi) whose pair comes from a source >= `source` (a group's pairs are in
// (source, token, k) order).
__device__ __forceinline__ int32_t first_from(const WorkItem* items, int32_t lo, int32_t hi,
                                              int32_t source) {
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (items[mid].source < source) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The scratch rows of group `group` that a pair-row launch computes as one problem (Hopper's
// grouped GEMMs, where a tile may hold another source's or a kept row): its pairs from the
// launch's source (every source's: kAllSources), past the kept ones under `skip_kept`, in the
// launch's chunk; `rows` of them from `first`, counted from the chunk's first row (none: 0).
struct ChunkRows {
  int64_t first;
  int32_t rows;
};

__device__ __forceinline__ ChunkRows group_rows_in_chunk(const GemmParams& p, int32_t group) {
  int32_t lo = p.group_begin[group], hi = p.group_expert[group] >= 0 ? p.group_end[group] : lo;
  if (p.only_source >= 0) {
    lo = first_from(p.items, lo, hi, p.only_source);
    hi = first_from(p.items, lo, hi, p.only_source + 1);
  }
  if (p.skip_kept && p.kept != nullptr)
    lo = static_cast<int32_t>(std::max<int64_t>(lo, std::min<int64_t>(kept_end(p, group), hi)));
  // Positions -> the chunk's scratch rows.
  const int64_t chunk_row = p.chunk.first_row(p.tile_m);
  const int64_t group_row = int64_t{p.tile_offset[group]} * p.tile_m - p.group_begin[group];
  const int64_t r0 = std::max(lo + group_row, chunk_row);
  const int64_t r1 = std::min(hi + group_row, p.chunk.end_row(p.tile_m));
  const int32_t rows = static_cast<int32_t>(std::max(r1 - r0, int64_t{0}));
  return {rows > 0 ? r0 - chunk_row : 0, rows};
}

// The source of a kPairRows tile's rows, or kSpanningSources: a group's rows are in (source,
// token, k) order, so its first and last row name them all.
template <int kTileM>
__device__ __forceinline__ int32_t tile_source(const GemmParams& p, const GemmTile& tile) {
  const int32_t first = p.items[tile.pair_begin + tile.m0].source;
  const int32_t last =
      p.items[tile.pair_begin + std::min(tile.m0 + kTileM, tile.m_extent) - 1].source;
  return first == last ? first : kSpanningSources;
}

// Whether every pair of a kPairRows tile keeps its h (its last pair does: a device's kept pairs
// are the first of its part of the list, and a tile never spans two experts).
template <int kTileM>
__device__ __forceinline__ bool tile_kept(const GemmParams& p, const GemmTile& tile) {
  const int32_t last = std::min(tile.m0 + kTileM, tile.m_extent) - 1;
  return kept_index(p, tile.group, int64_t{tile.pair_begin} + last) >= 0;
}

// Whether expert_gemm computes kPairRows tile `tile` in its launch: a tile of a group computed
// here whose rows all come from the launch's source (a source phase; kSpanningSources: the tiles
// whose rows span sources; kAllSources: any), and not every pair kept under `skip_kept`. Across
// a call's phases each tile is computed once.
template <int kTileM>
__device__ __forceinline__ bool tile_in_launch(const GemmParams& p, const GemmTile& tile) {
  if (tile.expert < 0) return false;  // another device's group
  if (p.only_source != kAllSources && tile_source<kTileM>(p, tile) != p.only_source) return false;
  return !(p.skip_kept && tile_kept<kTileM>(p, tile));
}

// GEMM1: a = act(h) (gated: act(gate) * up, gate column j and up column n_split + j of h) into
// out[srow, j] in the input dtype, and h itself into the kept rows where the pair keeps it.
template <class T, int kVector, class At>
__device__ __forceinline__ void activate_row(const GemmParams& p, int32_t group, int64_t pos,
                                             int64_t srow, int32_t j_begin, int32_t j_end,
                                             int lane, At at) {
  const Activation act = static_cast<Activation>(p.activation);
  T* out = static_cast<T*>(p.out) + srow * p.out_ld;
  const int64_t kept = kept_index(p, group, pos);
  float* keep = kept >= 0 ? p.kept + kept * (p.n + p.n_split) : nullptr;
  for (int32_t j = j_begin + lane * kVector; j < j_end; j += 32 * kVector) {
    const Floats<kVector> gate = at(j);
    Floats<kVector> a;
    if (p.n_split != 0) {
      const Floats<kVector> up = at(p.n_split + j);
      CUTE_UNROLL
      for (int i = 0; i < kVector; ++i) a.v[i] = ActForward(act, gate.v[i]) * up.v[i];
      if (keep != nullptr) up.store(keep + p.n_split + j);
    } else {
      CUTE_UNROLL
      for (int i = 0; i < kVector; ++i) a.v[i] = ActForward(act, gate.v[i]);
    }
    a.template store_as<T>(out + j);
    if (keep != nullptr) gate.store(keep + j);
  }
}

// The backward's u = dy @ w_out^T, columns [j_begin, j_end) of pair `pos`'s row: with a = act(h)
// from the kept or the recomputed h, writes dh and w*a (where dW_out wants it), and returns the
// lane's part of the row's dot(a, u) (a rounded to the input dtype, as the forward multiplies it
// into w_out).
template <class T, int kVector, class At>
__device__ __forceinline__ float activation_backward_row(const GemmParams& p, int32_t group,
                                                         int64_t pos, int64_t srow,
                                                         int32_t j_begin, int32_t j_end,
                                                         int lane, At at) {
  const Activation act = static_cast<Activation>(p.activation);
  const WorkItem item = p.items[pos];
  const float w = load_float<T>(p.weights[item.source],
                                static_cast<int64_t>(item.token) * p.top_k + item.k, p.weights_f32);
  const int32_t f = p.n;                   // F
  const int64_t gf = p.gated ? 2 * f : f;  // row length of h and dh
  const int64_t kept = kept_index(p, group, pos);
  const float* h = kept >= 0 ? p.kept + kept * gf : p.h + srow * gf;
  T* dh = static_cast<T*>(p.dh) + srow * gf;
  T* aw = p.aw != nullptr ? static_cast<T*>(p.aw) + srow * f : nullptr;
  float dot = 0.0f;
  for (int32_t j = j_begin + lane * kVector; j < j_end; j += 32 * kVector) {
    const Floats<kVector> u = at(j);
    const Floats<kVector> gate = Floats<kVector>::load(h + j);
    const Floats<kVector> up = p.gated ? Floats<kVector>::load(h + f + j) : Floats<kVector>{};
    Floats<kVector> d_gate, d_up, a_w;
    CUTE_UNROLL
    for (int i = 0; i < kVector; ++i) {
      const float da = w * u.v[i];
      float a;
      if (p.gated) {
        const float act_gate = ActForward(act, gate.v[i]);
        a = act_gate * up.v[i];
        d_gate.v[i] = ActBackward(act, gate.v[i], da * up.v[i]);
        d_up.v[i] = da * act_gate;
      } else {
        a = ActForward(act, gate.v[i]);
        d_gate.v[i] = ActBackward(act, gate.v[i], da);
      }
      const float a_rounded = static_cast<float>(T(a));
      a_w.v[i] = w * a_rounded;
      dot += a_rounded * u.v[i];
    }
    d_gate.template store_as<T>(dh + j);
    if (p.gated) d_up.template store_as<T>(dh + f + j);
    if (aw != nullptr) a_w.template store_as<T>(aw + j);
  }
  return dot;
}

// A warp's sum of its lanes' values in a fixed butterfly: the same inputs give the same sum.
__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

}  // namespace ccf::cuda
