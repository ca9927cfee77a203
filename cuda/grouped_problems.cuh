// What Hopper's grouped GEMMs (grouped_gemm_sm90.cu) read from device memory instead of a host
// round trip: each group's problem extents, its operands' addresses and their row pitches,
// written a thread a group before the GEMM runs (build_problems, build_reduction_problems); and
// finish_carry, which stores a weight gradient whose rows crossed chunk edges once its sum is
// whole. Apart from the CUTLASS kernels, so that host code runs them: tests/row_passes.cu and
// tests/weight_gradient_chunks.cu, with a model of the grouped GEMM over these arrays
// (tests/grouped_gemm_model.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/detail/layout.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/layout/matrix.h>

#include "cuda/api.cuh"
#include "cuda/config.cuh"
#include "cuda/gemm_units.cuh"
#include "cuda/pair_rows.cuh"

namespace ccf::cuda {

using GroupedProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using GroupedProblem = GroupedProblemShape::UnderlyingProblemShape;  // (M, N, K)

constexpr int kProblemThreads = 128;  // build_problems, build_reduction_problems: a group each
constexpr int kFinishThreads = 256;   // finish_carry: a row's columns

// A grouped GEMM's operands. A: [M, K], K-major (Major::kK, cutlass's RowMajor A: pair rows) or
// M-major (Major::kMN, ColumnMajor: pair rows read as their transpose). B: [K, N], N-major
// (Major::kMN, RowMajor: an expert's weights as stored, or pair rows) or K-major (Major::kK,
// ColumnMajor: the weights transposed). D: [M, N] rows of ElementD = acc + beta * C, C (void:
// none) laid out as D. The strides are CUTLASS 3's of A (M, K, L), B (N, K, L) and D (M, N, L)
// for those layouts, as its builders make them (grouped_gemm_sm90.cu asserts its kernels take
// the same).
template <class T, Major kAMajor, Major kBMajor, class ElementD, class ElementC = void>
struct GroupedOperands {
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
  using LayoutD = cutlass::layout::RowMajor;
  using StrideA = cute::remove_pointer_t<cutlass::detail::TagToStrideA_t<LayoutA*>>;
  using StrideB = cute::remove_pointer_t<cutlass::detail::TagToStrideB_t<LayoutB*>>;
  using StrideD = cute::remove_pointer_t<cutlass::detail::TagToStrideC_t<LayoutD*>>;
};

// The per-group arrays the kernel reads, carved from the front of the workspace; the CUTLASS
// kernel's own workspace follows.
template <class G>
struct GroupArrays {
  static_assert(sizeof(typename G::StrideA) == 8 && sizeof(typename G::StrideB) == 8 &&
                    sizeof(typename G::StrideD) == 8,
                "strides of one dynamic int64 mode");
  GroupedProblem* problems;
  const typename G::Element** a;
  const typename G::Element** b;
  typename G::Output** d;
  const typename G::Output** c;  // CarryGemm's C: D's rows (in place)
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  void* kernel_workspace;

  static int64_t bytes(int32_t groups) {
    const int64_t per_group = sizeof(GroupedProblem) + 4 * sizeof(void*) +
                              sizeof(typename G::StrideA) + sizeof(typename G::StrideB) +
                              sizeof(typename G::StrideD);
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
    w.problems = take(static_cast<GroupedProblem*>(nullptr), groups);
    w.kernel_workspace = static_cast<char*>(workspace) + bytes(groups);
    return w;
  }
};

// An operand's stride: its one dynamic mode, the pitch of its rows in memory, is `ld`.
template <class Stride>
__device__ Stride row_pitch(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<
                    std::remove_cv_t<std::remove_reference_t<decltype(cute::get<0>(s))>>>::value)
    cute::get<1>(s) = ld;
  else
    cute::get<0>(s) = ld;
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
__global__ void __launch_bounds__(kProblemThreads) build_problems(
    const __grid_constant__ GemmParams p, GroupArrays<G> w) {
  using T = typename G::Element;
  const int32_t g = blockIdx.x * kProblemThreads + threadIdx.x;
  if (g >= p.num_groups) return;
  const int32_t expert = p.group_expert[g];
  const ChunkRows rows = group_rows_in_chunk(p, g);
  w.problems[g] = GroupedProblem(rows.rows, p.n, p.k);
  w.a[g] = static_cast<const T*>(p.a.data) + rows.first * p.a.ld;
  w.d[g] = static_cast<typename G::Output*>(p.out) + rows.first * p.out_ld;
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
__global__ void __launch_bounds__(kProblemThreads) build_reduction_problems(
    const __grid_constant__ GemmParams p, GroupArrays<G> w) {
  using T = typename G::Element;
  const int32_t g = blockIdx.x * kProblemThreads + threadIdx.x;
  if (g >= p.num_groups) return;
  const ReductionRows rows = reduction_rows(p, g);  // CarryGemm's launches are the carried parts
  w.problems[g] = rows.rows > 0 ? GroupedProblem(p.m, p.n, static_cast<int>(rows.rows))
                                : GroupedProblem(0, p.n, 0);
  w.a[g] = static_cast<const T*>(p.a.data) + rows.first * p.a.ld;
  w.b[g] = static_cast<const T*>(p.b.data) + rows.first * p.b.ld;
  if constexpr (G::kReadsC) {
    w.d[g] = p.carry;
    w.c[g] = p.carry;
    store_strides(p, w, g, p.n);
  } else {
    w.d[g] = static_cast<typename G::Output*>(p.out) + g * p.out_expert_stride;
    store_strides(p, w, g, p.out_ld);
  }
}

// After kContinued's GEMM: where its group's rows end in this chunk, its sum, now whole in
// carry, into the expert's output in the input dtype.
template <class T>
__global__ void __launch_bounds__(kFinishThreads) finish_carry(
    const __grid_constant__ GemmParams p) {
  const int32_t g = finished_carry(p);
  if (g < 0) return;
  T* out = static_cast<T*>(p.out) + g * p.out_expert_stride;
  // A block a row at a time: coalesced both sides, and no division per element.
  for (int64_t row = blockIdx.x; row < p.m; row += gridDim.x) {
    const float* from = p.carry + row * p.n;
    T* to = out + row * p.out_ld;
    for (int32_t col = threadIdx.x; col < p.n; col += kFinishThreads) to[col] = T(from[col]);
  }
}

}  // namespace ccf::cuda
