// How the GEMMs over a work list split into units of work, where a tile's rows and columns lie in
// its operands, and which launch reduces which of a group's rows into a weight gradient when the
// list runs in chunks. expert_gemm.cu walks the units (persistent CTAs, a grid-stride over them);
// grouped_problems.cuh builds its problems from the same chunk windows and parts. Host code runs
// them as well: tests/weight_gradient_chunks.cu replays a backward's weight-gradient launches
// chunk by chunk over random work lists, tests/gemm_layouts.cu loads tiles through the maps.
#pragma once

#include <algorithm>  // std::min and std::max: constexpr, so device code calls them too
#include <cstdint>

#include <cuda/cmath>

#include "cuda/api.cuh"

namespace ccf::cuda {

// The group of M-tile `tile`: the last whose first tile is <= it (groups without pairs own none).
__host__ __device__ __forceinline__ int32_t group_of_tile(const GemmParams& p, int64_t tile) {
  int32_t lo = 0, hi = p.num_groups - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (p.tile_offset[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct GemmTile {
  int32_t group;       // WorkList's group
  int32_t expert;      // its expert (global id); -1: a group this launch does not compute
  int32_t pair_begin;  // the group's first work-list position
  // The chunk's scratch row of pair row 0 of the operands: the group's first pair (kPairRows;
  // row m0 + i is the tile's i-th) or the chunk's first pair of the group (kPairReduction).
  int64_t row_begin;
  int32_t m0;          // first M index of the tile
  int32_t n_tile;
  int32_t m_extent;    // valid M indices: [0, m_extent)
  int32_t k_extent;    // valid K indices: [0, k_extent)
  // kPairReduction: start from the group's sum so far in `carry`; leave the sum there.
  bool load_carry, store_carry;
};

template <int kTileN>
__host__ __device__ __forceinline__ int32_t columns_per_tile(const GemmParams& p) {
  return p.n_split != 0 ? kTileN / 2 : kTileN;
}

// Row indices of A: m0 + m, valid below the tile's M extent.
struct RowMap {
  int32_t base, extent;
  __host__ __device__ __forceinline__ bool valid(int m) const { return base + m < extent; }
  __host__ __device__ __forceinline__ int64_t index(int m) const { return base + m; }
};

// C columns of a tile -> B's N index. Gated GEMM1 puts gate columns j in the first half of the
// tile and up columns n_split + j in the second; otherwise the map is n_tile * BN + n.
struct ColumnMap {
  int32_t half, base, split, extent;

  __host__ __device__ __forceinline__ bool valid(int n) const { return base + n % half < extent; }
  __host__ __device__ __forceinline__ int64_t index(int n) const {
    return base + n % half + static_cast<int64_t>(n / half) * split;
  }
};

// The memory row of `op` that the tile's M or N index `row` (RowMap's or ColumnMap's index)
// reads: an expert's weight row, or a pair row of the chunk's scratch.
template <class T>
__host__ __device__ __forceinline__ const T* operand_row(const GemmOperand& op,
                                                         const GemmParams& p, const GemmTile& tile,
                                                         int64_t row) {
  if (op.source == RowSource::kExpert)
    return static_cast<const T*>(op.peers[tile.expert / p.experts_per_device]) +
           (tile.expert % p.experts_per_device) * op.expert_stride + row * op.ld;
  return static_cast<const T*>(op.data) + (tile.row_begin + row) * op.ld;
}

template <int kTileM, int kTileN>
__host__ __device__ __forceinline__ int64_t num_units(const GemmParams& p) {
  if (p.shape == GemmShape::kPairRows) {
    const int32_t n_tiles = ::cuda::ceil_div(p.n, columns_per_tile<kTileN>(p));
    const int64_t tiles = std::min(static_cast<int64_t>(p.tile_offset[p.num_groups]),
                                   p.chunk.end_tile()) - p.chunk.first_tile();
    return std::max(tiles, int64_t{0}) * n_tiles;
  }
  return static_cast<int64_t>(p.num_groups) * ::cuda::ceil_div(p.m, kTileM) *
         ::cuda::ceil_div(p.n, kTileN);
}

// kPairReduction: the group's pairs in the launch's chunk (k_extent, row_begin) and whether it
// carries its sum in or out; false when the launch reduces none of them (another chunk's or the
// other part's, ReductionPart).
template <int kTileM>
__host__ __device__ bool reduction_range(const GemmParams& p, GemmTile& t) {
  const int64_t tiles_begin = p.tile_offset[t.group], tiles_end = p.tile_offset[t.group + 1];
  const int64_t first = p.chunk.first_tile(), end = p.chunk.end_tile();
  int64_t k_first = 0, k_end = 0;
  if (tiles_begin == tiles_end) {  // no pairs: its zeros are stored once, by chunk 0
    if (p.chunk.index != 0) return false;
    t.load_carry = t.store_carry = false;
  } else {
    const int64_t lo = std::max(tiles_begin, first);
    const int64_t hi = std::min(tiles_end, end);
    if (lo >= hi) return false;
    t.load_carry = tiles_begin < first;
    t.store_carry = tiles_end > end;
    k_first = (lo - tiles_begin) * kTileM;
    k_end = std::min((hi - tiles_begin) * kTileM,
                     static_cast<int64_t>(p.group_end[t.group] - t.pair_begin));
  }
  if (p.part == ReductionPart::kContinued && !t.load_carry) return false;
  if (p.part == ReductionPart::kBegun && t.load_carry) return false;
  t.row_begin = tiles_begin * kTileM - p.chunk.first_row(kTileM) + k_first;
  t.k_extent = static_cast<int32_t>(k_end - k_first);
  return true;
}

template <int kTileM, int kTileN>
__host__ __device__ GemmTile decode_tile(const GemmParams& p, int64_t unit) {
  GemmTile t;
  if (p.shape == GemmShape::kPairRows) {
    const int32_t n_tiles = ::cuda::ceil_div(p.n, columns_per_tile<kTileN>(p));
    const int32_t m_tile = static_cast<int32_t>(p.chunk.first_tile() + unit / n_tiles);
    t.n_tile = static_cast<int32_t>(unit % n_tiles);
    const int32_t lo = group_of_tile(p, m_tile);
    t.group = lo;
    t.expert = p.group_expert[lo];
    t.pair_begin = p.group_begin[lo];
    t.m0 = (m_tile - p.tile_offset[lo]) * kTileM;
    t.row_begin = static_cast<int64_t>(p.tile_offset[lo]) * kTileM - p.chunk.first_row(kTileM);
    t.m_extent = p.group_end[lo] - t.pair_begin;
    t.k_extent = p.k;
    t.load_carry = t.store_carry = false;
  } else {
    const int32_t m_tiles = ::cuda::ceil_div(p.m, kTileM), n_tiles = ::cuda::ceil_div(p.n, kTileN);
    t.group = static_cast<int32_t>(unit / (m_tiles * n_tiles));
    const int32_t rest = static_cast<int32_t>(unit % (m_tiles * n_tiles));
    t.m0 = rest / n_tiles * kTileM;
    t.n_tile = rest % n_tiles;
    t.expert = p.group_expert[t.group];
    t.pair_begin = p.group_begin[t.group];
    t.m_extent = p.m;
    if (!reduction_range<kTileM>(p, t)) t.expert = -1;
  }
  return t;
}

// A CTA's first unit from `unit` on (in steps of the `grid` CTAs) that the launch may compute:
// with skip_rows, one of a group without rows. A weight gradient's units are group-major, so the
// CTA steps over a group with rows (the grouped GEMMs' work) at once instead of decoding each
// unit.
template <int kTileM, int kTileN>
__host__ __device__ __forceinline__ int64_t next_unit(const GemmParams& p, int64_t unit,
                                                      int64_t units, int64_t grid) {
  if (!p.skip_rows) return unit;
  const int64_t per_group = int64_t{::cuda::ceil_div(p.m, kTileM)} * ::cuda::ceil_div(p.n, kTileN);
  while (unit < units) {
    const int64_t group = unit / per_group;
    if (p.tile_offset[group] == p.tile_offset[group + 1]) break;
    const int64_t next_group = (group + 1) * per_group;
    unit += (next_group - unit + grid - 1) / grid * grid;
  }
  return unit;
}

// Whether group g has rows and all of them lie in the launch's chunk: its weight gradients are
// then summed in one piece, neither starting from nor leaving a carry.
__host__ __device__ __forceinline__ bool group_whole_in_chunk(const GemmParams& p, int32_t g) {
  const int64_t begin = p.tile_offset[g], end = p.tile_offset[g + 1];
  return begin < end && begin >= p.chunk.first_tile() && end <= p.chunk.end_tile();
}

// Whether group g's rows cross the start of the launch's chunk (ReductionPart::kContinued: its
// sum so far is in carry) or, beginning in it, its end (kBegun: its sum goes on in carry). A
// chunk has at most one group of each part.
__host__ __device__ __forceinline__ bool carried(const GemmParams& p, int32_t g) {
  const int64_t begin = p.tile_offset[g], end = p.tile_offset[g + 1];
  const int64_t first = p.chunk.first_tile(), last = p.chunk.end_tile();
  if (p.group_expert[g] < 0) return false;
  return p.part == ReductionPart::kContinued ? begin < first && end > first
                                             : begin >= first && begin < last && end > last;
}

// The rows of group g a grouped weight-gradient launch reduces: `rows` of the chunk's scratch
// rows from `first` on, the group's pairs there; none unless the group is one of the launch's
// part: with kEveryGroup each group the chunk holds whole, else the carried one.
struct ReductionRows {
  int64_t first, rows;
};

__host__ __device__ __forceinline__ ReductionRows reduction_rows(const GemmParams& p, int32_t g) {
  const bool part = p.part == ReductionPart::kEveryGroup
                        ? p.group_expert[g] >= 0 && group_whole_in_chunk(p, g)
                        : carried(p, g);
  const int64_t chunk_row = p.chunk.first_row(p.tile_m);
  const int64_t group_row = static_cast<int64_t>(p.tile_offset[g]) * p.tile_m;
  const int64_t lo = std::max(group_row, chunk_row);
  const int64_t hi =
      std::min(group_row + p.group_end[g] - p.group_begin[g], p.chunk.end_row(p.tile_m));
  const int64_t rows = part ? std::max(hi - lo, int64_t{0}) : 0;
  return {rows > 0 ? lo - chunk_row : 0, rows};
}

// After kContinued's GEMM: the group whose rows end in this chunk, its sum now whole in carry
// (finish_carry stores it into the expert's output), or -1.
__host__ __device__ __forceinline__ int32_t finished_carry(const GemmParams& p) {
  const int32_t g = group_of_tile(p, p.chunk.first_tile());
  return carried(p, g) && p.tile_offset[g + 1] <= p.chunk.end_tile() ? g : -1;
}

}  // namespace ccf::cuda
