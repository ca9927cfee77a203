// The configurations of expert_gemm.cu's kernels: tile shape, pipeline depth, shared-memory
// layouts, copies and MMA of each element type and operand layout, as CuTe types. Types only, so
// host code evaluates them too: tests/gemm_layouts.cu checks each configuration's copies against
// its MMA, where no GPU runs them.
#pragma once

#include <algorithm>
#include <type_traits>

#include <cute/tensor.hpp>

#include "cuda/api.cuh"

namespace ccf::cuda::gemm_config {

using namespace cute;

template <class MnCount, int kTileK, int kStages, class Atom>
using PipelinedSmem = decltype(tile_to_shape(Atom{}, Shape<MnCount, Int<kTileK>, Int<kStages>>{}));

// What the tensor-core configurations differ in by element type: the MMA, the swizzled smem atoms
// (K-major: 8 rows of 32 elements; MN-major: k-rows of 128 B), how 128 threads lay 16-byte
// vectors over a tile, and the smem -> register copies.
//
// bf16/f16: SM80 16x8x16 MMAs. K-major rows are 64 B, their 16-byte chunks xor-swizzled by row
// pair, so the 8 rows an ldmatrix reads hit 8 distinct bank groups; MN-major k-rows hold 64
// elements. ldmatrix, transposing for MN-major tiles.
template <class T>
struct TensorCoreParts {
  using MmaOp = std::conditional_t<std::is_same_v<T, bfloat16_t>, SM80_16x8x16_F32BF16BF16F32_TN,
                                   SM80_16x8x16_F32F16F16F32_TN>;
  using MmaTile = Tile<_32, _32, _16>;
  using KMajorAtom = decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, _32>, Stride<_32, _1>>{}));
  using MnMajorAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{}));
  using KMajorThreads = Layout<Shape<_32, _4>, Stride<_4, _1>>;   // 32 rows x 4 vectors
  using MnMajorThreads = Layout<Shape<_16, _8>, Stride<_1, _16>>;  // 16 vectors x 8 k-rows
  using KMajorS2R = SM75_U32x4_LDSM_N;
  using MnMajorS2R = SM75_U16x8_LDSM_T;
};

// float32 as TF32 (opt-in, GemmParams::tf32): SM80 16x8x8 TF32 MMAs on float32 tiles, 4 floats
// a vector (H and F multiples of 4). K-major rows are 128 B, their chunks xor-swizzled by row.
// MN-major tiles have no transposing ldmatrix for 32-bit elements and go one float at a time,
// their 8-float groups xor-swizzled by k-row so that the four k-rows an MMA operand register
// spans fall in four bank groups.
template <>
struct TensorCoreParts<float> {
  using MmaOp = SM80_16x8x8_F32TF32TF32F32_TN;
  using MmaTile = Tile<_32, _32, _8>;
  using KMajorAtom = decltype(composition(Swizzle<3, 2, 3>{}, Layout<Shape<_8, _32>, Stride<_32, _1>>{}));
  using MnMajorAtom = decltype(composition(Swizzle<2, 3, 2>{}, Layout<Shape<_32, _8>, Stride<_1, _32>>{}));
  using KMajorThreads = Layout<Shape<_16, _8>, Stride<_8, _1>>;   // 16 rows x 8 vectors
  using MnMajorThreads = Layout<Shape<_32, _4>, Stride<_1, _32>>;  // 32 vectors x 4 k-rows
  using KMajorS2R = SM75_U32x4_LDSM_N;
  using MnMajorS2R = UniversalCopy<float>;
};

// Tensor cores: 128x128x32 CTA tile, 2x2 warps of SM80 MMAs (each warp 64x64), 3-stage cp.async
// pipeline of 16-byte vectors along each operand's contiguous dimension.
template <class T, Major kA, Major kB>
struct TensorCoreConfig {
  using Parts = TensorCoreParts<T>;
  using Element = T;
  static constexpr Major kAMajor = kA, kBMajor = kB;
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 32, kStages = 3, kThreads = 128;

  using TiledMma = decltype(make_tiled_mma(typename Parts::MmaOp{}, Layout<Shape<_2, _2, _1>>{},
                                           typename Parts::MmaTile{}));

  template <Major kMajor>
  using SmemAtom = std::conditional_t<kMajor == Major::kK, typename Parts::KMajorAtom,
                                      typename Parts::MnMajorAtom>;
  using SmemLayoutA = PipelinedSmem<Int<kTileM>, kTileK, kStages, SmemAtom<kAMajor>>;  // (BLK_M,BLK_K,PIPE)
  using SmemLayoutB = PipelinedSmem<Int<kTileN>, kTileK, kStages, SmemAtom<kBMajor>>;  // (BLK_N,BLK_K,PIPE)

  // gmem -> smem: one 16-byte cp.async per vector.
  using G2SVector = uint128_t;
  using G2SOp = SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<G2SVector>;
  static constexpr int kVector = int(sizeof(G2SVector) / sizeof(T));
  template <Major kMajor>
  using G2SCopy = decltype(make_tiled_copy(
      Copy_Atom<G2SOp, T>{},
      std::conditional_t<kMajor == Major::kK, typename Parts::KMajorThreads,
                         typename Parts::MnMajorThreads>{},
      std::conditional_t<kMajor == Major::kK, Layout<Shape<_1, Int<kVector>>>,
                         Layout<Shape<Int<kVector>, _1>>>{}));
  using G2SCopyA = G2SCopy<kAMajor>;
  using G2SCopyB = G2SCopy<kBMajor>;

  template <Major kMajor>
  using S2RAtom = Copy_Atom<std::conditional_t<kMajor == Major::kK, typename Parts::KMajorS2R,
                                               typename Parts::MnMajorS2R>,
                            T>;
  using S2RAtomA = S2RAtom<kAMajor>;
  using S2RAtomB = S2RAtom<kBMajor>;
};

// float32 on CUDA cores: 128x128x8 CTA tile, 16x16 threads of FMA (8x8 outputs each), 3 stages of
// 4-byte cp.async (no alignment demands beyond the element), smem always MN-major so the FMA
// operands are read along M/N without bank conflicts (padded when filled from K-major rows).
template <Major kA, Major kB>
struct SimtConfig {
  using Element = float;
  static constexpr Major kAMajor = kA, kBMajor = kB;
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 8, kStages = 3, kThreads = 256;

  using TiledMma = decltype(make_tiled_mma(UniversalFMA<float, float, float, float>{},
                                           Layout<Shape<_16, _16, _1>>{}));

  template <Major kMajor, int kRows>
  using SmemAtom = std::conditional_t<kMajor == Major::kK,
                                      Layout<Shape<Int<kRows>, Int<kTileK>>, Stride<_1, Int<kRows + 1>>>,
                                      Layout<Shape<Int<kRows>, Int<kTileK>>, Stride<_1, Int<kRows>>>>;
  using SmemLayoutA = PipelinedSmem<Int<kTileM>, kTileK, kStages, SmemAtom<kAMajor, kTileM>>;  // (BLK_M,BLK_K,PIPE)
  using SmemLayoutB = PipelinedSmem<Int<kTileN>, kTileK, kStages, SmemAtom<kBMajor, kTileN>>;  // (BLK_N,BLK_K,PIPE)

  using G2SVector = float;
  using G2SOp = SM80_CP_ASYNC_CACHEALWAYS_ZFILL<G2SVector>;
  template <Major kMajor>
  using G2SCopy = decltype(make_tiled_copy(
      Copy_Atom<G2SOp, float>{},
      std::conditional_t<kMajor == Major::kK, Layout<Shape<_32, _8>, Stride<_8, _1>>,    // 32 rows x 8 k
                         Layout<Shape<_128, _2>, Stride<_1, _128>>>{},                   // 128 mn x 2 k-rows
      Layout<Shape<_1, _1>>{}));
  using G2SCopyA = G2SCopy<kAMajor>;
  using G2SCopyB = G2SCopy<kBMajor>;

  using S2RAtomA = Copy_Atom<UniversalCopy<float>, float>;
  using S2RAtomB = Copy_Atom<UniversalCopy<float>, float>;
};

template <Major kA, Major kB>
using Tf32Config = TensorCoreConfig<float, kA, kB>;
template <Major kA, Major kB>
using Bf16Config = TensorCoreConfig<bfloat16_t, kA, kB>;
template <Major kA, Major kB>
using F16Config = TensorCoreConfig<half_t, kA, kB>;

// float32's work list and d_expert_weights partials are laid out before the kernel is picked.
static_assert(Tf32Config<Major::kK, Major::kK>::kTileM == SimtConfig<Major::kK, Major::kK>::kTileM &&
                  Tf32Config<Major::kK, Major::kK>::kTileN == SimtConfig<Major::kK, Major::kK>::kTileN,
              "float32 has one tile shape, with or without TF32");

// What every configuration shares: the float32 epilogue tile (rows padded by 4 floats) and the
// dynamic shared memory, reused by the epilogue after the main loop.
template <class Config>
struct GemmTraits {
  static constexpr int kTileM = Config::kTileM, kTileN = Config::kTileN;
  using SmemLayoutC = Layout<Shape<Int<kTileM>, Int<kTileN>>, Stride<Int<kTileN + 4>, _1>>;  // (BLK_M,BLK_N)
  static constexpr int kMainloopBytes =
      int(sizeof(typename Config::Element)) *
      int(cosize_v<typename Config::SmemLayoutA> + cosize_v<typename Config::SmemLayoutB>);
  static constexpr int kEpilogueBytes = int(sizeof(float)) * int(cosize_v<SmemLayoutC>);
  static constexpr int kSmemBytes = std::max(kMainloopBytes, kEpilogueBytes);
};

}  // namespace ccf::cuda::gemm_config
