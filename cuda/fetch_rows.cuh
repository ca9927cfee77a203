// The dispatch: every row a device needs from its sources (x, or dy in the backward), read once
// over the link into a local buffer in work-list order, so the GEMMs read plain local rows.
//
// One warp per (source, token) at a time. A token with several pairs in the chunk (K > 1 experts
// of this device) is read once and written to each of its pairs' scratch rows; a token with none
// costs a few loads of its pair codes. Each lane keeps kBatch 16-byte loads in flight before it
// stores them, since a peer's load waits on the link.
//
// A header so that host code runs it as well: tests/fetch_rows.cu, a warp's lanes as fibers,
// checks over random work lists and chunks, on every grid the launcher gives and more, that each
// pair's scratch row holds its source's row, and that no other row is written.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/api.cuh"
#include "cuda/token_grid.cuh"

namespace ccf::cuda {

// Threads of a block that holds an SM for the fetch: as many warps as it keeps busy reading.
constexpr int kSmFetchThreads = 1024;

// The fetch's blocks over `tokens` (source, token) rows: a warp per token in blocks of
// kTokenThreads, or (max_sms > 0) at most max_sms blocks of kSmFetchThreads that stay.
inline int fetch_blocks(int64_t tokens, int max_sms) {
  if (max_sms == 0) return token_blocks(tokens);
  return std::min(token_blocks(tokens, kSmFetchThreads / 32), max_sms);
}

// The (source, token) row `g` = source * T + token, by one warp.
template <class Vector>
__device__ inline void fetch_row(const FetchParams& p, int32_t g, int32_t lane) {
  constexpr int kBatch = 4;
  const int64_t first = static_cast<int64_t>(g) * p.pairs.top_k;  // the token's first pair
  bool here = false;
  for (int32_t k = lane; k < p.pairs.top_k; k += 32) here |= in_chunk(p.pairs, first + k);
  if (!__any_sync(0xffffffffu, here)) return;

  const int32_t source = g / p.pairs.num_tokens, token = g - source * p.pairs.num_tokens;
  const int64_t vectors = p.row_bytes / static_cast<int64_t>(sizeof(Vector));
  const Vector* src = reinterpret_cast<const Vector*>(
      static_cast<const char*>(p.sources[source]) + token * p.row_bytes);
  for (int64_t v0 = 0; v0 < vectors; v0 += 32 * kBatch) {
    Vector value[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t v = v0 + b * 32 + lane;
      if (v < vectors) value[b] = src[v];
    }
    for (int32_t k = 0; k < p.pairs.top_k; ++k) {
      if (!in_chunk(p.pairs, first + k)) continue;
      const int64_t row = p.pairs.pair_row[first + k] - p.pairs.row_begin;
      Vector* dst = reinterpret_cast<Vector*>(static_cast<char*>(p.rows) + row * p.row_bytes);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t v = v0 + b * 32 + lane;
        if (v < vectors) dst[v] = value[b];
      }
    }
  }
}

// Each warp takes the rows g, g + every warp of the grid, ...: a grid of a warp per token, or
// (FetchParams::max_sms) one of a few whole-SM blocks that stay for the launch (fetch_blocks).
template <class Vector, int kThreads>
__global__ void __launch_bounds__(kThreads) fetch_rows(const __grid_constant__ FetchParams p) {
  constexpr int32_t kWarps = kThreads / 32;
  const int32_t end = p.end_source * p.pairs.num_tokens;
  const int32_t stride = static_cast<int32_t>(gridDim.x) * kWarps;
  for (int32_t g = p.first_source * p.pairs.num_tokens + warp_token<kWarps>(); g < end;
       g += stride)  // warp-uniform
    fetch_row<Vector>(p, g, threadIdx.x % 32);
}

}  // namespace ccf::cuda
