// expert_gemm.cuh's kernels launched: the configuration of a dtype and its operand layouts, a
// persistent grid of as many CTAs as fit.
#include <algorithm>

#include <cute/tensor.hpp>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/expert_gemm.cuh"
#include "cuda/gemm_config.cuh"
#include "cuda/gemm_epilogues.cuh"
#include "cuda/kernel_residency.cuh"

namespace ccf::cuda {

using namespace cute;
using namespace gemm_config;

namespace {

template <class Config>
cudaError_t launch_gemm(const GemmParams& p, int num_sms, cudaStream_t stream) {
  constexpr int kSmemBytes = GemmTraits<Config>::kSmemBytes;
  CCF_HOST_ASSERT((serves<Config::kAMajor, Config::kBMajor>(p.epilogue)));
  CCF_HOST_ASSERT(p.tile_m == Config::kTileM);  // the work list's M tiles are the kernel's
  CCF_HOST_ASSERT(p.only_source == kAllSources || p.shape == GemmShape::kPairRows);
  CCF_HOST_ASSERT(p.chunk.tiles > 0 && p.chunk.index >= 0);
  CCF_HOST_ASSERT((p.part == ReductionPart::kEveryGroup) == (p.carry == nullptr));
  CCF_HOST_ASSERT(p.part == ReductionPart::kEveryGroup || p.shape == GemmShape::kPairReduction);
  CCF_HOST_ASSERT(!p.skip_rows || p.shape == GemmShape::kPairReduction);
  CCF_HOST_ASSERT(p.epilogue != Epilogue::kActivationBackward ||
                  p.num_partials == (p.n + Config::kTileN - 1) / Config::kTileN);
  auto* kernel = &expert_gemm<Config>;
  int per_sm = 0;
  CCF_CUDA_RETURN_IF_ERROR(ready_kernel(reinterpret_cast<const void*>(kernel), Config::kThreads,
                                        kSmemBytes, &per_sm));
  CCF_HOST_ASSERT(per_sm > 0);
  int64_t grid = static_cast<int64_t>(num_sms) * per_sm;
  if (p.shape == GemmShape::kPairReduction) {
    const int64_t units = static_cast<int64_t>(p.num_groups) *
                          ((p.m + Config::kTileM - 1) / Config::kTileM) *
                          ((p.n + Config::kTileN - 1) / Config::kTileN);
    grid = std::min(grid, units);
  }
  if (grid == 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(grid), Config::kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// The kernel of one configuration for the operand layouts at hand.
template <template <Major, Major> class Config>
cudaError_t launch_majors(Major a_major, Major b_major, const GemmParams& p, int num_sms,
                          cudaStream_t stream) {
  if (a_major == Major::kK && b_major == Major::kMN) {
    return launch_gemm<Config<Major::kK, Major::kMN>>(p, num_sms, stream);
  }
  if (a_major == Major::kK && b_major == Major::kK) {
    return launch_gemm<Config<Major::kK, Major::kK>>(p, num_sms, stream);
  }
  if (a_major == Major::kMN && b_major == Major::kMN) {
    return launch_gemm<Config<Major::kMN, Major::kMN>>(p, num_sms, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace

int expert_gemm_tile_m(DType dtype) {
  return dtype == DType::kF32 ? SimtConfig<Major::kK, Major::kK>::kTileM
                              : TensorCoreConfig<bfloat16_t, Major::kK, Major::kK>::kTileM;
}

int expert_gemm_tile_n(DType dtype) {
  return dtype == DType::kF32 ? SimtConfig<Major::kK, Major::kK>::kTileN
                              : TensorCoreConfig<bfloat16_t, Major::kK, Major::kK>::kTileN;
}

cudaError_t expert_gemm(DType dtype, Major a_major, Major b_major, const GemmParams& params,
                        int num_sms, cudaStream_t stream) {
  CCF_HOST_ASSERT(num_sms > 0);
  CCF_HOST_ASSERT(params.num_groups > 0 && params.num_groups <= kMaxExpertsHere);
  CCF_HOST_ASSERT(!params.tf32 || dtype == DType::kF32);
  switch (dtype) {
    case DType::kF32:
      // TF32's 16-byte vectors: every operand row starts on one, and every extent a vector
      // runs along is whole vectors (the loads test a vector's first element only).
      CCF_HOST_ASSERT(!params.tf32 ||
                      (params.a.ld % 4 == 0 && params.b.ld % 4 == 0 && params.n % 4 == 0 &&
                       params.n_split % 4 == 0 &&
                       (params.shape == GemmShape::kPairReduction ? params.m : params.k) % 4 == 0));
      return params.tf32 ? launch_majors<Tf32Config>(a_major, b_major, params, num_sms, stream)
                         : launch_majors<SimtConfig>(a_major, b_major, params, num_sms, stream);
    case DType::kBF16: return launch_majors<Bf16Config>(a_major, b_major, params, num_sms, stream);
    case DType::kF16: return launch_majors<F16Config>(a_major, b_major, params, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ccf::cuda
