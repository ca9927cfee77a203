// The launchers of the activation passes (cuda/row_passes.cuh): four columns a lane where every
// row the pass reads or writes allows it, else one, over a grid that fills the GPU once.
#include <algorithm>

#include <cutlass/numeric_types.h>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/kernel_residency.cuh"
#include "cuda/row_passes.cuh"

namespace ccf::cuda {
namespace {

// Whether every row the pass reads or writes starts on a 4-column vector (16 bytes of float32,
// 4 elements of T) and the slices are whole vectors: F % 4 == 0 (n_split is F or 0) and the
// buffers aligned. The GPU path's F % 8 for 16-bit inputs and its 256-byte scratch regions make
// this the rule; the scalar pass is what remains when a buffer is not. The two passes sum a
// slice's dot(a, u) in other orders, so the choice must not change between a site's calls: it
// rests on the shapes and on XLA's and the arena's alignment, never on where a buffer happens to
// lie.
template <class T>
bool vector_rows(const RowPass& q, int32_t columns) {
  const GemmParams& p = q.gemm;
  const int64_t t4 = 4 * sizeof(T);
  bool ok = p.n % 4 == 0 && columns % 4 == 0 && aligned_to(q.rows, 16) &&
            (p.kept == nullptr || aligned_to(p.kept, 16));
  if (p.epilogue == Epilogue::kActivation) {
    ok &= p.out_ld % 4 == 0 && aligned_to(p.out, t4);
  } else {
    ok &= aligned_to(p.h, 16) && aligned_to(p.dh, t4) && aligned_to(p.aw, t4);
  }
  return ok;
}

// As many blocks as `num_sms` SMs hold at once, or fewer where the chunk has fewer items.
template <class Kernel>
cudaError_t launch_rows(Kernel kernel, const RowPass& q, int32_t columns, int num_sms,
                        cudaStream_t stream) {
  int per_sm = 0;
  CCF_CUDA_RETURN_IF_ERROR(
      ready_kernel(reinterpret_cast<const void*>(kernel), kTokenThreads, 0, &per_sm));
  CCF_HOST_ASSERT(per_sm > 0);
  const int64_t items = q.gemm.chunk.rows(q.gemm.tile_m) * slices_of(q.gemm, columns);
  const int blocks = static_cast<int>(std::min<int64_t>(
      (items + kTokenWarps - 1) / kTokenWarps, static_cast<int64_t>(num_sms) * per_sm));
  kernel<<<blocks, kTokenThreads, 0, stream>>>(q, columns);
  return cudaGetLastError();
}

template <class T, int kVector>
cudaError_t launch_pass(const RowPass& q, int32_t columns, int num_sms, cudaStream_t stream) {
  return q.gemm.epilogue == Epilogue::kActivation
             ? launch_rows(activate_rows<T, kVector>, q, columns, num_sms, stream)
             : launch_rows(activation_backward_rows<T, kVector>, q, columns, num_sms, stream);
}

template <class T>
cudaError_t launch_pass(const RowPass& q, int32_t columns, int num_sms, cudaStream_t stream) {
  return vector_rows<T>(q, columns) ? launch_pass<T, 4>(q, columns, num_sms, stream)
                                    : launch_pass<T, 1>(q, columns, num_sms, stream);
}

}  // namespace

cudaError_t activation_pass(DType dtype, const RowPass& pass, int num_sms, cudaStream_t stream) {
  CCF_HOST_ASSERT(num_sms > 0);
  const int32_t columns = expert_gemm_tile_n(dtype);
  CCF_HOST_ASSERT(pass.gemm.epilogue == Epilogue::kActivation ||
                  (pass.gemm.epilogue == Epilogue::kActivationBackward &&
                   pass.gemm.num_partials == slices_of(pass.gemm, columns)));
  if (pass.gemm.only_source == kSpanningSources) return cudaSuccess;  // as grouped_gemm
  switch (dtype) {
    case DType::kBF16: return launch_pass<cutlass::bfloat16_t>(pass, columns, num_sms, stream);
    case DType::kF16: return launch_pass<cutlass::half_t>(pass, columns, num_sms, stream);
    case DType::kF32: break;
  }
  return cudaErrorNotSupported;
}

}  // namespace ccf::cuda
