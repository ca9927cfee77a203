// The grid of the per-token kernels (dispatch.cu, combine.cu): one warp per token, kTokenWarps
// to a block, lanes striding over the row; and which of a token's pairs a chunk holds.
#pragma once

#include <cstdint>

#include "cuda/api.cuh"

namespace ccf::cuda {

// The warp's index in the grid: its token in a grid of a warp per token.
template <int kWarps = kTokenWarps>
__device__ __forceinline__ int32_t warp_token() {
  return blockIdx.x * kWarps + threadIdx.x / 32;
}

// Whether pair i of the TokenPairs is computed here and its row is in the chunk.
__device__ __forceinline__ bool in_chunk(const TokenPairs& pairs, int64_t i) {
  if (pairs.pair_code[i] < 0) return false;
  const int64_t row = pairs.pair_row[i];
  return row >= pairs.row_begin && row < pairs.row_end;
}

// Blocks of `warps` warps for a warp per token.
inline int token_blocks(int64_t num_tokens, int warps = kTokenWarps) {
  return static_cast<int>((num_tokens + warps - 1) / warps);
}

}  // namespace ccf::cuda
