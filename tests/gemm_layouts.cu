// Checks, on the host, that each expert_gemm configuration (cuda/gemm_config.cuh) moves every
// element where its kernel expects it. No GPU runs these kernels here, so this is where a wrong
// swizzle, copy layout or MMA tile would show: the gmem -> smem copies must write each stage's
// elements once, as whole vectors along the operand's contiguous dimension; the smem ->
// register copies, with ldmatrix's exchange between lanes simulated as PTX defines it, must hand
// every MMA fragment register the (mn, k) element the MMA reads there. And the loads themselves
// (cuda/gemm_loads.cuh, a host copy in place of cp.async): a stage loaded from pair rows and from
// an expert's weights on its owner (the other devices' tables null), from the tile's first and
// last, partial k-tile, at partial M and N extents and with GEMM1's gate and up halves, holds at
// each (mn, k) the operand's element its layout (api.cuh's GemmOperand) puts there, and zeros
// past the extents. Prints each check and the number of errors; exits 1 on any.
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "cuda/gemm_config.cuh"
#include "cuda/gemm_loads.cuh"

using namespace ccf::cuda;
using namespace ccf::cuda::gemm_config;

namespace {

int errors = 0;

void expect(bool ok, const char* config, const char* what, int thread) {
  if (!ok && errors++ < 20) std::printf("  %s: %s (thread %d)\n", config, what, thread);
}

using Coord = std::pair<int, int>;  // (mn, k) in the tile

// Elements of one gmem -> smem vector of `Config` (16 bytes; float32 on CUDA cores, 4).
template <class Config>
constexpr int kVectorOf =
    int(sizeof(typename Config::G2SVector) / sizeof(typename Config::Element));

template <class Config, Major kMajor, class SmemLayout, class G2SCopy>
void check_g2s(const char* config) {
  constexpr int kRows = size<0>(SmemLayout{}), kK = Config::kTileK, kStages = Config::kStages;
  constexpr int kVector = kVectorOf<Config>;
  const SmemLayout smem;
  std::vector<int> offsets(cosize(smem));
  for (size_t i = 0; i < offsets.size(); ++i) offsets[i] = int(i);
  const auto smem_offsets = make_tensor(offsets.data(), smem);
  std::vector<int> written(cosize(smem), 0);
  G2SCopy copy;
  for (int t = 0; t < Config::kThreads; ++t) {
    const auto thread = copy.get_thread_slice(t);
    const auto to = thread.partition_D(smem_offsets);                                     // (CPY,MN,K,PIPE)
    const auto coord = thread.partition_D(make_identity_tensor(Shape<Int<kRows>, Int<kK>>{}));  // (CPY,MN,K)
    expect(size<0>(to) == kVector, config, "a copy is not one vector", t);
    for (int s = 0; s < kStages; ++s)
      for (int i = 0; i < size<1>(to); ++i)
        for (int j = 0; j < size<2>(to); ++j) {
          const int first = to(0, i, j, s);
          const auto c0 = coord(0, i, j);
          expect(first % kVector == 0, config, "a vector is not aligned in smem", t);
          const int along = kMajor == Major::kK ? get<1>(c0) : get<0>(c0);
          expect(along % kVector == 0, config, "a vector does not start on a vector in gmem", t);
          for (int v = 0; v < kVector; ++v) {
            const auto c = coord(v, i, j);
            ++written[to(v, i, j, s)];
            expect(to(v, i, j, s) == first + v, config, "a vector is not contiguous in smem", t);
            const bool along_row = kMajor == Major::kK
                                       ? get<0>(c) == get<0>(c0) && get<1>(c) == get<1>(c0) + v
                                       : get<1>(c) == get<1>(c0) && get<0>(c) == get<0>(c0) + v;
            expect(along_row, config, "a vector does not run along the contiguous dimension", t);
            expect(smem(get<0>(c), get<1>(c), s) == to(v, i, j, s), config,
                   "an element lands off its place in the smem layout", t);
          }
        }
  }
  // Every element of the tile once; padding (SIMT's K-major tiles) never.
  std::vector<int> image(cosize(smem), 0);
  for (int s = 0; s < kStages; ++s)
    for (int mn = 0; mn < kRows; ++mn)
      for (int k = 0; k < kK; ++k) ++image[smem(mn, k, s)];
  expect(written == image, config, "the tile's smem elements are not each written once", -1);
}

// gemm_loads.cuh's loads of `Config`, a host copy in place of cp.async: a vector's bytes, or
// zeros where the load is predicated off (cp.async's zero fill).
template <class Config>
struct HostLoads : Config {
  struct G2SOp {
    template <class Vector>
    static void copy(const Vector& src, Vector& dst, bool valid) {
      if (valid) std::memcpy(&dst, &src, sizeof(Vector));
      else std::memset(&dst, 0, sizeof(Vector));
    }
  };
};

// One operand of one tile, loaded a k-tile at a time into a stage by every thread's partitions
// (operand_rows once, load_operand a k-tile), against the operand's layout: (mn, k) is memory row
// `mn_map.index(mn)` and column k (K-major) or row k and column `mn_map.index(mn)` (MN-major),
// from data + row_begin rows (RowSource::kPair) or from the expert's matrix on its owner; zero
// where mn is past the map's extent or k past the tile's.
template <class Config, Major kMajor, class SmemLayout, class G2SCopy, class MnMap>
void check_loads(const char* config, const char* what, RowSource source, const MnMap& mn_map,
                 int64_t mn_memory, int32_t k_extent, std::mt19937& rng) {
  using T = typename Config::Element;
  constexpr int kRows = size<0>(SmemLayout{}), kK = Config::kTileK, kStage = 1;
  constexpr int kVector = kVectorOf<Config>;
  // Memory rows and their length, whole vectors along the contiguous dimension, then a gap.
  const int64_t rows = kMajor == Major::kK ? mn_memory : k_extent;
  const int64_t ld = ((kMajor == Major::kK ? k_extent : mn_memory) + kVector - 1) / kVector *
                     kVector + kVector;
  constexpr int kExpertsHere = 3, kExpert = 5;  // device 1's third
  const int64_t expert_stride = rows * ld + kVector, row_begin = 5;
  auto random = [&](int64_t size) {
    std::vector<T> v(size);
    for (T& x : v) {
      uint32_t bits = rng() | 1u << 7;  // never zero: a zero fill shows
      std::memcpy(&x, &bits, sizeof(T));
    }
    return v;
  };
  const std::vector<T> pairs = random((row_begin + rows) * ld),
                       weights = random(kExpertsHere * expert_stride);
  GemmParams p{};
  p.experts_per_device = kExpertsHere;
  GemmOperand op{};
  op.source = source;
  op.data = pairs.data();
  op.peers[1] = weights.data();  // devices 0 and 2 null: a read of theirs crashes
  op.ld = ld;
  op.expert_stride = expert_stride;
  GemmTile tile{};
  tile.expert = kExpert;
  tile.row_begin = row_begin;
  tile.k_extent = k_extent;
  const T* base = source == RowSource::kPair
                      ? pairs.data() + row_begin * ld
                      : weights.data() + (kExpert % kExpertsHere) * expert_stride;

  const SmemLayout smem;
  std::vector<T> stage(cosize(smem));
  const auto s_tensor = make_tensor(stage.data(), smem);
  G2SCopy copy;
  const int k_tiles = (k_extent + kK - 1) / kK;
  for (const int k_tile : {0, k_tiles - 1}) {
    std::memset(stage.data(), 0x5a, stage.size() * sizeof(T));
    for (int t = 0; t < Config::kThreads; ++t) {
      const auto thread = copy.get_thread_slice(t);
      const auto tXsX = thread.partition_D(s_tensor);                                       // (CPY,MN,K,PIPE)
      const auto tXcX = thread.partition_D(make_identity_tensor(Shape<Int<kRows>, Int<kK>>{}));  // (CPY,MN,K)
      const auto from = operand_rows<HostLoads<Config>, kMajor>(p, op, tile, mn_map, tXcX);
      load_operand<HostLoads<Config>, kMajor>(p, op, tile, mn_map, from, k_tile * kK,
                                              tXsX(_, _, _, kStage), tXcX);
    }
    bool right = true;
    for (int mn = 0; mn < kRows; ++mn)
      for (int k = 0; k < kK; ++k) {
        const int32_t kk = k_tile * kK + k;
        T want{};
        std::memset(&want, 0, sizeof(T));
        if (mn_map.valid(mn) && kk < k_extent)
          want = kMajor == Major::kK ? base[mn_map.index(mn) * ld + kk]
                                     : base[kk * ld + mn_map.index(mn)];
        right = right && std::memcmp(&stage[smem(mn, k, kStage)], &want, sizeof(T)) == 0;
      }
    char where[160];
    std::snprintf(where, sizeof(where), "%s, k-tile %d of %d", what, k_tile + 1, k_tiles);
    expect(right, config, where, -1);
  }
}

// The loads of A (RowMap: a second M-tile, partial) and B (ColumnMap: a second N-tile, partial,
// plain and GEMM1's gate and up halves) from either source.
template <class Config>
void check_operand_loads(const char* config, std::mt19937& rng) {
  constexpr Major kA = Config::kAMajor, kB = Config::kBMajor;
  constexpr int kTileM = Config::kTileM, kTileN = Config::kTileN, kK = Config::kTileK;
  constexpr int kVector = kVectorOf<Config>;
  // A partial last k-tile of whole vectors, and partial M and N extents of whole vectors.
  const int32_t k_extent = 2 * kK + kK / 2 + kVector;
  const RowMap rows{kTileM, kTileM + kTileM / 2 + kVector};
  const int32_t half = kTileN / 2, f = 3 * half - kVector;  // gated: F columns of gate, then up
  const ColumnMap plain{kTileN, kTileN, 0, kTileN + kTileN / 2 + kVector};
  const ColumnMap gated{half, half, f, f};  // the second N-tile: gate [half, 2 half), up beside
  for (const RowSource source : {RowSource::kPair, RowSource::kExpert}) {
    const bool pair = source == RowSource::kPair;
    check_loads<Config, kA, typename Config::SmemLayoutA, typename Config::G2SCopyA>(
        config, pair ? "A from pair rows" : "A from an expert", source, rows, rows.extent + 3,
        k_extent, rng);
    check_loads<Config, kB, typename Config::SmemLayoutB, typename Config::G2SCopyB>(
        config, pair ? "B from pair rows" : "B from an expert", source, plain, plain.extent + 3,
        k_extent, rng);
    check_loads<Config, kB, typename Config::SmemLayoutB, typename Config::G2SCopyB>(
        config, pair ? "B's gate and up from pair rows" : "B's gate and up from an expert",
        source, gated, 2 * f, k_extent, rng);
  }
}

// The smem element each destination value of an ldmatrix .x4 (U32x4_LDSM_N, U16x8_LDSM_T)
// receives: lanes 8j..8j+7 give the rows of matrix j (16 bytes each), and lane l's register j
// holds word l % 4 of row l / 4 of matrix j, or with .trans (16-bit elements) the elements of
// rows 2 (l % 4) and 2 (l % 4) + 1 in column l / 4.
template <bool kTrans>
Coord ldmatrix_source(const std::vector<std::vector<Coord>>& rows, int t, int d, int per_word) {
  const int warp = t / 32, lane = t % 32, j = d / per_word, h = d % per_word;
  if (kTrans) return rows[warp * 32 + j * 8 + 2 * (lane % 4) + h][lane / 4];
  return rows[warp * 32 + j * 8 + lane / 4][(lane % 4) * per_word + h];
}

template <class Atom>
struct CopyOpOf;
template <class Op, class T>
struct CopyOpOf<Copy_Atom<Op, T>> {
  using type = Op;
};

template <class Config, bool kIsA, Major kMajor, class SmemLayout, class S2RAtom>
void check_s2r(const char* config) {
  using Op = typename CopyOpOf<S2RAtom>::type;
  constexpr bool kLdsm = !std::is_same_v<Op, UniversalCopy<typename Config::Element>>;
  constexpr bool kTrans = std::is_same_v<Op, SM75_U16x8_LDSM_T>;
  constexpr int kRows = size<0>(SmemLayout{}), kK = Config::kTileK;
  constexpr int kPerWord = 4 / int(sizeof(typename Config::Element));
  const auto stage = SmemLayout{}(_, _, 0);
  typename Config::TiledMma mma;
  const auto copy = [&] {
    if constexpr (kIsA) return make_tiled_copy_A(S2RAtom{}, mma);
    else return make_tiled_copy_B(S2RAtom{}, mma);
  }();
  const auto tile = make_identity_tensor(Shape<Int<kRows>, Int<kK>>{});
  // Per thread, in copy order: the elements it reads (ldmatrix: the row it points at) and the
  // ones the MMA expects in the registers the copy fills.
  std::vector<std::vector<Coord>> read(Config::kThreads), wanted(Config::kThreads);
  int per_copy = 0;
  for (int t = 0; t < Config::kThreads; ++t) {
    const auto thread = copy.get_thread_slice(t);
    const auto from = thread.partition_S(tile);
    const auto mma_slice = mma.get_slice(t);
    const auto fragment = [&] {
      if constexpr (kIsA) return mma_slice.partition_A(tile);
      else return mma_slice.partition_B(tile);
    }();
    const auto into = thread.retile_D(fragment);
    expect(size(from) == size(into), config, "the copy does not fill the fragment", t);
    per_copy = size<0>(from);
    for (int i = 0; i < size(from); ++i) {
      read[t].push_back({get<0>(from(i)), get<1>(from(i))});
      wanted[t].push_back({get<0>(into(i)), get<1>(into(i))});
    }
    std::set<Coord> covered(wanted[t].begin(), wanted[t].end()), needed;
    for (int i = 0; i < size(fragment); ++i) needed.insert({get<0>(fragment(i)), get<1>(fragment(i))});
    expect(covered == needed && int(needed.size()) == size(fragment), config,
           "the copy's registers are not the fragment's, once each", t);
  }
  for (int t = 0; t < Config::kThreads; ++t)
    for (int r = 0; r < int(read[t].size()) / per_copy; ++r) {
      if (!kLdsm) {
        for (int v = 0; v < per_copy; ++v)
          expect(read[t][r * per_copy + v] == wanted[t][r * per_copy + v], config,
                 "a register gets another element than its MMA reads", t);
        continue;
      }
      // The rows ldmatrix reads: 16 contiguous, aligned bytes in smem.
      const int row_elements = 16 / int(sizeof(typename Config::Element));
      expect(per_copy == row_elements, config, "an ldmatrix copy is not one 16-byte row", t);
      const auto at = [&](const Coord& c) { return int(stage(c.first, c.second)); };
      const int first = at(read[t][r * per_copy]);
      expect(first % row_elements == 0, config, "an ldmatrix row is not aligned", t);
      std::vector<std::vector<Coord>> rows(Config::kThreads);
      for (int u = 0; u < Config::kThreads; ++u)
        rows[u].assign(read[u].begin() + r * per_copy, read[u].begin() + (r + 1) * per_copy);
      for (int v = 0; v < per_copy; ++v) {
        expect(at(read[t][r * per_copy + v]) == first + v, config,
               "an ldmatrix row is not contiguous", t);
        expect(ldmatrix_source<kTrans>(rows, t, v, kPerWord) == wanted[t][r * per_copy + v],
               config, "ldmatrix hands a register another element than its MMA reads", t);
      }
    }
}

template <template <Major, Major> class Configs, Major kA, Major kB>
void check_config(const char* name) {
  using Config = Configs<kA, kB>;
  char config[96];
  std::snprintf(config, sizeof(config), "%s A %s-major, B %s-major", name,
                kA == Major::kK ? "K" : "MN", kB == Major::kK ? "K" : "MN");
  const int before = errors;
  check_g2s<Config, kA, typename Config::SmemLayoutA, typename Config::G2SCopyA>(config);
  check_g2s<Config, kB, typename Config::SmemLayoutB, typename Config::G2SCopyB>(config);
  check_s2r<Config, true, kA, typename Config::SmemLayoutA, typename Config::S2RAtomA>(config);
  check_s2r<Config, false, kB, typename Config::SmemLayoutB, typename Config::S2RAtomB>(config);
  std::mt19937 rng(11);
  check_operand_loads<Config>(config, rng);
  std::printf("%s: %s\n", config, errors == before ? "ok" : "ERRORS");
}

// The operand layouts the kernels are built for (expert_gemm.cu's launch_majors).
template <template <Major, Major> class Configs>
void check_configs(const char* name) {
  check_config<Configs, Major::kK, Major::kMN>(name);
  check_config<Configs, Major::kK, Major::kK>(name);
  check_config<Configs, Major::kMN, Major::kMN>(name);
}

}  // namespace

int main() {
  check_configs<Bf16Config>("bfloat16");
  check_configs<F16Config>("float16");
  check_configs<Tf32Config>("float32 as TF32");
  check_configs<SimtConfig>("float32");
  std::printf("errors: %d\n", errors);
  return errors == 0 ? 0 : 1;
}
