// On Hopper, the expert GEMMs that CUTLASS's grouped GEMMs serve: TMA loads, wgmma, a
// warp-specialized persistent cooperative kernel, problem sizes and operand pointers read from
// device memory (no host round trip). One problem per group of the work list:
//   - pair rows with a plain float32 output (GEMM1, GEMM2 and the backward's h, u and dx): the
//     group's rows of the launch's chunk, from one source phase or all. A row's products do not
//     depend on which problem holds it (the K loop is the same), so phases, chunks and emulated
//     peers change nothing bitwise;
//   - weight gradients (dW_in, dW_out: K = the group's pairs, M-major A): the groups whose rows
//     all lie in the chunk, summed in one piece into the expert's output; and, with several
//     chunks, a group whose rows cross a chunk edge, a chunk's rows at a time into its float32
//     sum in GemmParams::carry (D = acc + C, in place: wgmma starts every tile from zero, so the
//     sum so far comes in through the epilogue), finished into the expert's output by the chunk
//     its rows end in. A plan's partials and the zeros of a group without rows stay on
//     expert_gemm.cu (GemmParams::skip_rows).
// The problems, their operands and strides come from grouped_problems.cuh's kernels.
//
// The kernels run from the sm_90a part of the build only (grouped_gemms_available).
#include <algorithm>
#include <tuple>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/grouped_problems.cuh"
#include "cuda/kernel_residency.cuh"

namespace ccf::cuda {
namespace {

using namespace cute;

// 128x256 output tiles: per 64-deep k step a CTA reads 48 KiB of operands for 4.2 MFLOP, where
// 128x128 tiles read 32 KiB for 2.1 MFLOP. At 128x128 the forward's grouped GEMMs ran at about
// 600 TFLOP/s on an H200 (Mixtral-8x7B's shape, 061ef87), about what L2 delivers at that ratio,
// against cuBLAS's 813 on the dense GEMM of the same FLOPs.
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using LayoutD = cutlass::layout::RowMajor;  // GroupedOperands::LayoutD

// D: [M, N] rows of ElementD = acc + beta * C, C (void: none) rows laid out as D's.
template <class ElementD, class ElementC = void>
using EpilogueTo = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, LayoutD*,
    16 / sizeof(std::conditional_t<std::is_void_v<ElementC>, ElementD, ElementC>), ElementD,
    LayoutD*, 16 / sizeof(ElementD),
    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
// Out of the templates below: gcc's host pass misreads these sizeofs in a dependent context.
constexpr int kEpilogueSmemF32 = static_cast<int>(sizeof(EpilogueTo<float>::SharedStorage));
constexpr int kEpilogueSmemCarry =
    static_cast<int>(sizeof(EpilogueTo<float, float>::SharedStorage));
constexpr int kEpilogueSmemBf16 =
    static_cast<int>(sizeof(EpilogueTo<cutlass::bfloat16_t>::SharedStorage));
constexpr int kEpilogueSmemF16 =
    static_cast<int>(sizeof(EpilogueTo<cutlass::half_t>::SharedStorage));

template <class ElementD, class ElementC>
constexpr int epilogue_smem() {
  if constexpr (!std::is_void_v<ElementC>) return kEpilogueSmemCarry;
  else if constexpr (std::is_same_v<ElementD, float>) return kEpilogueSmemF32;
  else if constexpr (std::is_same_v<ElementD, cutlass::bfloat16_t>) return kEpilogueSmemBf16;
  else return kEpilogueSmemF16;
}

// A grouped GEMM of GroupedOperands' layouts: its pipeline's stages fill what shared memory its
// epilogue leaves.
template <class T, Major kAMajor, Major kBMajor, class ElementD, class ElementC = void>
struct GroupedGemm : GroupedOperands<T, kAMajor, kBMajor, ElementD, ElementC> {
  using Operands = GroupedOperands<T, kAMajor, kBMajor, ElementD, ElementC>;
  static constexpr int kAlignment = 16 / sizeof(T);
  using Epilogue = EpilogueTo<ElementD, ElementC>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, typename Operands::LayoutA*,
      kAlignment, T, typename Operands::LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<epilogue_smem<ElementD, ElementC>()>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<GroupedProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  // build_problems writes the strides GroupedOperands names: they must be the kernel's.
  static_assert(std::is_same_v<typename Kernel::InternalStrideA, typename Operands::StrideA> &&
                    std::is_same_v<typename Kernel::InternalStrideB, typename Operands::StrideB> &&
                    std::is_same_v<typename Kernel::InternalStrideD, typename Operands::StrideD>,
                "the problem arrays' strides are not the kernel's");
};

// The pair-row GEMMs: float32 rows out.
template <class T, Major kBMajor>
using PairRowsGemm = GroupedGemm<T, Major::kK, kBMajor, float>;
// The weight gradients: A = pair rows transposed, B = pair rows, the expert's gradient out.
template <class T>
using ReductionGemm = GroupedGemm<T, Major::kMN, Major::kMN, T>;
// A weight gradient's part in one chunk of a group that crosses a chunk edge: its float32 sum,
// carry = acc + beta * carry.
template <class T>
using CarryGemm = GroupedGemm<T, Major::kMN, Major::kMN, float, float>;

template <class G>
typename G::Gemm::Arguments arguments(const GroupArrays<G>& w, int32_t groups, int device,
                                      int num_sms, float beta = 0.0f) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = num_sms;
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, w.problems, nullptr},
      {w.a, w.stride_a, w.b, w.stride_b},
      {{}, nullptr, w.stride_d, w.d, w.stride_d},
      hw};
  if constexpr (G::kReadsC) args.epilogue.ptr_C = w.c;
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = beta;
  return args;
}

template <class G>
int64_t workspace_bytes(int32_t groups, int num_sms) {
  const GroupArrays<G> none{};
  return GroupArrays<G>::bytes(groups) +
         static_cast<int64_t>(G::Gemm::get_workspace_size(arguments<G>(none, groups, 0, num_sms)));
}

template <class G>
cudaError_t run(const GemmParams& p, void* workspace, int device, int num_sms,
                cudaStream_t stream) {
  using T = typename G::Element;
  // TMA reads and writes 16-byte aligned rows; can_implement checks that only for problem
  // shapes on the host, and a misaligned pitch would fault inside the kernel instead.
  CCF_HOST_ASSERT(p.a.ld * sizeof(T) % 16 == 0 && p.b.ld * sizeof(T) % 16 == 0 &&
                  aligned_to(p.a.data, 16));
  if constexpr (G::kReadsC)  // D and C: the carry's [m, n] float32 rows
    CCF_HOST_ASSERT(p.n * sizeof(float) % 16 == 0 && aligned_to(p.carry, 16));
  else
    CCF_HOST_ASSERT(p.out_ld * sizeof(typename G::Output) % 16 == 0 &&
                    p.out_expert_stride * sizeof(typename G::Output) % 16 == 0 &&
                    aligned_to(p.out, 16));
  CCF_HOST_ASSERT(p.b.source != RowSource::kPair || aligned_to(p.b.data, 16));
  const GroupArrays<G> w = GroupArrays<G>::carve(workspace, p.num_groups);
  const unsigned blocks =
      static_cast<unsigned>((p.num_groups + kProblemThreads - 1) / kProblemThreads);
  CCF_HOST_ASSERT(p.shape == G::kShape);
  if constexpr (G::kShape == GemmShape::kPairRows)
    build_problems<G><<<blocks, kProblemThreads, 0, stream>>>(p, w);
  else
    build_reduction_problems<G><<<blocks, kProblemThreads, 0, stream>>>(p, w);
  CCF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  // kContinued adds to the group's sum so far; kBegun starts it (C unread).
  const float beta = G::kReadsC && p.part == ReductionPart::kContinued ? 1.0f : 0.0f;
  const auto args = arguments<G>(w, p.num_groups, device, num_sms, beta);
  if (G::Gemm::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  const auto* kernel = reinterpret_cast<const void*>(cutlass::device_kernel<typename G::Kernel>);
  int per_sm = 0;
  CCF_CUDA_RETURN_IF_ERROR(ready_kernel(kernel, G::Kernel::MaxThreadsPerBlock,
                                        G::Kernel::SharedStorageSize, &per_sm));
  CCF_HOST_ASSERT(per_sm > 0);
  if (G::Kernel::initialize_workspace(args, w.kernel_workspace, stream) !=
      cutlass::Status::kSuccess)
    return cudaErrorUnknown;
  auto params = G::Kernel::to_underlying_arguments(args, w.kernel_workspace);
  if (G::Gemm::run(params, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

// Every instance the handler may launch, for what they share: their workspace, their shared
// memory.
template <class T>
using Instances = std::tuple<PairRowsGemm<T, Major::kMN>, PairRowsGemm<T, Major::kK>,
                             ReductionGemm<T>, CarryGemm<T>>;

template <class F>
auto over_instances(F f) {
  return std::apply([&](auto... g) { return std::max({f(g)...}); },
                    std::tuple_cat(Instances<cutlass::bfloat16_t>{}, Instances<cutlass::half_t>{}));
}

}  // namespace

bool grouped_gemms_available() {
  // Compiled from compute_90a, the kernel runs as built; from compute_80's PTX (a build without
  // sm_90a, or another GPU) it would only trap.
  using Probe = PairRowsGemm<cutlass::bfloat16_t, Major::kMN>::Kernel;
  cudaFuncAttributes attributes;
  int device, shared_memory;
  if (cudaFuncGetAttributes(&attributes, cutlass::device_kernel<Probe>) != cudaSuccess ||
      cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&shared_memory, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // The kernels' pipelines fill an H100's shared memory (227 KiB); a GPU that offers a block
  // less runs the SM80 kernels instead of failing at the launch.
  const int needed = over_instances(
      [](auto g) { return static_cast<int>(decltype(g)::Kernel::SharedStorageSize); });
  return attributes.ptxVersion == 90 && shared_memory >= needed;
}

int64_t grouped_gemm_workspace_bytes(int32_t num_groups, int num_sms) {
  return over_instances(
      [&](auto g) { return workspace_bytes<decltype(g)>(num_groups, num_sms); });
}

cudaError_t grouped_gemm(DType dtype, Major b_major, const GemmParams& params, void* workspace,
                         int device, int num_sms, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.a.source == RowSource::kPair);
  CCF_HOST_ASSERT(params.num_groups > 0 && params.num_groups <= kMaxExpertsHere);
  using cutlass::bfloat16_t, cutlass::half_t;
  if (params.shape == GemmShape::kPairReduction) {
    // Into the expert outputs only: a plan's float32 partials go to the owners' memory.
    CCF_HOST_ASSERT(params.epilogue == Epilogue::kStoreExpert && params.partials[0] == nullptr);
    CCF_HOST_ASSERT(params.b.source == RowSource::kPair && b_major == Major::kMN);
    const bool carried = params.part != ReductionPart::kEveryGroup;
    CCF_HOST_ASSERT(!carried || params.carry != nullptr);
    auto reduce = [&](auto element) -> cudaError_t {
      using T = decltype(element);
      if (!carried) return run<ReductionGemm<T>>(params, workspace, device, num_sms, stream);
      CCF_CUDA_RETURN_IF_ERROR(run<CarryGemm<T>>(params, workspace, device, num_sms, stream));
      if (params.part == ReductionPart::kBegun) return cudaSuccess;
      finish_carry<T><<<4 * num_sms, kFinishThreads, 0, stream>>>(params);
      return cudaGetLastError();
    };
    switch (dtype) {
      case DType::kBF16:
        return reduce(bfloat16_t{});
      case DType::kF16:
        return reduce(half_t{});
      case DType::kF32:
        break;
    }
    return cudaErrorNotSupported;
  }
  CCF_HOST_ASSERT(params.shape == GemmShape::kPairRows && params.epilogue == Epilogue::kStoreF32);
  CCF_HOST_ASSERT(params.b.source == RowSource::kExpert);
  // The source phases hand every row to one source's problem: nothing spans.
  if (params.only_source == kSpanningSources) return cudaSuccess;
  const bool mn = b_major == Major::kMN;
  auto pair_rows = [&](auto gemm_as_stored, auto gemm_transposed) {
    return mn ? run<decltype(gemm_as_stored)>(params, workspace, device, num_sms, stream)
              : run<decltype(gemm_transposed)>(params, workspace, device, num_sms, stream);
  };
  switch (dtype) {
    case DType::kBF16:
      return pair_rows(PairRowsGemm<bfloat16_t, Major::kMN>{},
                       PairRowsGemm<bfloat16_t, Major::kK>{});
    case DType::kF16:
      return pair_rows(PairRowsGemm<half_t, Major::kMN>{}, PairRowsGemm<half_t, Major::kK>{});
    case DType::kF32:
      break;
  }
  return cudaErrorNotSupported;
}

}  // namespace ccf::cuda
