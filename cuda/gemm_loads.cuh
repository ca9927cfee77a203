// expert_gemm's loads of its operands into shared memory: a cp.async a 16-byte vector (4-byte
// for float32 on CUDA cores), each thread's as CuTe's copy partitions give them, from the memory
// rows the tile's row and column maps name (gemm_units.cuh).
//
// A header so that host code runs them as well: tests/gemm_layouts.cu loads stages of every
// configuration and operand layout, from pair rows and from experts' weights on several
// devices, with partial tiles, and checks each element against the operands' layouts
// (api.cuh's GemmOperand).
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

#include "cuda/api.cuh"
#include "cuda/gemm_units.cuh"

namespace ccf::cuda {

// A valid, aligned global address for predicated-off cp.async (which then reads 0 bytes).
static __device__ uint4 zero_fill_source;

// Where a thread's vectors of one operand come from during one tile, worked out when the tile
// starts: looked up per 16-byte vector and k-tile (row source, peer table), it left the k-loop
// issue-bound. A K-major vector keeps its memory row for the whole tile; an MN-major operand's
// memory row is the k index, one stride from the tile's first.
template <class T, Major kMajor, int kRows>
struct OperandRows {
  const T* row[kRows];  // the memory row of the thread's i-th vector; null outside the tile
};

template <class T, int kRows>
struct OperandRows<T, Major::kMN, kRows> {
  const T* base;  // row k at base + k * ld
};

template <class Config, Major kMajor, class MnMap, class CoordTensor>
__device__ __forceinline__ auto operand_rows(const GemmParams& p, const GemmOperand& op,
                                             const GemmTile& tile, const MnMap& mn,
                                             const CoordTensor& tXcX) {
  using T = typename Config::Element;
  constexpr int kRows = decltype(cute::size<1>(tXcX))::value;
  OperandRows<T, kMajor, kRows> rows;
  if constexpr (kMajor == Major::kK) {
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int32_t at = cute::get<0>(tXcX(0, i, 0));  // the same for every vector along k
      rows.row[i] = mn.valid(at) ? operand_row<T>(op, p, tile, mn.index(at)) : nullptr;
    }
  } else {
    rows.base = operand_row<T>(op, p, tile, 0);
  }
  return rows;
}

// Issues the cp.async of one k-tile of one operand into one pipeline stage. `tXsX` and `tXcX`
// are the thread's (CPY,CPY_MN,CPY_K) partitions of the smem stage and of the tile's (mn, k)
// coordinates; `mn` maps tile-relative M/N indices to operand indices, `rows` is what
// operand_rows found for the tile.
template <class Config, Major kMajor, class MnMap, class Rows, class SmemTensor,
          class CoordTensor>
__device__ __forceinline__ void load_operand(const GemmParams& p, const GemmOperand& op,
                                             const GemmTile& tile, const MnMap& mn,
                                             const Rows& rows, int32_t k0, SmemTensor&& tXsX,
                                             const CoordTensor& tXcX) {
  using T = typename Config::Element;
  using Vector = typename Config::G2SVector;
  CUTE_UNROLL
  for (int i = 0; i < cute::size<1>(tXsX); ++i) {
    CUTE_UNROLL
    for (int j = 0; j < cute::size<2>(tXsX); ++j) {
      const auto coord = tXcX(0, i, j);  // (mn, k) of the vector's first element
      const int32_t k = k0 + cute::get<1>(coord);
      const void* src = &zero_fill_source;
      bool valid;
      if constexpr (kMajor == Major::kK) {
        valid = rows.row[i] != nullptr && k < tile.k_extent;
        if (valid) src = rows.row[i] + k;
      } else {
        valid = mn.valid(cute::get<0>(coord)) && k < tile.k_extent;
        if (valid) src = rows.base + k * op.ld + mn.index(cute::get<0>(coord));
      }
      Config::G2SOp::copy(*static_cast<const Vector*>(src),
                          *reinterpret_cast<Vector*>(&tXsX(0, i, j)), valid);
    }
  }
}

}  // namespace ccf::cuda
