// CUTLASS 3's grouped GEMM, as cuda/grouped_gemm_sm90.cu runs it, on the host over the arrays
// cuda/grouped_problems.cuh's kernels write: for each group g whose problem (M, N, K) has M and N
// above 0, D = A B + beta C over CuTe tensors at the group's pointers with its strides, A (M, K),
// B (N, K) and C and D (M, N) (CUTLASS's modes; L, the batch, is 1), C read only where beta is not
// 0, as the epilogue reads it; C's strides are D's, as grouped_gemm_sm90.cu's `arguments` passes
// them. K = 0 stores NaN: wgmma would store an accumulator it never initialised. Used by
// tests/row_passes.cu and tests/weight_gradient_chunks.cu.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>

#include "cuda/grouped_problems.cuh"

template <class G>
void grouped_gemm_model(const ccf::cuda::GroupArrays<G>& w, int32_t groups, float beta) {
  using namespace cute;
  for (int32_t g = 0; g < groups; ++g) {
    const auto [m, n, k] = w.problems[g];
    if (m == 0 || n == 0) continue;
    const auto a = make_tensor(w.a[g], make_layout(make_shape(m, k, 1), w.stride_a[g]));
    const auto b = make_tensor(w.b[g], make_layout(make_shape(n, k, 1), w.stride_b[g]));
    const auto d = make_tensor(w.d[g], make_layout(make_shape(m, n, 1), w.stride_d[g]));
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        float acc = k == 0 ? NAN : 0.0f;
        for (int l = 0; l < k; ++l) acc += float(a(i, l, 0)) * float(b(j, l, 0));
        if constexpr (G::kReadsC) {
          const auto c = make_tensor(w.c[g], make_layout(make_shape(m, n, 1), w.stride_d[g]));
          if (beta != 0.0f) acc += beta * float(c(i, j, 0));
        }
        d(i, j, 0) = typename G::Output(acc);
      }
  }
}
