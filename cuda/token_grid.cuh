// The grid of the per-token kernels (dispatch.cu, combine.cu): one warp per token, kTokenWarps
// to a block, lanes striding over the row.
#pragma once

#include <cstdint>

#include "cuda/config.cuh"

namespace ccf::cuda {

__device__ __forceinline__ int32_t warp_token() {
  return blockIdx.x * kTokenWarps + threadIdx.x / 32;
}

inline int token_blocks(int64_t num_tokens) {
  return static_cast<int>((num_tokens + kTokenWarps - 1) / kTokenWarps);
}

}  // namespace ccf::cuda
