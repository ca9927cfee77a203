// The fused epilogues of GEMM1 and the backward's u GEMM as passes over the float32 rows that
// Hopper's grouped GEMMs (grouped_gemm_sm90.cu) write: a warp per (scratch row of the chunk,
// slice of expert_gemm's N tile), with the row math expert_gemm.cu's epilogues use
// (pair_rows.cuh).
#include <algorithm>

#include <cutlass/numeric_types.h>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/kernel_residency.cuh"
#include "cuda/pair_rows.cuh"
#include "cuda/token_grid.cuh"

namespace ccf::cuda {
namespace {

// Scratch row `row` of the chunk, in M-tile `tile` of the list (before its end): its group and
// list position; false for a row that holds no pair of this pass (a tile's padding, or from
// another source).
__device__ bool row_pair(const GemmParams& p, int64_t row, int64_t tile, int32_t* group,
                         int64_t* pos) {
  const int32_t g = group_of_tile(p, tile);
  const int64_t index = (tile - p.tile_offset[g]) * p.tile_m + row % p.tile_m;
  if (p.group_expert[g] < 0 || index >= p.group_end[g] - p.group_begin[g]) return false;
  *group = g;
  *pos = p.group_begin[g] + index;
  return p.only_source == kAllSources || p.items[*pos].source == p.only_source;
}

// body(row, slice, group, pos) for each (scratch row, slice of `slices`) whose row holds a pair
// of the pass, a warp at a time, over a grid that fills the GPU once. A warp's rows ascend, so it
// stops at the first past the list's tiles: the handler runs as many chunks as the worst case
// needs, and one past the list's end then costs its pass a few microseconds, where a warp per
// (row, slice) cost a launch of the chunk's size. Warp-uniform.
template <class Body>
__device__ __forceinline__ void for_each_row_slice(const GemmParams& p, int32_t slices,
                                                   Body body) {
  const int64_t items = p.chunk.rows(p.tile_m) * slices;
  const int64_t warps = int64_t{gridDim.x} * kTokenWarps;
  for (int64_t item = warp_token(); item < items; item += warps) {
    const int64_t row = item / slices;
    const int64_t tile = p.chunk.first_tile() + row / p.tile_m;
    if (tile >= p.tile_offset[p.num_groups]) return;
    int32_t group;
    int64_t pos;
    if (row_pair(p, row, tile, &group, &pos))
      body(row, static_cast<int32_t>(item - row * slices), group, pos);
  }
}

__host__ __device__ __forceinline__ int32_t slices_of(const GemmParams& p, int32_t columns) {
  return (p.n + columns - 1) / columns;
}

}  // namespace

// kVector columns a lane at a time: a warp per row alone, or a column a lane, leaves the GPU
// waiting on each warp's loads (on an H200 the backward pass moved ~0.3 TB/s a warp per row; a
// column a lane, its bytes over its time at Qwen3-30B-A3B's shape come to ~1.9 TB/s).
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads)
    activate_rows(const __grid_constant__ RowPass q, int32_t columns) {
  const GemmParams& p = q.gemm;
  const int lane = threadIdx.x % 32;
  for_each_row_slice(p, slices_of(p, columns),
                     [&](int64_t row, int32_t slice, int32_t group, int64_t pos) {
                       const float* c = q.rows + row * (p.n + p.n_split);
                       const int32_t begin = slice * columns;
                       activate_row<T, kVector>(
                           p, group, pos, row, begin, min(begin + columns, p.n), lane,
                           [&](int32_t j) { return Floats<kVector>::load(c + j); });
                     });
}

// The slices' partial dots are expert_gemm's N-tile partials (the combine sums them in order).
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads)
    activation_backward_rows(const __grid_constant__ RowPass q, int32_t columns) {
  const GemmParams& p = q.gemm;
  const int lane = threadIdx.x % 32;
  for_each_row_slice(p, slices_of(p, columns),
                     [&](int64_t row, int32_t slice, int32_t group, int64_t pos) {
                       const float* u = q.rows + row * p.n;
                       const int32_t begin = slice * columns;
                       const float dot = warp_sum(activation_backward_row<T, kVector>(
                           p, group, pos, row, begin, min(begin + columns, p.n), lane,
                           [&](int32_t j) { return Floats<kVector>::load(u + j); }));
                       if (lane == 0) p.dot_partial[row * p.num_partials + slice] = dot;
                     });
}

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
