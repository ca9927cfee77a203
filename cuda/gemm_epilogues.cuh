// expert_gemm's epilogues: where a tile's float32 results go.
//
// The epilogue goes through shared memory: the accumulator tile is stored as float32, then each
// warp owns one row at a time and its lanes walk the columns, so stores are coalesced, gated
// activations find the gate and up halves of a row side by side, and row reductions (the
// d_expert_weights partial dot) have a fixed order.
//
// A header so that host code runs them as well: tests/row_passes.cu checks over random work
// lists that the epilogues of the pair-row GEMMs, on the product the loads index (gemm_units.cuh's
// maps), write the bytes the activation passes write (which Hopper's grouped GEMMs use
// instead), and tests/weight_gradient_chunks.cu that the weight gradients' carries and stores
// leave each element its exact sum, written once.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/api.cuh"
#include "cuda/gemm_units.cuh"
#include "cuda/pair_rows.cuh"

namespace ccf::cuda {

// kPairReduction: the tile of the group's float32 sum that an earlier chunk left in `carry`,
// into sC (zeros outside the output, whose accumulators are never stored).
template <class Config, class SmemC>
__device__ void load_carry(const GemmParams& p, const GemmTile& tile, SmemC& sC) {
  constexpr int kTileM = Config::kTileM, kTileN = Config::kTileN, kWarps = Config::kThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kTileM; r += kWarps) {
    const int32_t row = tile.m0 + r;
    for (int c = lane; c < kTileN; c += 32) {
      const int32_t j = tile.n_tile * kTileN + c;
      sC(r, c) = row < p.m && j < p.n ? p.carry[static_cast<int64_t>(row) * p.n + j] : 0.0f;
    }
  }
}

// The epilogues each operand layout serves, so that a kernel compiles only its own: the forward
// GEMMs and the backward recompute of h are (K, MN), the backward u and dx GEMMs (K, K), the
// weight gradients (MN, MN).
template <Major kAMajor, Major kBMajor>
constexpr bool serves(Epilogue e) {
  if (kAMajor == Major::kMN) return e == Epilogue::kStoreExpert;
  if (kBMajor == Major::kK) return e == Epilogue::kActivationBackward || e == Epilogue::kStoreF32;
  return e == Epilogue::kActivation || e == Epilogue::kStoreF32;
}

// Tile row r's columns, as they are (NaN with `nan`), into out[j] (j = the columns' N index),
// cast to Out.
template <int kTileN, class Out, class SmemC>
__device__ __forceinline__ void store_row(Out* out, const GemmParams& p, const GemmTile& tile,
                                          const SmemC& sC, int r, int lane, bool nan = false) {
  for (int c = lane; c < kTileN; c += 32) {
    const int32_t j = tile.n_tile * kTileN + c;
    if (j >= p.n) break;
    out[j] = Out(nan ? NAN : sC(r, c));
  }
}

template <class Config, class SmemC>
__device__ void epilogue(const GemmParams& p, const GemmTile& tile, const SmemC& sC) {
  using T = typename Config::Element;
  constexpr int kTileM = Config::kTileM, kTileN = Config::kTileN, kWarps = Config::kThreads / 32;
  constexpr Major kA = Config::kAMajor, kB = Config::kBMajor;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kTileM; r += kWarps) {
    const int32_t row = tile.m0 + r;
    if (row >= tile.m_extent) break;  // rows ascend with r
    // kPairRows: the row's pair in the list, and its row in the chunk's scratch.
    const int64_t pos = static_cast<int64_t>(tile.pair_begin) + row;
    const int64_t srow = tile.row_begin + row;
    switch (p.epilogue) {
      case Epilogue::kActivation:
        if constexpr (serves<kA, kB>(Epilogue::kActivation)) {
          // Gate column j at tile column j - base, up column n_split + j beside it, cols on.
          const int32_t cols = columns_per_tile<kTileN>(p), base = tile.n_tile * cols;
          activate_row<T, 1>(p, tile.group, pos, srow, base, min(base + cols, p.n), lane,
                             [&](int32_t j) {
                               return Floats<1>{{p.n_split != 0 && j >= p.n_split
                                                     ? sC(r, j - p.n_split - base + cols)
                                                     : sC(r, j - base)}};
                             });
        }
        break;
      case Epilogue::kStoreF32:
        if constexpr (serves<kA, kB>(Epilogue::kStoreF32)) {
          store_row<kTileN>(static_cast<float*>(p.out) + srow * p.out_ld, p, tile, sC, r, lane);
        }
        break;
      case Epilogue::kActivationBackward:
        if constexpr (serves<kA, kB>(Epilogue::kActivationBackward)) {
          const int32_t base = tile.n_tile * kTileN;
          const float dot = warp_sum(activation_backward_row<T, 1>(
              p, tile.group, pos, srow, base, min(base + kTileN, p.n), lane,
              [&](int32_t j) { return Floats<1>{{sC(r, j - base)}}; }));
          if (lane == 0) p.dot_partial[srow * p.num_partials + tile.n_tile] = dot;
        }
        break;
      case Epilogue::kStoreExpert:
        if constexpr (serves<kA, kB>(Epilogue::kStoreExpert)) {
          if (tile.store_carry) {  // the group goes on in a later chunk
            store_row<kTileN>(p.carry + static_cast<int64_t>(row) * p.n, p, tile, sC, r, lane);
          } else if (p.partials[0] != nullptr) {  // a plan: float32 into the slot's partial
            const int32_t local = tile.expert % p.experts_per_device;
            float* out = p.partials[tile.expert / p.experts_per_device] +
                         (static_cast<int64_t>(local) * p.plan_slots +
                          tile.group % p.plan_slots) * p.partial_stride +
                         p.partial_offset + static_cast<int64_t>(row) * p.out_ld;
            store_row<kTileN>(out, p, tile, sC, r, lane);
          } else {  // after an aborted barrier no group has rows: NaN, not zeros that look summed
            store_row<kTileN>(static_cast<T*>(p.out) + tile.group * p.out_expert_stride +
                                  static_cast<int64_t>(row) * p.out_ld,
                              p, tile, sC, r, lane, p.aborted != nullptr && *p.aborted != 0);
          }
        }
        break;
    }
  }
}

}  // namespace ccf::cuda
