// The fused epilogues of GEMM1 and the backward's u GEMM as passes over the float32 rows that
// Hopper's grouped GEMMs (grouped_gemm_sm90.cu) write: a warp per (scratch row of the chunk,
// slice of expert_gemm's N tile), with the row math expert_gemm.cu's epilogues use
// (pair_rows.cuh). activation.cu launches them.
// A header so that host code runs them as well: tests/row_passes.cu, a warp's lanes as fibers,
// checks over work lists it builds (empty groups, other devices' groups, tail padding, chunks
// past the list's end, one source's rows, grids of one block to more than the items) that the
// walk visits each (row, slice) of the pass once with its group and list position and nothing
// else, and that the kernels write those rows as the row functions do and no other.
#pragma once

#include <cstdint>

#include "cuda/api.cuh"
#include "cuda/gemm_units.cuh"
#include "cuda/numeric.cuh"
#include "cuda/pair_rows.cuh"
#include "cuda/token_grid.cuh"

namespace ccf::cuda {

// Scratch row `row` of the chunk, in M-tile `tile` of the list (before its end): its group and
// list position; false for a row that holds no pair of this pass (a tile's padding, or from
// another source).
__device__ inline bool row_pair(const GemmParams& p, int64_t row, int64_t tile, int32_t* group,
                                int64_t* pos) {
  const int32_t g = group_of_tile(p, tile);
  const int64_t index = (tile - p.tile_offset[g]) * p.tile_m + row % p.tile_m;
  if (p.group_expert[g] < 0 || index >= p.group_end[g] - p.group_begin[g]) return false;
  *group = g;
  *pos = p.group_begin[g] + index;
  return p.only_source == kAllSources || p.items[*pos].source == p.only_source;
}

// body(row, slice, group, pos) for each (scratch row, slice of `slices`) whose row holds a pair
// of the pass, a warp at a time, over a grid that fills the GPU once. A warp's rows ascend, so it
// stops at the first past the list's tiles: the handler runs as many chunks as the worst case
// needs, and one past the list's end then costs its pass a few microseconds, where a warp per
// (row, slice) cost a launch of the chunk's size. Warp-uniform.
template <class Body>
__device__ __forceinline__ void for_each_row_slice(const GemmParams& p, int32_t slices,
                                                   Body body) {
  const int64_t items = p.chunk.rows(p.tile_m) * slices;
  const int64_t warps = int64_t{gridDim.x} * kTokenWarps;
  for (int64_t item = warp_token(); item < items; item += warps) {
    const int64_t row = item / slices;
    const int64_t tile = p.chunk.first_tile() + row / p.tile_m;
    if (tile >= p.tile_offset[p.num_groups]) return;
    int32_t group;
    int64_t pos;
    if (row_pair(p, row, tile, &group, &pos))
      body(row, static_cast<int32_t>(item - row * slices), group, pos);
  }
}

__host__ __device__ __forceinline__ int32_t slices_of(const GemmParams& p, int32_t columns) {
  return (p.n + columns - 1) / columns;
}

// kVector columns a lane at a time: a warp per row alone, or a column a lane, leaves the GPU
// waiting on each warp's loads (on an H200 the backward pass moved ~0.3 TB/s a warp per row; a
// column a lane, its bytes over its time at Qwen3-30B-A3B's shape come to ~1.9 TB/s).
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads)
    activate_rows(const __grid_constant__ RowPass q, int32_t columns) {
  const GemmParams& p = q.gemm;
  const int lane = threadIdx.x % 32;
  for_each_row_slice(p, slices_of(p, columns),
                     [&](int64_t row, int32_t slice, int32_t group, int64_t pos) {
                       const float* c = q.rows + row * (p.n + p.n_split);
                       const int32_t begin = slice * columns;
                       activate_row<T, kVector>(
                           p, group, pos, row, begin, min(begin + columns, p.n), lane,
                           [&](int32_t j) { return Floats<kVector>::load(c + j); });
                     });
}

// The slices' partial dots are expert_gemm's N-tile partials (the combine sums them in order).
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads)
    activation_backward_rows(const __grid_constant__ RowPass q, int32_t columns) {
  const GemmParams& p = q.gemm;
  const int lane = threadIdx.x % 32;
  for_each_row_slice(p, slices_of(p, columns),
                     [&](int64_t row, int32_t slice, int32_t group, int64_t pos) {
                       const float* u = q.rows + row * p.n;
                       const int32_t begin = slice * columns;
                       const float dot = warp_sum(activation_backward_row<T, kVector>(
                           p, group, pos, row, begin, min(begin + columns, p.n), lane,
                           [&](int32_t j) { return Floats<kVector>::load(u + j); }));
                       if (lane == 0) p.dot_partial[row * p.num_partials + slice] = dot;
                     });
}

}  // namespace ccf::cuda
