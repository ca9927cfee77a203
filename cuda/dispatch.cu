// The dispatch: every row a device needs from its sources (x, or dy in the backward), read once
// over the link into a local buffer in work-list order, so the GEMMs read plain local rows.
//
// One warp per (source, token). A token with several pairs in the chunk (K > 1 experts of this
// device) is read once and written to each of its pairs' scratch rows; a token with none costs
// a few loads of its pair codes. Each lane keeps kBatch 16-byte loads in flight before it stores
// them, since a peer's load waits on the link.
#include <cstdint>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/token_grid.cuh"

namespace ccf::cuda {

template <class Vector>
__global__ void __launch_bounds__(kTokenThreads)
    fetch_rows(const __grid_constant__ FetchParams p) {
  constexpr int kBatch = 4;
  const int32_t lane = threadIdx.x % 32;
  const int32_t g = p.first_source * p.pairs.num_tokens + warp_token();  // source * T + token
  if (g >= p.end_source * p.pairs.num_tokens) return;  // warp-uniform
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

namespace {

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <class Vector>
cudaError_t launch_fetch(const FetchParams& p, cudaStream_t stream) {
  const int64_t tokens = static_cast<int64_t>(p.end_source - p.first_source) * p.pairs.num_tokens;
  if (tokens == 0) return cudaSuccess;
  fetch_rows<Vector><<<token_blocks(tokens), kTokenThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fetch_rows(const FetchParams& params, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.pairs.num_sources > 0 && params.pairs.num_sources <= kMaxPeers);
  CCF_HOST_ASSERT(0 <= params.first_source && params.first_source <= params.end_source &&
                  params.end_source <= params.pairs.num_sources);
  CCF_HOST_ASSERT(params.row_bytes > 0 && params.row_bytes % 4 == 0);
  // 16-byte vectors where every row starts on one (bf16/f16 always: H % 8 == 0 and the handler
  // checks the buffers' alignment), else 4-byte words (float32 with H % 4 != 0).
  bool wide = params.row_bytes % 16 == 0 && aligned_to(params.rows, 16);
  for (int dev = 0; dev < params.pairs.num_sources; ++dev)
    wide = wide && aligned_to(params.sources[dev], 16);
  return wide ? launch_fetch<uint4>(params, stream) : launch_fetch<uint32_t>(params, stream);
}

}  // namespace ccf::cuda
