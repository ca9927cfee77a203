// Grouped GEMMs over the work list, one group per expert, with fused epilogues. CuTe builds the
// tiles, copies and MMAs (SM80 style: cp.async multistage pipeline, ldmatrix + mma.sync for
// bf16/f16, which also runs on sm_90a; SIMT FMA for float32, or TF32 mma.sync where a call opts
// in).
//
// Every operand is a row-major matrix in memory: an expert's weight matrix (its owner's, which
// is a peer's for a helper of a reassignment plan) or the pairs' rows in work-list order (the
// fetched x and dy, dispatch.cu, or an earlier GEMM's output). The gmem->smem copy looks up its
// rows once per tile (operand_rows, gemm_loads.cuh, by gemm_units.cuh's row and column maps);
// everything after it is a plain CuTe tile pipeline up to the epilogues (gemm_epilogues.cuh).
//
// A persistent grid walks the tiles: (M-tile of a group's pairs, N-tile) for GemmShape::
// kPairRows, whose count is only known on the device (work_list.cu's tile_offset), and
// (group, M-tile, N-tile) for kPairReduction (weight gradients: the reduction runs over the
// group's pairs in work-list order, so it is deterministic). A group is an expert, or with a
// reassignment plan one plan slot of an expert. A launch covers one chunk of the list's M-tiles
// (GemmParams::chunk), whose rows the scratch holds; a weight gradient whose group runs on into
// the next chunk leaves its float32 sum in `carry` and goes on from there.
//
// A header so that host code runs the kernel as well: tests/expert_gemm_tiles.cu runs it whole,
// a block's threads as fibers, with host stand-ins for cp.async, ldmatrix and mma.sync.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>

#include "cuda/api.cuh"
#include "cuda/gemm_config.cuh"
#include "cuda/gemm_epilogues.cuh"
#include "cuda/gemm_loads.cuh"
#include "cuda/gemm_units.cuh"
#include "cuda/pair_rows.cuh"

namespace ccf::cuda {

// TF32 operands: each float32 rounded to the nearest TF32 (the tensor cores would drop its low 13
// bits, a bias toward zero). Other operand types pass as they are.
template <class Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment&& f) {
  using cute::tfloat32_t;
  if constexpr (std::is_same_v<typename std::decay_t<Fragment>::value_type, tfloat32_t>) {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(f); ++i) {
      uint32_t bits;
#if defined(__CUDA_ARCH__)
      asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(__uint_as_float(f(i).raw())));
#else  // host code: the same rounding of the 13 low bits, to nearest, ties away from zero
      bits = (f(i).raw() + 0x1000u) & 0xffffe000u;
#endif
      f(i) = tfloat32_t::bitcast(bits);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel.

template <class Config>
__global__ void __launch_bounds__(Config::kThreads)
    expert_gemm(const __grid_constant__ GemmParams p) {
  using namespace cute;
  using namespace gemm_config;
  using T = typename Config::Element;
  using Traits = GemmTraits<Config>;
  using TiledMma = typename Config::TiledMma;
  constexpr int kTileM = Config::kTileM, kTileN = Config::kTileN, kTileK = Config::kTileK;
  constexpr int kStages = Config::kStages;
  using SmemLayoutA = typename Config::SmemLayoutA;
  using SmemLayoutB = typename Config::SmemLayoutB;
  using SmemLayoutC = typename Traits::SmemLayoutC;

  CUTE_STATIC_ASSERT_V(size(TiledMma{}) == Int<Config::kThreads>{});
  CUTE_STATIC_ASSERT_V(size(typename Config::G2SCopyA{}) == Int<Config::kThreads>{});
  CUTE_STATIC_ASSERT_V(size(typename Config::G2SCopyB{}) == Int<Config::kThreads>{});
  CUTE_STATIC_ASSERT_V(size<0>(SmemLayoutA{}) == Int<kTileM>{});  // BLK_M
  CUTE_STATIC_ASSERT_V(size<0>(SmemLayoutB{}) == Int<kTileN>{});  // BLK_N
  CUTE_STATIC_ASSERT_V(size<1>(SmemLayoutA{}) == Int<kTileK>{});  // BLK_K
  CUTE_STATIC_ASSERT_V(size<1>(SmemLayoutB{}) == Int<kTileK>{});  // BLK_K
  static_assert(kStages >= 2, "the pipeline needs a stage to fill while one is read");
  static_assert(kTileN % 64 == 0, "gated halves hold whole 16-byte vectors and 32-lane rows");
  static_assert(Config::kThreads % 32 == 0, "the epilogue works in warps");
  static_assert(kTileM % kTileK == 0, "a chunk's edge, whole M-tiles, is whole k-tiles");

  extern __shared__ __align__(128) uint8_t smem[];
  T* smem_a = reinterpret_cast<T*>(smem);
  Tensor sA = make_tensor(make_smem_ptr(smem_a), SmemLayoutA{});                            // (BLK_M,BLK_K,PIPE)
  Tensor sB = make_tensor(make_smem_ptr(smem_a + cosize_v<SmemLayoutA>), SmemLayoutB{});   // (BLK_N,BLK_K,PIPE)
  Tensor sC = make_tensor(make_smem_ptr(reinterpret_cast<float*>(smem)), SmemLayoutC{});   // (BLK_M,BLK_N)

  // gmem -> smem partitions, with the (mn, k) coordinate of every element.
  typename Config::G2SCopyA g2s_copy_a;
  ThrCopy g2s_a = g2s_copy_a.get_thread_slice(threadIdx.x);
  Tensor tAsA = g2s_a.partition_D(sA);                                                      // (CPY,CPY_M,CPY_K,PIPE)
  Tensor tAcA = g2s_a.partition_D(make_identity_tensor(Shape<Int<kTileM>, Int<kTileK>>{}));  // (CPY,CPY_M,CPY_K)
  typename Config::G2SCopyB g2s_copy_b;
  ThrCopy g2s_b = g2s_copy_b.get_thread_slice(threadIdx.x);
  Tensor tBsB = g2s_b.partition_D(sB);                                                      // (CPY,CPY_N,CPY_K,PIPE)
  Tensor tBcB = g2s_b.partition_D(make_identity_tensor(Shape<Int<kTileN>, Int<kTileK>>{}));  // (CPY,CPY_N,CPY_K)
  static_assert(decltype(size<0>(tAsA))::value * sizeof(T) == sizeof(typename Config::G2SVector),
                "one cp.async per A vector");
  static_assert(decltype(size<0>(tBsB))::value * sizeof(T) == sizeof(typename Config::G2SVector),
                "one cp.async per B vector");

  // MMA partitions and the smem -> register copies that feed them.
  TiledMma mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));                   // (MMA,MMA_M,MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));                   // (MMA,MMA_N,MMA_K)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kTileM>, Int<kTileN>>{});  // (MMA,MMA_M,MMA_N)
  Tensor tCsC = thr_mma.partition_C(sC);                                     // (MMA,MMA_M,MMA_N)
  CUTE_STATIC_ASSERT_V(size(acc) == size(tCsC));

  TiledCopy s2r_copy_a = make_tiled_copy_A(typename Config::S2RAtomA{}, mma);
  ThrCopy s2r_a = s2r_copy_a.get_thread_slice(threadIdx.x);
  Tensor tXsA = s2r_a.partition_S(sA);  // (CPY,MMA_M,MMA_K,PIPE)
  Tensor tXrA = s2r_a.retile_D(tCrA);   // (CPY,MMA_M,MMA_K)
  TiledCopy s2r_copy_b = make_tiled_copy_B(typename Config::S2RAtomB{}, mma);
  ThrCopy s2r_b = s2r_copy_b.get_thread_slice(threadIdx.x);
  Tensor tXsB = s2r_b.partition_S(sB);  // (CPY,MMA_N,MMA_K,PIPE)
  Tensor tXrB = s2r_b.retile_D(tCrB);   // (CPY,MMA_N,MMA_K)
  constexpr int kBlocksK = decltype(size<2>(tCrA))::value;

  const int64_t units = num_units<kTileM, kTileN>(p);
  for (int64_t unit = next_unit<kTileM, kTileN>(p, blockIdx.x, units, gridDim.x); unit < units;
       unit = next_unit<kTileM, kTileN>(p, unit + gridDim.x, units, gridDim.x)) {
    const GemmTile tile = decode_tile<kTileM, kTileN>(p, unit);
    if (!tile_in_launch<kTileM>(p, tile)) continue;  // the same for the whole CTA
    const RowMap a_rows{tile.m0, tile.m_extent};
    ColumnMap b_cols;
    b_cols.half = columns_per_tile<kTileN>(p);
    b_cols.base = tile.n_tile * b_cols.half;
    b_cols.split = p.n_split;
    b_cols.extent = p.n;
    const auto a_src = operand_rows<Config, Config::kAMajor>(p, p.a, tile, a_rows, tAcA);
    const auto b_src = operand_rows<Config, Config::kBMajor>(p, p.b, tile, b_cols, tBcB);
    auto load_stage = [&](int k_tile, int stage) {
      load_operand<Config, Config::kAMajor>(p, p.a, tile, a_rows, a_src, k_tile * kTileK,
                                            tAsA(_, _, _, stage), tAcA);
      load_operand<Config, Config::kBMajor>(p, p.b, tile, b_cols, b_src, k_tile * kTileK,
                                            tBsB(_, _, _, stage), tBcB);
    };

    clear(acc);
    if constexpr (serves<Config::kAMajor, Config::kBMajor>(Epilogue::kStoreExpert)) {
      if (tile.load_carry) {
        load_carry<Config>(p, tile, sC);
        __syncthreads();
        CUTE_UNROLL
        for (int i = 0; i < size(acc); ++i) acc(i) = tCsC(i);
        __syncthreads();  // the pipeline's loads below overwrite sC
      }
    }
    // Main loop: kStages-1 k-tiles in flight while one is multiplied.
    const int k_tiles = ceil_div(tile.k_extent, kTileK);
    CUTE_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_fence();
    }
    for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // k_tile has landed for every thread; k_tile-1's stage is free
      const int next = k_tile + kStages - 1;
      if (next < k_tiles) load_stage(next, next % kStages);
      cp_async_fence();
      const int stage = k_tile % kStages;
      CUTE_UNROLL
      for (int k_block = 0; k_block < kBlocksK; ++k_block) {
        copy(s2r_copy_a, tXsA(_, _, k_block, stage), tXrA(_, _, k_block));
        copy(s2r_copy_b, tXsB(_, _, k_block, stage), tXrB(_, _, k_block));
        round_to_tf32(tCrA(_, _, k_block));
        round_to_tf32(tCrB(_, _, k_block));
        gemm(mma, tCrA(_, _, k_block), tCrB(_, _, k_block), acc);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the epilogue reuses the pipeline's shared memory

    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) tCsC(i) = acc(i);
    __syncthreads();
    epilogue<Config>(p, tile, sC);
    __syncthreads();  // the next tile's loads overwrite sC
  }
  // Partials went to their owners' memory: order them before this device's next barrier signal.
  if (p.partials[0] != nullptr) __threadfence_system();
}

}  // namespace ccf::cuda
