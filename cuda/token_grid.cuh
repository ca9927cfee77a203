// The grid of the per-token kernels (dispatch.cu, combine.cu): one warp per token, kTokenWarps
// to a block, lanes striding over the row; and which of a token's pairs a chunk holds.
#pragma once

#include <cstdint>

#include "cuda/api.cuh"

namespace ccf::cuda {

__device__ __forceinline__ int32_t warp_token() {
  return blockIdx.x * kTokenWarps + threadIdx.x / 32;
}

// Whether pair i of the TokenPairs is computed here and its row is in the chunk.
__device__ __forceinline__ bool in_chunk(const TokenPairs& pairs, int64_t i) {
  if (pairs.pair_code[i] < 0) return false;
  const int64_t row = pairs.pair_row[i];
  return row >= pairs.row_begin && row < pairs.row_end;
}

inline int token_blocks(int64_t num_tokens) {
  return static_cast<int>((num_tokens + kTokenWarps - 1) / kTokenWarps);
}

}  // namespace ccf::cuda
