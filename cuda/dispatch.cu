// The dispatch's launches: the kernel is in fetch_rows.cuh.
#include <cstdint>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/fetch_rows.cuh"

namespace ccf::cuda {

namespace {

template <class Vector>
cudaError_t launch_fetch(const FetchParams& p, cudaStream_t stream) {
  const int64_t tokens = static_cast<int64_t>(p.end_source - p.first_source) * p.pairs.num_tokens;
  if (tokens == 0) return cudaSuccess;
  const int blocks = fetch_blocks(tokens, p.max_sms);
  if (p.max_sms > 0)
    fetch_rows<Vector, kSmFetchThreads><<<blocks, kSmFetchThreads, 0, stream>>>(p);
  else
    fetch_rows<Vector, kTokenThreads><<<blocks, kTokenThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fetch_rows(const FetchParams& params, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.pairs.num_sources > 0 && params.pairs.num_sources <= kMaxPeers);
  CCF_HOST_ASSERT(0 <= params.first_source && params.first_source <= params.end_source &&
                  params.end_source <= params.pairs.num_sources);
  CCF_HOST_ASSERT(params.row_bytes > 0 && params.row_bytes % 4 == 0 && params.max_sms >= 0);
  // 16-byte vectors where every row starts on one (bf16/f16 always: H % 8 == 0 and the handler
  // checks the buffers' alignment), else 4-byte words (float32 with H % 4 != 0).
  bool wide = params.row_bytes % 16 == 0 && aligned_to(params.rows, 16);
  for (int dev = 0; dev < params.pairs.num_sources; ++dev)
    wide = wide && aligned_to(params.sources[dev], 16);
  return wide ? launch_fetch<uint4>(params, stream) : launch_fetch<uint32_t>(params, stream);
}

}  // namespace ccf::cuda
