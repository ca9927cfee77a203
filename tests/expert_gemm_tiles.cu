// Runs, on the host, cuda/expert_gemm.cuh's kernel whole, for every configuration of
// cuda/gemm_config.cuh (bfloat16, float16 and TF32 on tensor cores, float32 on CUDA cores, each
// for its three operand layouts): its persistent walk over the units, the loads into the
// pipeline's stages, the main loop's stages and k-tiles, the smem -> register copies, the MMAs,
// the carried sum's round trip and the epilogues' stores. A block's threads run as fibers
// (tests/warp_lanes.h), each block after the other, with host stand-ins for the PTX:
//   - cp.async: a synchronous copy of the vector, zeros where predicated off (so the order its
//     commit groups and waits keep is not modelled: the loads land at once);
//   - ldmatrix (.x4, and .trans for 16-bit MN-major tiles): each lane posts the address of the
//     16-byte row it points at, and takes from its warp's rows what PTX defines;
//   - mma.sync: each lane posts its registers, and computes its accumulators from its warp's,
//     each register's (m, k), (n, k) and (m, n) as CuTe's MMA_Traits lay them out; float sums,
//     exact for the small integers here in any order.
// The GEMMs over pair rows (K-major A; B an expert's weights as stored and transposed, on its
// owner) store float32 rows (kStoreF32), in one launch and in source phases; GEMM1 stores its
// activation (kActivation, gated and not: the bytes pair_rows.cuh's activate_row writes from the
// exact product); the backward's u GEMM its dh, w * a and dots (kActivationBackward, against
// activation_backward_row from the exact u); the weight
// gradients (both MN-major) store each group's gradient (kStoreExpert), over the list in one
// chunk and in chunks of one M-tile (the sum of a group that crosses a chunk edge carried in
// float32). The extents leave partial M and N tiles and a partial last k-tile after more k-tiles
// than the pipeline has stages; the operands' row pitches exceed their extents. Each output
// element must equal its exact value (in the dtype's rounding), and no other element be
// written. Prints each configuration's verdict and the number of errors; exits 1 on any.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "tests/warp_lanes.h"

// The kernel's dynamic shared memory: one copy for the fibers of the block running (blocks run
// one at a time).
#undef __shared__
#define __shared__

namespace ccf::cuda {
constexpr int kSmemCapacity = 128 * 1024;
alignas(128) uint8_t smem[kSmemCapacity];
}  // namespace ccf::cuda

using std::min;  // the kernels' min(int, int): CUDA's, which nvcc alone declares

#include "cuda/expert_gemm.cuh"

using namespace ccf;
using namespace ccf::cuda;
using namespace ccf::cuda::gemm_config;

// ---------------------------------------------------------------------------------------------
// The host's stand-ins for the kernel's PTX.

namespace host {

// What each thread of the running block posts to its warp: an ldmatrix row's address, or its
// MMA registers.
inline const void* posted[lanes::kMaxThreads];

// ldmatrix .x4: lanes 8j..8j+7 point at the rows of matrix j; lane l's register j holds word
// l % 4 of row l / 4 of matrix j, or with .trans (16-bit elements) the elements in column l / 4
// of rows 2 (l % 4) and 2 (l % 4) + 1.
template <class Op, bool kTrans>
struct Ldmatrix : Op {
  static void copy(const cute::uint128_t& row, uint32_t& d0, uint32_t& d1, uint32_t& d2,
                   uint32_t& d3) {
    const int t = threadIdx.x, lane = t % 32, warp = t - lane;
    posted[t] = &row;
    __syncwarp();
    uint32_t* d[4] = {&d0, &d1, &d2, &d3};
    for (int j = 0; j < 4; ++j) {
      if constexpr (kTrans) {
        const auto* lo = static_cast<const uint16_t*>(posted[warp + 8 * j + 2 * (lane % 4)]);
        const auto* hi = static_cast<const uint16_t*>(posted[warp + 8 * j + 2 * (lane % 4) + 1]);
        *d[j] = uint32_t{lo[lane / 4]} | uint32_t{hi[lane / 4]} << 16;
      } else {
        *d[j] = static_cast<const uint32_t*>(posted[warp + 8 * j + lane / 4])[lane % 4];
      }
    }
    __syncwarp();  // the rows stay posted until every lane has read them
  }
};

// mma.sync of the m16n8 shapes here: four accumulators, four A and two B registers a lane.
template <class Op>
struct Mma : Op {
  using Traits = cute::MMA_Traits<Op>;
  using TA = typename Traits::ValTypeA;
  using TB = typename Traits::ValTypeB;
  static constexpr int kM = cute::size<0>(typename Traits::Shape_MNK{});
  static constexpr int kN = cute::size<1>(typename Traits::Shape_MNK{});
  static constexpr int kK = cute::size<2>(typename Traits::Shape_MNK{});
  static constexpr int kValuesA = 4 * 4 / int(sizeof(TA)), kValuesB = 2 * 4 / int(sizeof(TB));
  static_assert(sizeof(typename Op::ARegisters) == 16 && sizeof(typename Op::BRegisters) == 8 &&
                    sizeof(typename Op::CRegisters) == 16,
                "the m16n8 register counts");

  struct Registers {
    uint32_t a[4], b[2];
  };

  // The (lane, value) that holds each element of A (M, K) and B (N, K).
  struct Owners {
    std::pair<int, int> a[kM][kK], b[kN][kK];
    Owners() {
      for (int t = 0; t < 32; ++t) {
        for (int v = 0; v < kValuesA; ++v) {
          const int i = typename Traits::ALayout{}(t, v);
          a[i % kM][i / kM] = {t, v};
        }
        for (int v = 0; v < kValuesB; ++v) {
          const int i = typename Traits::BLayout{}(t, v);
          b[i % kN][i / kN] = {t, v};
        }
      }
    }
  };

  static void fma(float& d0, float& d1, float& d2, float& d3, const uint32_t& a0,
                  const uint32_t& a1, const uint32_t& a2, const uint32_t& a3, const uint32_t& b0,
                  const uint32_t& b1, const float& c0, const float& c1, const float& c2,
                  const float& c3) {
    static const Owners owners;
    const int t = threadIdx.x, lane = t % 32, warp = t - lane;
    const Registers mine{{a0, a1, a2, a3}, {b0, b1}};
    posted[t] = &mine;
    __syncwarp();
    const auto a = [&](int m, int k) {
      const auto [from, v] = owners.a[m][k];
      return float(reinterpret_cast<const TA*>(
          static_cast<const Registers*>(posted[warp + from])->a)[v]);
    };
    const auto b = [&](int n, int k) {
      const auto [from, v] = owners.b[n][k];
      return float(reinterpret_cast<const TB*>(
          static_cast<const Registers*>(posted[warp + from])->b)[v]);
    };
    const float c[4] = {c0, c1, c2, c3};
    float d[4];
    for (int v = 0; v < 4; ++v) {
      const int i = typename Traits::CLayout{}(lane, v);
      d[v] = c[v];
      for (int k = 0; k < kK; ++k) d[v] += a(i % kM, k) * b(i / kM, k);
    }
    __syncwarp();  // every lane has read the registers posted
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};

template <class Op>
struct OnHostMma {
  using type = Mma<Op>;
};
template <class... Types>
struct OnHostMma<cute::UniversalFMA<Types...>> {  // plain C++ already
  using type = cute::UniversalFMA<Types...>;
};

template <class Atom>
struct OnHostCopy {
  using type = Atom;  // UniversalCopy: plain C++ already
};
template <class T>
struct OnHostCopy<cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, T>> {
  using type = cute::Copy_Atom<Ldmatrix<cute::SM75_U32x4_LDSM_N, false>, T>;
};
template <class T>
struct OnHostCopy<cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, T>> {
  using type = cute::Copy_Atom<Ldmatrix<cute::SM75_U16x8_LDSM_T, true>, T>;
};

template <class TiledMma>
struct OnHostTiledMma;
template <class Op, class Atoms, class Permutation>
struct OnHostTiledMma<cute::TiledMMA<cute::MMA_Atom<Op>, Atoms, Permutation>> {
  using type = cute::TiledMMA<cute::MMA_Atom<typename OnHostMma<Op>::type>, Atoms, Permutation>;
};

// `Config` with the stand-ins: the same tiles, layouts and partitions.
template <class Config>
struct OnHost : Config {
  struct G2SOp {  // cp.async with its zero fill
    template <class Vector>
    static void copy(const Vector& src, Vector& dst, bool valid) {
      if (valid) std::memcpy(&dst, &src, sizeof(Vector));
      else std::memset(&dst, 0, sizeof(Vector));
    }
  };
  using TiledMma = typename OnHostTiledMma<typename Config::TiledMma>::type;
  using S2RAtomA = typename OnHostCopy<typename Config::S2RAtomA>::type;
  using S2RAtomB = typename OnHostCopy<typename Config::S2RAtomB>::type;
};

}  // namespace host

namespace cute {
template <class Op>
struct MMA_Traits<host::Mma<Op>> : MMA_Traits<Op> {};
template <class Op, bool kTrans>
struct Copy_Traits<host::Ldmatrix<Op, kTrans>> : Copy_Traits<Op> {};
}  // namespace cute

// ---------------------------------------------------------------------------------------------
// The check.

namespace {

int errors = 0;

void expect(bool ok, const std::string& where, const char* what) {
  if (!ok && errors++ < 20) std::printf("  %s: %s\n", where.c_str(), what);
}

// A work list of four groups: one row, a whole M-tile and two more rows, none, and a partial
// tile; their experts (2 to 5) are devices 1 and 2's, two a device. Pairs lie in scratch rows
// from their group's first tile on. A group's pairs come from sources 0, 1 and 2 in turn (a
// third each), so one tile's rows come from one source and others' from several.
struct List {
  static constexpr int kGroups = 4, kSources = 3;
  int32_t begin[kGroups], end[kGroups], expert[kGroups], tile_offset[kGroups + 1];
  std::vector<WorkItem> items;
  int64_t rows;  // the scratch rows of every tile

  explicit List(int tile_m) {
    const int32_t sizes[kGroups] = {1, tile_m + 2, 0, tile_m / 3};
    int32_t pos = 0, tile = 0;
    for (int g = 0; g < kGroups; ++g) {
      begin[g] = pos;
      end[g] = pos + sizes[g];
      expert[g] = 2 + g;
      tile_offset[g] = tile;
      for (int32_t i = 0; i < sizes[g]; ++i) items.push_back({i * kSources / sizes[g], i, 0});
      pos += sizes[g];
      tile += (sizes[g] + tile_m - 1) / tile_m;
    }
    tile_offset[kGroups] = tile;
    rows = int64_t{tile} * tile_m;
  }
  // The scratch row of group g's i-th pair.
  int64_t row(int tile_m, int g, int i) const { return int64_t{tile_offset[g]} * tile_m + i; }
};

constexpr int kExpertsPerDevice = 2, kDevices = 3;

template <class T>
std::vector<T> random_values(std::mt19937& rng, int64_t count) {
  std::uniform_int_distribution<int> small(-2, 2);
  std::vector<T> v(count);
  for (T& x : v) x = T(float(small(rng)));
  return v;
}

template <class V>
bool same_bytes(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0;
}

GemmParams list_params(const List& l, int tile_m) {
  GemmParams p{};
  p.items = l.items.data();
  p.group_begin = l.begin;
  p.group_end = l.end;
  p.group_expert = l.expert;
  p.tile_offset = l.tile_offset;
  p.num_groups = List::kGroups;
  p.tile_m = tile_m;
  p.only_source = kAllSources;
  p.experts_per_device = kExpertsPerDevice;
  p.part = ReductionPart::kEveryGroup;
  return p;
}

template <class Config>
void launch(const GemmParams& p, int grid, const std::string& where) {
  static_assert(GemmTraits<Config>::kSmemBytes <= kSmemCapacity);
  lanes::grid = dim3(grid);
  for (int b = 0; b < grid; ++b)
    expect(lanes::run_block(make_uint3(b, 0, 0), Config::kThreads,
                            [&] { expert_gemm<host::OnHost<Config>>(p); }),
           where, "a block's threads part at a collective");
}

// A pair-row GEMM's operands: pair rows [rows, k] and each device's experts' weights, an
// expert's (k, n) at k * ld + n (kMN: as stored) or n * ld + k (kK: transposed); row pitches past
// the extents.
template <class T, Major kB>
struct PairRowOperands {
  static constexpr bool kStored = kB == Major::kMN;
  int n, k;
  int64_t a_ld, b_ld, expert_stride;
  std::vector<T> rows;
  std::vector<std::vector<T>> weights;

  PairRowOperands(std::mt19937& rng, const List& l, int n, int k)
      : n(n), k(k), a_ld(k + 8), b_ld((kStored ? n : k) + 8),
        expert_stride((kStored ? k : n) * b_ld + 16), rows(random_values<T>(rng, l.rows * a_ld)),
        weights(kDevices) {
    for (auto& device : weights) device = random_values<T>(rng, kExpertsPerDevice * expert_stride);
  }

  // A launch over these operands: their shape, extents and tables.
  void set(GemmParams& p) const {
    p.shape = GemmShape::kPairRows;
    p.n = n;
    p.k = k;
    p.a.source = RowSource::kPair;
    p.a.data = rows.data();
    p.a.ld = a_ld;
    p.b.source = RowSource::kExpert;
    for (int d = 0; d < kDevices; ++d) p.b.peers[d] = weights[d].data();
    p.b.ld = b_ld;
    p.b.expert_stride = expert_stride;
    p.chunk = {64, 0};
  }

  // Column c of scratch row `row` times `expert`'s weights, exact.
  float product(int64_t row, int32_t expert, int c) const {
    const T* w = weights[expert / kExpertsPerDevice].data() +
                 expert % kExpertsPerDevice * expert_stride;
    float sum = 0.0f;
    for (int kk = 0; kk < k; ++kk)
      sum += float(rows[row * a_ld + kk]) * float(w[kStored ? kk * b_ld + c : c * b_ld + kk]);
    return sum;
  }
};

// GEMM1's shape over pair rows: x [pairs, k] times an expert's [k, n] weights (kMN: as stored,
// row k at k * ld; kK: transposed, row n at n * ld), float32 rows out; in one launch, or in
// source phases (one launch for each source's tiles once its rows are in, then one for the tiles
// spanning sources, as cuda_launch.cc runs them while peers' rows arrive).
template <class Config>
void check_pair_rows(std::mt19937& rng, bool phases, const std::string& where) {
  using T = typename Config::Element;
  constexpr int kTileM = Config::kTileM;
  const List l(kTileM);
  // Past one N-tile, and past the pipeline's stages of k-tiles to a partial one; whole 16-byte
  // vectors (CUDA cores' vectors are one element).
  constexpr int kK = Config::kTileK;
  const int n = Config::kTileN + 8, k = kK > 8 ? Config::kStages * kK + 8 : 4 * kK + 3;
  const PairRowOperands<T, Config::kBMajor> x(rng, l, n, k);
  const int64_t out_ld = n + 4;
  const float poison = std::nanf("7");
  std::vector<float> out(l.rows * out_ld, poison);
  GemmParams p = list_params(l, kTileM);
  x.set(p);
  p.epilogue = Epilogue::kStoreF32;
  p.out = out.data();
  p.out_ld = out_ld;
  if (!phases) launch<Config>(p, 3, where);
  // The rows arrive a source at a time, each before its phase: until then they are NaN, which a
  // tile computed too early would carry into its output.
  std::vector<T> arrived(x.rows.size(), T(std::nanf("")));
  if (phases) p.a.data = arrived.data();
  for (int32_t source = 0; phases && source <= List::kSources; ++source) {
    for (int g = 0; g < List::kGroups; ++g)
      for (int i = 0; i < l.end[g] - l.begin[g]; ++i)
        if (l.items[l.begin[g] + i].source == source) {
          const int64_t at = l.row(kTileM, g, i) * x.a_ld;
          std::copy_n(&x.rows[at], x.a_ld, &arrived[at]);
        }
    p.only_source = source < List::kSources ? source : kSpanningSources;
    launch<Config>(p, 3, where);
  }
  std::vector<float> want(out.size(), poison);
  for (int g = 0; g < List::kGroups; ++g)
    for (int i = 0; i < l.end[g] - l.begin[g]; ++i) {
      const int64_t row = l.row(kTileM, g, i);
      for (int c = 0; c < n; ++c) want[row * out_ld + c] = x.product(row, l.expert[g], c);
    }
  expect(same_bytes(out, want), where,
         "float32 rows other than each pair row times its expert's weights");
}

// GEMM1 with its activation epilogue: x [pairs, k] times an expert's w_in [k, (gated: 2) f]
// (gated: gate columns j and up columns f + j, which one tile holds side by side), a = act(h)
// [pairs, f] out in the dtype: the bytes pair_rows.cuh's activate_row writes from the exact h.
template <class Config>
void check_gemm1(std::mt19937& rng, Activation act, const std::string& where) {
  using T = typename Config::Element;
  constexpr int kTileM = Config::kTileM;
  const bool gated = IsGated(act);
  const List l(kTileM);
  // Past one N-tile of a's columns (half a tile where gated), whole 16-byte vectors.
  const int f = Config::kTileN / (gated ? 2 : 1) + 8, n = gated ? 2 * f : f;
  const PairRowOperands<T, Major::kMN> x(rng, l, n, Config::kStages * Config::kTileK + 8);
  const int64_t out_ld = f + 4;
  const T poison = T(std::nanf("7"));
  std::vector<T> out(l.rows * out_ld, poison), want(out.size(), poison);
  GemmParams p = list_params(l, kTileM);
  x.set(p);
  p.n = f;
  p.n_split = gated ? f : 0;
  p.epilogue = Epilogue::kActivation;
  p.activation = static_cast<int32_t>(act);
  p.gated = gated;
  p.out = out.data();
  p.out_ld = out_ld;
  launch<Config>(p, 3, where);
  GemmParams reference = p;
  reference.out = want.data();
  std::vector<float> h(n);
  for (int g = 0; g < List::kGroups; ++g)
    for (int i = 0; i < l.end[g] - l.begin[g]; ++i) {
      const int64_t row = l.row(kTileM, g, i);
      for (int c = 0; c < n; ++c) h[c] = x.product(row, l.expert[g], c);
      for (int lane = 0; lane < 32; ++lane)
        activate_row<T, 1>(reference, g, l.begin[g] + i, row, 0, f, lane,
                           [&](int32_t j) { return Floats<1>{{h[j]}}; });
    }
  expect(same_bytes(out, want), where,
         "activations other than activate_row's of each pair's exact h");
}

// The backward's u GEMM with its epilogue: u = dy [pairs, k] times an expert's w_out^T (w_out
// [f, k] as stored, so B is K-major), and from u, the recomputed h [pairs, (gated: 2) f] and the
// pair's combine weight, dh and w * a in the dtype and each N-tile's part of dot(a, u): the bytes
// pair_rows.cuh's activation_backward_row writes from the exact u, the parts summed as warp_sum's
// butterfly sums the lanes'.
template <class Config>
void check_u_gemm(std::mt19937& rng, Activation act, const std::string& where) {
  using T = typename Config::Element;
  constexpr int kTileM = Config::kTileM, kTileN = Config::kTileN;
  const bool gated = IsGated(act);
  const List l(kTileM);
  const int f = kTileN + 8, gf = gated ? 2 * f : f, partials = (f + kTileN - 1) / kTileN;
  const PairRowOperands<T, Major::kK> dy(rng, l, f, Config::kStages * Config::kTileK + 8);
  const std::vector<float> h = random_values<float>(rng, l.rows * gf);
  std::vector<std::vector<T>> combine(List::kSources);  // each source's [tokens, 1]
  for (auto& source : combine) source = random_values<T>(rng, l.rows);
  const T poison = T(std::nanf("7"));
  std::vector<T> dh(l.rows * gf, poison), aw(l.rows * f, poison);
  std::vector<float> dot(l.rows * partials, std::nanf("7"));
  GemmParams p = list_params(l, kTileM);
  dy.set(p);
  p.epilogue = Epilogue::kActivationBackward;
  p.activation = static_cast<int32_t>(act);
  p.gated = gated;
  p.h = h.data();
  p.dh = dh.data();
  p.aw = aw.data();
  p.dot_partial = dot.data();
  p.num_partials = partials;
  for (int s = 0; s < List::kSources; ++s) p.weights[s] = combine[s].data();
  p.top_k = 1;
  launch<Config>(p, 3, where);
  std::vector<T> want_dh(dh.size(), poison), want_aw(aw.size(), poison);
  std::vector<float> want_dot(dot.size(), std::nanf("7"));
  GemmParams reference = p;
  reference.dh = want_dh.data();
  reference.aw = want_aw.data();
  std::vector<float> u(f);
  for (int g = 0; g < List::kGroups; ++g)
    for (int i = 0; i < l.end[g] - l.begin[g]; ++i) {
      const int64_t row = l.row(kTileM, g, i);
      for (int c = 0; c < f; ++c) u[c] = dy.product(row, l.expert[g], c);
      for (int n_tile = 0; n_tile < partials; ++n_tile) {
        float lanes[32];
        for (int lane = 0; lane < 32; ++lane)
          lanes[lane] = activation_backward_row<T, 1>(
              reference, g, l.begin[g] + i, row, n_tile * kTileN,
              std::min((n_tile + 1) * kTileN, f), lane,
              [&](int32_t j) { return Floats<1>{{u[j]}}; });
        for (int offset = 16; offset > 0; offset /= 2) {  // warp_sum's butterfly
          float sums[32];
          for (int lane = 0; lane < 32; ++lane) sums[lane] = lanes[lane] + lanes[lane ^ offset];
          std::copy_n(sums, 32, lanes);
        }
        want_dot[row * partials + n_tile] = lanes[0];
      }
    }
  expect(same_bytes(dot, want_dot) && same_bytes(dh, want_dh) && same_bytes(aw, want_aw), where,
         "dh, w * a or the dots other than activation_backward_row's from the exact u");
}

// The weight gradients: each group's a^T b over its pairs ([m, n] in the dtype), a [pairs, m]
// and b [pairs, n], in chunks of `chunk_tiles` M-tiles as cuda_launch.cc's
// LaunchWeightGradient runs them (the group that began in an earlier chunk, then those that
// begin in this one).
template <class Config>
void check_weight_gradients(std::mt19937& rng, int32_t chunk_tiles, const std::string& where) {
  using T = typename Config::Element;
  constexpr int kTileM = Config::kTileM;
  const List l(kTileM);
  const int m = kTileM + 8, n = Config::kTileN / 2 + 8;
  const int64_t a_ld = m + 8, b_ld = n + 8, elements = int64_t{m} * n;
  const std::vector<T> a = random_values<T>(rng, l.rows * a_ld);
  const std::vector<T> b = random_values<T>(rng, l.rows * b_ld);
  const T poison = T(std::nanf("7"));
  std::vector<T> out(List::kGroups * elements, poison);
  std::vector<float> carry(elements, std::nanf("7"));
  GemmParams p = list_params(l, kTileM);
  p.shape = GemmShape::kPairReduction;
  p.m = m;
  p.n = n;
  p.a.source = p.b.source = RowSource::kPair;
  p.a.ld = a_ld;
  p.b.ld = b_ld;
  p.epilogue = Epilogue::kStoreExpert;
  p.out = out.data();
  p.out_ld = n;
  p.out_expert_stride = elements;
  const int64_t tiles = l.tile_offset[List::kGroups];
  const bool carrying = chunk_tiles < tiles;
  for (int32_t index = 0; index * int64_t{chunk_tiles} < tiles; ++index) {
    p.chunk = {chunk_tiles, index};
    p.a.data = a.data() + p.chunk.first_row(kTileM) * a_ld;
    p.b.data = b.data() + p.chunk.first_row(kTileM) * b_ld;
    p.carry = carrying ? carry.data() : nullptr;
    if (!carrying) {
      launch<Config>(p, 2, where);
      continue;
    }
    for (ReductionPart part : {ReductionPart::kContinued, ReductionPart::kBegun}) {
      p.part = part;
      launch<Config>(p, 2, where);
    }
  }
  std::vector<T> want(out.size());
  for (int g = 0; g < List::kGroups; ++g)
    for (int r = 0; r < m; ++r)
      for (int c = 0; c < n; ++c) {
        float sum = 0.0f;
        for (int i = 0; i < l.end[g] - l.begin[g]; ++i) {
          const int64_t row = l.row(kTileM, g, i);
          sum += float(a[row * a_ld + r]) * float(b[row * b_ld + c]);
        }
        want[g * elements + r * n + c] = T(sum);
      }
  expect(same_bytes(out, want), where, "a gradient other than each group's exact sum in the dtype");
}

template <template <Major, Major> class Configs>
void check_configs(const char* name, std::mt19937& rng) {
  const auto run = [&](auto config, const char* layouts, auto check) {
    const int before = errors;
    const std::string where = std::string(name) + ", " + layouts;
    check(config, where);
    std::printf("%s: %s\n", where.c_str(), errors == before ? "ok" : "ERRORS");
  };
  const auto pair_rows = [&](auto c, const std::string& w) {
    check_pair_rows<decltype(c)>(rng, false, w);
    check_pair_rows<decltype(c)>(rng, true, w + " in source phases");
  };
  run(Configs<Major::kK, Major::kMN>{}, "pair rows times weights as stored", pair_rows);
  run(Configs<Major::kK, Major::kMN>{}, "GEMM1 with swiglu and with relu",
      [&](auto c, const std::string& w) {
        check_gemm1<decltype(c)>(rng, Activation::kSwiglu, w + ", swiglu");
        check_gemm1<decltype(c)>(rng, Activation::kRelu, w + ", relu");
      });
  run(Configs<Major::kK, Major::kK>{}, "pair rows times weights transposed", pair_rows);
  run(Configs<Major::kK, Major::kK>{}, "the backward's u GEMM with swiglu and with relu",
      [&](auto c, const std::string& w) {
        check_u_gemm<decltype(c)>(rng, Activation::kSwiglu, w + ", swiglu");
        check_u_gemm<decltype(c)>(rng, Activation::kRelu, w + ", relu");
      });
  run(Configs<Major::kMN, Major::kMN>{}, "weight gradients, one chunk and chunks of a tile",
      [&](auto c, const std::string& w) {
        check_weight_gradients<decltype(c)>(rng, 64, w);
        check_weight_gradients<decltype(c)>(rng, 1, w + " in chunks");
      });
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // what it printed, should a bug crash it
  std::mt19937 rng(17);
  check_configs<Bf16Config>("bfloat16", rng);
  check_configs<F16Config>("float16", rng);
  check_configs<Tf32Config>("float32 as TF32", rng);
  check_configs<SimtConfig>("float32 on CUDA cores", rng);
  std::printf("errors: %d\n", errors);
  return errors != 0;
}
