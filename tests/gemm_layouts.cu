// Checks, on the host, that each expert_gemm configuration (cuda/gemm_config.cuh) moves every
// element where its kernel expects it. No GPU runs these kernels here, so this is where a wrong
// swizzle, copy layout or MMA tile would show: the gmem -> smem copies must write each stage's
// elements once, as whole vectors along the operand's contiguous dimension; the smem ->
// register copies, with ldmatrix's exchange between lanes simulated as PTX defines it, must hand
// every MMA fragment register the (mn, k) element the MMA reads there. Prints each check and the
// number of errors; exits 1 on any.
#include <cstdio>
#include <set>
#include <utility>
#include <vector>

#include "cuda/gemm_config.cuh"

using namespace ccf::cuda;
using namespace ccf::cuda::gemm_config;

namespace {

int errors = 0;

void expect(bool ok, const char* config, const char* what, int thread) {
  if (!ok && errors++ < 20) std::printf("  %s: %s (thread %d)\n", config, what, thread);
}

using Coord = std::pair<int, int>;  // (mn, k) in the tile

template <class Config, Major kMajor, class SmemLayout, class G2SCopy>
void check_g2s(const char* config) {
  constexpr int kRows = size<0>(SmemLayout{}), kK = Config::kTileK, kStages = Config::kStages;
  constexpr int kVector = int(sizeof(typename Config::G2SVector) / sizeof(typename Config::Element));
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
