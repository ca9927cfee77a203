// The fused epilogues of GEMM1 and the backward's u GEMM as passes over the float32 rows that
// Hopper's grouped GEMMs (grouped_gemm_sm90.cu) write: one warp per scratch row of the chunk and
// slice of expert_gemm's N tile, with the row math expert_gemm.cu's epilogues use (pair_rows.cuh).
#include <cutlass/numeric_types.h>

#include "cuda/api.cuh"
#include "cuda/exception.cuh"
#include "cuda/pair_rows.cuh"
#include "cuda/token_grid.cuh"

namespace ccf::cuda {
namespace {

// Scratch row `row` of the chunk: its group and list position; false for a row that holds no
// pair of this pass (a tile's padding, past the list's tiles, or from another source).
__device__ bool row_pair(const GemmParams& p, int64_t row, int32_t* group, int64_t* pos) {
  const int64_t tile = p.chunk.first_tile() + row / p.tile_m;
  if (tile >= p.tile_offset[p.num_groups]) return false;
  const int32_t g = group_of_tile(p, tile);
  const int64_t index = (tile - p.tile_offset[g]) * p.tile_m + row % p.tile_m;
  if (p.group_expert[g] < 0 || index >= p.group_end[g] - p.group_begin[g]) return false;
  *group = g;
  *pos = p.group_begin[g] + index;
  return p.only_source == kAllSources || p.items[*pos].source == p.only_source;
}

}  // namespace

// One warp per (scratch row, slice of `columns` columns), kVector columns a lane at a time: a
// warp per row alone, or a column a lane, leaves the GPU waiting on each warp's loads (on an
// H200 the backward pass moved ~0.3 TB/s a warp per row; a column a lane, its bytes over its
// time at Qwen3-30B-A3B's shape come to ~1.9 TB/s).
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads)
    activate_rows(const __grid_constant__ RowPass q, int32_t columns) {
  const GemmParams& p = q.gemm;
  const int64_t row = warp_token();
  int32_t group;
  int64_t pos;
  if (row >= p.chunk.rows(p.tile_m) || !row_pair(p, row, &group, &pos)) return;  // warp-uniform
  const float* c = q.rows + row * (p.n + p.n_split);
  const int32_t begin = blockIdx.y * columns;
  activate_row<T, kVector>(p, group, pos, row, begin, min(begin + columns, p.n),
                           threadIdx.x % 32,
                           [&](int32_t j) { return Floats<kVector>::load(c + j); });
}

// The slices' partial dots are expert_gemm's N-tile partials (the combine sums them in order).
template <class T, int kVector>
__global__ void __launch_bounds__(kTokenThreads)
    activation_backward_rows(const __grid_constant__ RowPass q, int32_t columns) {
  const GemmParams& p = q.gemm;
  const int64_t row = warp_token();
  int32_t group;
  int64_t pos;
  if (row >= p.chunk.rows(p.tile_m) || !row_pair(p, row, &group, &pos)) return;  // warp-uniform
  const float* u = q.rows + row * p.n;
  const int lane = threadIdx.x % 32;
  const int32_t begin = blockIdx.y * columns;
  const float dot = warp_sum(activation_backward_row<T, kVector>(
      p, group, pos, row, begin, min(begin + columns, p.n), lane,
      [&](int32_t j) { return Floats<kVector>::load(u + j); }));
  if (lane == 0) p.dot_partial[row * p.num_partials + blockIdx.y] = dot;
}

namespace {

// Whether every row the pass reads or writes starts on a 4-column vector (16 bytes of float32,
// 4 elements of T) and the slices are whole vectors: F % 4 == 0 (n_split is F or 0) and the
// buffers aligned. The GPU path's F % 8 for 16-bit inputs and its 256-byte scratch regions make
// this the rule; the scalar pass is what remains when a buffer is not.
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

template <class T, int kVector>
void launch_rows(const RowPass& q, int32_t columns, cudaStream_t stream) {
  const dim3 blocks(token_blocks(q.gemm.chunk.rows(q.gemm.tile_m)),
                    (q.gemm.n + columns - 1) / columns);
  if (q.gemm.epilogue == Epilogue::kActivation) {
    activate_rows<T, kVector><<<blocks, kTokenThreads, 0, stream>>>(q, columns);
  } else {
    activation_backward_rows<T, kVector><<<blocks, kTokenThreads, 0, stream>>>(q, columns);
  }
}

template <class T>
cudaError_t launch_pass(const RowPass& q, int32_t columns, cudaStream_t stream) {
  if (vector_rows<T>(q, columns)) {
    launch_rows<T, 4>(q, columns, stream);
  } else {
    launch_rows<T, 1>(q, columns, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t activation_pass(DType dtype, const RowPass& pass, cudaStream_t stream) {
  const int32_t columns = expert_gemm_tile_n(dtype);
  CCF_HOST_ASSERT(pass.gemm.epilogue == Epilogue::kActivation ||
                  (pass.gemm.epilogue == Epilogue::kActivationBackward &&
                   pass.gemm.num_partials == (pass.gemm.n + columns - 1) / columns));
  if (pass.gemm.only_source == kSpanningSources) return cudaSuccess;  // as grouped_gemm
  switch (dtype) {
    case DType::kBF16: return launch_pass<cutlass::bfloat16_t>(pass, columns, stream);
    case DType::kF16: return launch_pass<cutlass::half_t>(pass, columns, stream);
    case DType::kF32: break;
  }
  return cudaErrorNotSupported;
}

}  // namespace ccf::cuda
