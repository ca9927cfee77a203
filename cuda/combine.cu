// The launchers of the combine's kernels (cuda/slot_sums.cuh). The scatter and the combine run
// four columns a lane where H and every row, slot and output they touch allow moving four
// columns in one access, else one; the sums are the same either way.
#include <cutlass/numeric_types.h>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/slot_sums.cuh"
#include "cuda/token_grid.cuh"

namespace ccf::cuda {
namespace {

template <class T>
cudaError_t launch_sums(const PartialSumParams& p, cudaStream_t stream) {
  const int64_t elements = p.in_elements + p.out_elements;
  const dim3 grid(static_cast<unsigned>((elements + kTokenThreads - 1) / kTokenThreads),
                  static_cast<unsigned>(p.experts));
  sum_partials<T><<<grid, kTokenThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_scatter(const ScatterParams& p, cudaStream_t stream) {
  const size_t order_bytes = sizeof(int32_t) * kTokenWarps * static_cast<size_t>(p.pairs.top_k);
  CCF_HOST_ASSERT(p.pairs.top_k <= kMaxTopK);
  bool vectors = p.hidden % 4 == 0 && aligned_to(p.rows, 16);
  for (int32_t d = 0; d < p.pairs.num_sources; ++d) vectors &= aligned_to(p.staging[d], 16);
  const int blocks = token_blocks(static_cast<int64_t>(p.pairs.num_sources) * p.pairs.num_tokens);
  if (vectors)
    scatter_slots<T, 4><<<blocks, kTokenThreads, order_bytes, stream>>>(p);
  else
    scatter_slots<T, 1><<<blocks, kTokenThreads, order_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  const int blocks = token_blocks(p.num_tokens);
  if (p.hidden % 4 == 0 && aligned_to(p.staging, 16) && aligned_to(p.out, 4 * sizeof(T)))
    combine_slots<T, 4><<<blocks, kTokenThreads, 0, stream>>>(p);
  else
    combine_slots<T, 1><<<blocks, kTokenThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t scatter_slots(DType dtype, const ScatterParams& params, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.pairs.num_sources > 0 && params.pairs.num_sources <= kMaxPeers);
  switch (dtype) {
    case DType::kF32: return launch_scatter<float>(params, stream);
    case DType::kBF16: return launch_scatter<cutlass::bfloat16_t>(params, stream);
    case DType::kF16: return launch_scatter<cutlass::half_t>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t combine_slots(DType dtype, const CombineParams& params, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF32: return launch_combine<float>(params, stream);
    case DType::kBF16: return launch_combine<cutlass::bfloat16_t>(params, stream);
    case DType::kF16: return launch_combine<cutlass::half_t>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t sum_partials(DType dtype, const PartialSumParams& params, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.experts > 0 && params.experts <= 65535 && params.slots > 0);
  switch (dtype) {
    case DType::kF32: return launch_sums<float>(params, stream);
    case DType::kBF16: return launch_sums<cutlass::bfloat16_t>(params, stream);
    case DType::kF16: return launch_sums<cutlass::half_t>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ccf::cuda
