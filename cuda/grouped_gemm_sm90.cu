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
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/gemm_units.cuh"
#include "cuda/kernel_residency.cuh"
#include "cuda/pair_rows.cuh"

namespace ccf::cuda {
namespace {

using namespace cute;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using Problem = ProblemShape::UnderlyingProblemShape;

// 128x256 output tiles: per 64-deep k step a CTA reads 48 KiB of operands for 4.2 MFLOP, where
// 128x128 tiles read 32 KiB for 2.1 MFLOP. At 128x128 the forward's grouped GEMMs ran at about
// 600 TFLOP/s on an H200 (Mixtral-8x7B's shape, 061ef87), about what L2 delivers at that ratio,
// against cuBLAS's 813 on the dense GEMM of the same FLOPs.
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using LayoutD = cutlass::layout::RowMajor;

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

// A: [M, K], K-major (Major::kK, cutlass's RowMajor A: pair rows) or M-major (Major::kMN,
// ColumnMajor: pair rows read as their transpose). B: [K, N], N-major (Major::kMN, RowMajor: an
// expert's weights as stored, or pair rows) or K-major (Major::kK, ColumnMajor: the weights
// transposed).
template <class T, Major kAMajor, Major kBMajor, class ElementD, class ElementC = void>
struct GroupedGemm {
  using Element = T;
  using Output = ElementD;
  static constexpr bool kReadsC = !std::is_void_v<ElementC>;
  // K-major A is pair rows by M (the pair-row GEMMs), M-major A by K (the weight gradients).
  static constexpr GemmShape kShape =
      kAMajor == Major::kK ? GemmShape::kPairRows : GemmShape::kPairReduction;
  using LayoutA = std::conditional_t<kAMajor == Major::kK, cutlass::layout::RowMajor,
                                     cutlass::layout::ColumnMajor>;
  using LayoutB = std::conditional_t<kBMajor == Major::kMN, cutlass::layout::RowMajor,
                                     cutlass::layout::ColumnMajor>;
  static constexpr int kAlignment = 16 / sizeof(T);
  using Epilogue = EpilogueTo<ElementD, ElementC>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA*, kAlignment, T, LayoutB*,
      kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<epilogue_smem<ElementD, ElementC>()>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
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

// The per-group arrays the kernel reads, carved from the front of the workspace; the CUTLASS
// kernel's own workspace follows.
template <class G>
struct GroupArrays {
  static_assert(sizeof(typename G::StrideA) == 8 && sizeof(typename G::StrideB) == 8 &&
                    sizeof(typename G::StrideD) == 8,
                "strides of one dynamic int64 mode");
  Problem* problems;
  const typename G::Element** a;
  const typename G::Element** b;
  typename G::Output** d;
  const typename G::Output** c;  // CarryGemm's C: D's rows (in place)
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  void* kernel_workspace;

  static int64_t bytes(int32_t groups) {
    const int64_t per_group = sizeof(Problem) + 4 * sizeof(void*) + sizeof(typename G::StrideA) +
                              sizeof(typename G::StrideB) + sizeof(typename G::StrideD);
    return (per_group * groups + kWorkspaceAlignment - 1) / kWorkspaceAlignment *
           kWorkspaceAlignment;
  }

  static GroupArrays carve(void* workspace, int32_t groups) {
    char* at = static_cast<char*>(workspace);
    auto take = [&](auto* type, int64_t count) {
      auto* p = reinterpret_cast<std::remove_pointer_t<decltype(type)>*>(at);
      at += sizeof(*p) * count;
      return p;
    };
    GroupArrays w;
    // 8-byte elements first (pointers, strides of one int64), the int triples last: every
    // array stays aligned to its element.
    w.a = take(static_cast<const typename G::Element**>(nullptr), groups);
    w.b = take(static_cast<const typename G::Element**>(nullptr), groups);
    w.d = take(static_cast<typename G::Output**>(nullptr), groups);
    w.c = take(static_cast<const typename G::Output**>(nullptr), groups);
    w.stride_a = take(static_cast<typename G::StrideA*>(nullptr), groups);
    w.stride_b = take(static_cast<typename G::StrideB*>(nullptr), groups);
    w.stride_d = take(static_cast<typename G::StrideD*>(nullptr), groups);
    w.problems = take(static_cast<Problem*>(nullptr), groups);
    w.kernel_workspace = static_cast<char*>(workspace) + bytes(groups);
    return w;
  }
};

// An operand's stride: its one dynamic mode, the pitch of its rows in memory, is `ld`.
template <class Stride>
__device__ Stride row_pitch(int64_t ld) {
  Stride s{};
  if constexpr (is_static<std::remove_cv_t<std::remove_reference_t<decltype(get<0>(s))>>>::value)
    get<1>(s) = ld;
  else
    get<0>(s) = ld;
  return s;
}

// Group g's operand strides: A's, B's and D's row pitches, the same for every group.
template <class G>
__device__ void store_strides(const GemmParams& p, const GroupArrays<G>& w, int32_t g,
                              int64_t d_ld) {
  w.stride_a[g] = row_pitch<typename G::StrideA>(p.a.ld);
  w.stride_b[g] = row_pitch<typename G::StrideB>(p.b.ld);
  w.stride_d[g] = row_pitch<typename G::StrideD>(d_ld);
}

// The problems of a pair-row GEMM. One thread per group: its problem in this launch (M = 0 when
// it has none) and its operands.
template <class G>
__global__ void __launch_bounds__(128) build_problems(const __grid_constant__ GemmParams p,
                                                      GroupArrays<G> w) {
  using T = typename G::Element;
  const int32_t g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.num_groups) return;
  const int32_t expert = p.group_expert[g];
  const ChunkRows rows = group_rows_in_chunk(p, g);
  w.problems[g] = Problem(rows.rows, p.n, p.k);
  w.a[g] = static_cast<const T*>(p.a.data) + rows.first * p.a.ld;
  w.d[g] = static_cast<float*>(p.out) + rows.first * p.out_ld;
  w.b[g] = expert >= 0 ? static_cast<const T*>(p.b.peers[expert / p.experts_per_device]) +
                             (expert % p.experts_per_device) * p.b.expert_stride
                       : static_cast<const T*>(p.b.peers[0]);
  store_strides(p, w, g, p.out_ld);
}

// The problems of a weight gradient: a^T b over a group's rows in the chunk, for the groups of
// the launch's part. ReductionGemm (kEveryGroup): each group whose rows all lie in the chunk,
// into its expert's output. CarryGemm (kContinued, kBegun): the one group whose sum is carried,
// into carry. M = 0 for the others (the groups without rows are expert_gemm's). wgmma would
// store an uninitialised accumulator for K = 0, and no problem here has one: a group of the part
// has a tile, so a row, in the chunk.
template <class G>
__global__ void __launch_bounds__(128) build_reduction_problems(
    const __grid_constant__ GemmParams p, GroupArrays<G> w) {
  using T = typename G::Element;
  const int32_t g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.num_groups) return;
  const ReductionRows rows = reduction_rows(p, g);  // CarryGemm's launches are the carried parts
  w.problems[g] =
      rows.rows > 0 ? Problem(p.m, p.n, static_cast<int>(rows.rows)) : Problem(0, p.n, 0);
  w.a[g] = static_cast<const T*>(p.a.data) + rows.first * p.a.ld;
  w.b[g] = static_cast<const T*>(p.b.data) + rows.first * p.b.ld;
  if constexpr (G::kReadsC) {
    w.d[g] = p.carry;
    w.c[g] = p.carry;
    store_strides(p, w, g, p.n);
  } else {
    w.d[g] = static_cast<T*>(p.out) + g * p.out_expert_stride;
    store_strides(p, w, g, p.out_ld);
  }
}

// After kContinued's GEMM: where its group's rows end in this chunk, its sum, now whole in
// carry, into the expert's output in the input dtype.
template <class T>
__global__ void __launch_bounds__(256) finish_carry(const __grid_constant__ GemmParams p) {
  const int32_t g = finished_carry(p);
  if (g < 0) return;
  T* out = static_cast<T*>(p.out) + g * p.out_expert_stride;
  // A block a row at a time: coalesced both sides, and no division per element.
  for (int64_t row = blockIdx.x; row < p.m; row += gridDim.x) {
    const float* from = p.carry + row * p.n;
    T* to = out + row * p.out_ld;
    for (int32_t col = threadIdx.x; col < p.n; col += blockDim.x) to[col] = T(from[col]);
  }
}

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
  const unsigned blocks = static_cast<unsigned>((p.num_groups + 127) / 128);
  CCF_HOST_ASSERT(p.shape == G::kShape);
  if constexpr (G::kShape == GemmShape::kPairRows)
    build_problems<G><<<blocks, 128, 0, stream>>>(p, w);
  else
    build_reduction_problems<G><<<blocks, 128, 0, stream>>>(p, w);
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
      finish_carry<T><<<4 * num_sms, 256, 0, stream>>>(params);
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
