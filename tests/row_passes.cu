// Checks, on the host, the activation passes of cuda/row_passes.cuh: the code the GPU runs, built
// as host C++, over random work lists (empty groups, groups another device computes, groups of
// whole tiles and with tail padding, lists without any tile), in chunks up to one wholly past
// the list's end, for every source and for one:
//   - the walk (for_each_row_slice, row_pair), at tile_m 4, 8 and 12, in chunks of 1, 2, 5 and 64
//     tiles, on grids of 1, 2, 7 and 1000 blocks (a warp takes many items, one or none), calls
//     its body once for each (scratch row, slice) of the pass, with the row's group and list
//     position, and for nothing else; it stops at the list's end (tile_offset[num_groups]) where
//     the groups' tables would still give pairs, and returns there in a chunk of 2^30 tiles;
//   - Hopper's grouped GEMMs over a launch: build_problems' problems (grouped_problems.cuh, each
//     group's rows from pair_rows.cuh's group_rows_in_chunk, its expert's weights on its owner,
//     the operands' row pitches) and a model of CUTLASS's GEMM over them
//     (tests/grouped_gemm_model.h), with kept rows skipped or none, for weights as stored and
//     transposed: each of the pass's rows that keep no h gets its pair row times its expert's
//     weights, and no other row is written, so the GEMMs write the rows the passes read;
//   - expert_gemm's tiles across a call's source phases (pair_rows.cuh's tile_in_launch): each
//     tile computed once, by the phase of the one source its rows come from or the spanning
//     phase, as one launch over every source computes them (all but the tiles wholly kept);
//   - activate_rows and activation_backward_rows, a warp's 32 lanes as fibers (tests/warp_lanes.h:
//     warp_sum's shuffles exchange values, and every lane must reach them), in chunks of three
//     8-row tiles on grids of 1, 3 and a block per four items, at one and four columns a lane
//     (one alone where F % 4 != 0), write exactly the rows of the pass: the bytes pair_rows.cuh's
//     row functions give at one column a lane for the row's group and list position (a, the kept
//     h, dh, w * a), and each slice's dot as the lanes' parts summed in warp_sum's butterfly; every
//     other row, the columns of `out` past F and the kept rows of pairs that keep none hold their
//     poison;
//   - expert_gemm's epilogues (gemm_epilogues.cuh) over every tile of the launch, a block's threads
//     as fibers, each tile's product as the kernel's loads index it (RowMap, ColumnMap,
//     operand_row): GEMM1's activation and the backward's u epilogue write the bytes the passes
//     write (an N tile's dot a slice's), and the float32 stores each row of the pass its product's
//     row and no other.
// tests/pair_rows.cu checks the row functions themselves (four columns a lane against one and
// the formula). Prints each case and the number of errors; exits 1 on any.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime.h>

#include "tests/warp_lanes.h"

using std::min;  // the kernels' min(int, int): CUDA's, which nvcc alone declares

#include "cuda/gemm_epilogues.cuh"
#include "cuda/grouped_problems.cuh"
#include "cuda/row_passes.cuh"
#include "tests/grouped_gemm_model.h"

using namespace ccf;
using namespace ccf::cuda;

namespace {

constexpr int kTokens = 16, kTopK = 3, kSources = 3;
int errors = 0;

void expect(bool ok, const std::string& where, const char* what) {
  if (!ok && errors++ < 30) std::printf("  %s: %s\n", where.c_str(), what);
}

// A work list as work_list.cu builds it: groups of consecutive positions, each group's rows from
// its first tile on; a group another device computes (expert -1) keeps its positions but has no
// rows, and so no tiles.
struct List {
  int32_t tile_m;
  std::vector<int32_t> begin, end, expert, tile_offset;  // [groups], tile_offset [groups + 1]
  std::vector<WorkItem> items;
  int64_t tiles() const { return tile_offset.back(); }
  int32_t groups() const { return static_cast<int32_t>(begin.size()); }
};

// `others`: some groups are other devices' (as with a plan). `empty`: no group has rows.
// `groups`: how many (0: 1 to 9).
List make_list(std::mt19937& rng, int32_t tile_m, bool others, bool empty = false,
               int groups = 0) {
  List l;
  l.tile_m = tile_m;
  if (groups == 0) groups = 1 + rng() % 9;
  int32_t pos = 0, tiles = 0;
  for (int g = 0; g < groups; ++g) {
    const int kind = rng() % 5;
    const int32_t size = empty || kind == 0 ? 0
                         : kind == 1        ? 1
                         : kind == 2        ? tile_m * static_cast<int32_t>(1 + rng() % 2)
                                            : static_cast<int32_t>(1 + rng() % (3 * tile_m));
    const bool here = !others || rng() % 3 != 0;
    l.begin.push_back(pos);
    l.end.push_back(here ? pos + size : pos);
    l.expert.push_back(here ? g : -1);
    l.tile_offset.push_back(tiles);
    if (here) tiles += (size + tile_m - 1) / tile_m;
    for (int32_t i = 0; i < size; ++i)
      l.items.push_back({static_cast<int32_t>(rng() % kSources),
                         static_cast<int32_t>(rng() % kTokens),
                         static_cast<int32_t>(rng() % kTopK)});
    pos += size;
  }
  l.tile_offset.push_back(tiles);
  return l;
}

GemmParams params_of(const List& l, Chunk chunk, int32_t only_source, int32_t n,
                     const int32_t* tile_offset = nullptr) {
  GemmParams p{};
  p.items = l.items.data();
  p.group_begin = l.begin.data();
  p.group_end = l.end.data();
  p.group_expert = l.expert.data();
  p.tile_offset = tile_offset != nullptr ? tile_offset : l.tile_offset.data();
  p.num_groups = l.groups();
  p.tile_m = l.tile_m;
  p.only_source = only_source;
  p.chunk = chunk;
  p.n = n;
  return p;
}

struct Pair {
  int32_t group = -1;  // -1: the row holds no pair of the pass
  int64_t pos = -1;
};

// The pass's pair of each of the chunk's rows, from the list alone: a computed group's i-th pair
// lies in scratch row tile_offset * tile_m + i. Rows of tiles from `end_tile` on are none.
std::vector<Pair> pass_rows(const List& l, Chunk chunk, int32_t only_source, int64_t end_tile) {
  std::vector<Pair> rows(chunk.rows(l.tile_m));
  for (int32_t g = 0; g < l.groups(); ++g) {
    if (l.expert[g] < 0) continue;
    for (int32_t i = 0; i < l.end[g] - l.begin[g]; ++i) {
      const int64_t row = int64_t{l.tile_offset[g]} * l.tile_m + i - chunk.first_row(l.tile_m);
      const int32_t pos = l.begin[g] + i;
      if (l.tile_offset[g] + i / l.tile_m >= end_tile || row < 0 || row >= chunk.rows(l.tile_m))
        continue;
      if (only_source != kAllSources && l.items[pos].source != only_source) continue;
      rows[row] = {g, pos};
    }
  }
  return rows;
}

// What the walk's body was called with.
struct Visits {
  int64_t rows;
  int32_t slices;
  std::vector<int> count;  // [rows, slices]
  std::vector<Pair> pair;  // [rows, slices] the last call's
  int outside = 0;         // calls for a (row, slice) outside the chunk

  Visits(int64_t rows, int32_t slices)
      : rows(rows), slices(slices), count(rows * slices), pair(rows * slices) {}
  void operator()(int64_t row, int32_t slice, int32_t group, int64_t pos) {
    if (row < 0 || row >= rows || slice < 0 || slice >= slices) {
      ++outside;
      return;
    }
    ++count[row * slices + slice];
    pair[row * slices + slice] = {group, pos};
  }
};

// Every warp of a grid of `blocks` walks the chunk, as lane (its index in the grid) % 32. The
// walk reads no lane's value but through threadIdx.x / 32, and has no collective.
void walk(const GemmParams& p, int32_t slices, int blocks, Visits& visits) {
  lanes::grid = dim3(blocks);
  for (int b = 0; b < blocks; ++b)
    for (int w = 0; w < kTokenWarps; ++w) {
      lanes::block = make_uint3(b, 0, 0);
      lanes::thread = make_uint3(w * 32 + (b * kTokenWarps + w) % 32, 0, 0);
      for_each_row_slice(p, slices, [&](int64_t row, int32_t slice, int32_t group, int64_t pos) {
        visits(row, slice, group, pos);
      });
    }
}

void expect_visits(const Visits& v, const std::vector<Pair>& want, const std::string& where) {
  expect(v.outside == 0, where, "the body ran for a (row, slice) outside the chunk");
  bool missed = false, twice = false, stray = false, wrong = false;
  for (int64_t row = 0; row < v.rows; ++row)
    for (int32_t slice = 0; slice < v.slices; ++slice) {
      const int count = v.count[row * v.slices + slice];
      const Pair& got = v.pair[row * v.slices + slice];
      if (want[row].group < 0) {
        stray |= count != 0;
      } else {
        missed |= count == 0;
        twice |= count > 1;
        wrong |= count > 0 && (got.group != want[row].group || got.pos != want[row].pos);
      }
    }
  expect(!missed, where, "a (row, slice) of the pass was not visited");
  expect(!twice, where, "a (row, slice) of the pass was visited more than once");
  expect(!stray, where, "a row that holds no pair of the pass was visited");
  expect(!wrong, where, "a row was given another group or list position than its pair's");
}

std::string describe(const List& l, Chunk chunk, int32_t only_source, int blocks) {
  return "tile_m " + std::to_string(l.tile_m) + ", " + std::to_string(l.groups()) + " groups, " +
         std::to_string(l.tiles()) + " tiles, chunk " + std::to_string(chunk.index) + " of " +
         std::to_string(chunk.tiles) + " tiles, " +
         (only_source == kAllSources ? std::string("every source")
                                     : "source " + std::to_string(only_source)) +
         ", " + std::to_string(blocks) + " blocks";
}

// The walk over random lists: each (row, slice) of the pass once, with its pair, nothing else.
void check_walk(std::mt19937& rng) {
  const int32_t slice_counts[] = {1, 2, 3, 7};
  for (int32_t tile_m : {4, 8, 12}) {
    const int before = errors;
    for (int trial = 0; trial < 14; ++trial) {
      const List l = make_list(rng, tile_m, trial % 2 == 1, trial % 7 == 0);
      const int32_t slices = slice_counts[trial % 4];
      for (int32_t chunk_tiles : {1, 2, 5, 64})
        // Up to the first chunk wholly past the list's end.
        for (int32_t index = 0; index <= l.tiles() / chunk_tiles + 1; ++index)
          for (int32_t only_source : {kAllSources, 0, 2})
            for (int blocks : {1, 2, 7, 1000}) {
              const Chunk chunk{chunk_tiles, index};
              const GemmParams p = params_of(l, chunk, only_source, 32 * slices);
              Visits visits(chunk.rows(tile_m), slices);
              walk(p, slices, blocks, visits);
              expect_visits(visits, pass_rows(l, chunk, only_source, l.tiles()),
                            describe(l, chunk, only_source, blocks));
            }
    }
    if (errors == before) std::printf("walk, tile_m %d: ok\n", tile_m);
  }
}

// The list's end is tile_offset[num_groups]: lowered by one to three tiles, the groups' tables
// still give pairs to the rows past it (row_pair would take them), and the walk must stop there.
void check_walk_stops_at_the_end(std::mt19937& rng) {
  const int before = errors;
  for (int trial = 0; trial < 12; ++trial) {
    const List l = make_list(rng, 8, trial % 2 == 1);
    for (int64_t cut = 1; cut <= std::min<int64_t>(3, l.tiles()); ++cut) {
      std::vector<int32_t> tile_offset = l.tile_offset;
      tile_offset.back() -= static_cast<int32_t>(cut);
      for (int32_t chunk_tiles : {1, 5, 64})
        for (int32_t index = 0; index <= l.tiles() / chunk_tiles; ++index)
          for (int blocks : {1, 7}) {
            const Chunk chunk{chunk_tiles, index};
            const GemmParams p = params_of(l, chunk, kAllSources, 64, tile_offset.data());
            Visits visits(chunk.rows(8), 2);
            walk(p, 2, blocks, visits);
            expect_visits(visits, pass_rows(l, chunk, kAllSources, tile_offset.back()),
                          "end lowered by " + std::to_string(cut) + " tiles, " +
                              describe(l, chunk, kAllSources, blocks));
          }
    }
  }
  if (errors == before) std::printf("walk stops at the list's end: ok\n");
}

void walked_on(int) {
  static const char message[] =
      "  a chunk of 2^30 tiles: a warp walked on past the list's end (10 s)\nerrors: 1\n";
  (void)!write(STDOUT_FILENO, message, sizeof(message) - 1);
  _exit(1);
}

// A chunk of 2^30 tiles (the items of 3 * 10^10 (row, slice)s) on one and two blocks: each warp
// returns at its first row past the list's tiles, where walking on takes hours.
void check_walk_returns(std::mt19937& rng) {
  const int before = errors;
  signal(SIGALRM, walked_on);
  alarm(10);
  for (int trial = 0; trial < 4; ++trial) {
    const List l = make_list(rng, 12, trial % 2 == 1);
    const Chunk chunk{1 << 30, 0};
    // The chunk's rows from the list's end on hold no pair: its first rows are a chunk of the
    // list's tiles, and a visit past them is one outside that chunk.
    const Chunk list_chunk{static_cast<int32_t>(std::max<int64_t>(l.tiles(), 1)), 0};
    for (int blocks : {1, 2}) {
      const GemmParams p = params_of(l, chunk, kAllSources, 96);
      Visits visits(list_chunk.rows(12), 3);
      walk(p, 3, blocks, visits);
      expect_visits(visits, pass_rows(l, list_chunk, kAllSources, l.tiles()),
                    "a chunk of 2^30 tiles, " + describe(l, chunk, kAllSources, blocks));
    }
  }
  alarm(0);
  if (errors == before)
    std::printf("walk over a chunk of 2^30 tiles returns at the list's end: ok\n");
}

// A random list (trial's kind of make_list) whose groups hold their pairs in (source, token, k)
// order, as the work list gives them: what a launch of one source's rows relies on.
List make_ordered_list(std::mt19937& rng, int32_t tile_m, int trial, int groups = 0) {
  List l = make_list(rng, tile_m, trial % 2 == 1, trial % 9 == 0, groups);
  for (int32_t g = 0; g < l.groups(); ++g)
    std::sort(l.items.begin() + l.begin[g], l.items.begin() + l.end[g],
              [](const WorkItem& a, const WorkItem& b) {
                return std::tie(a.source, a.token, a.k) < std::tie(b.source, b.token, b.k);
              });
  return l;
}

// `p` skipping the rows whose h is kept: the first `kept_rows` pairs of each device of two
// groups (none: 0). Only the kept rows' address is read, for whether anything is kept.
GemmParams skipping_kept(GemmParams p, int32_t kept_rows) {
  static float kept_h;
  p.kept = kept_rows > 0 ? &kept_h : nullptr;
  p.kept_rows = kept_rows;
  p.experts_per_device = 2;
  p.skip_kept = 1;
  return p;
}

constexpr uint32_t kPoisonFloat = 0x7fc0dead;  // a NaN no pass computes

float poison_float() {
  float x;
  std::memcpy(&x, &kPoisonFloat, 4);
  return x;
}

// Hopper's grouped GEMMs over a launch's rows: build_problems' problems (grouped_problems.cuh,
// each group's rows of the chunk from group_rows_in_chunk) and CUTLASS's GEMM over them
// (tests/grouped_gemm_model.h), for the weights as stored (N-major) and transposed (K-major).
// Each group's rows of the chunk from the launch's source, less the pairs that keep their h
// under skip_kept, must hold their pair row times their expert's weights, read from the expert's
// device; every other row, and the columns past N, keep their poison. The operands' row pitches
// differ from their extents; the groups' pairs are in (source, token, k) order, as the work list
// gives them; kept rows at 0, 2 and 5 a device of two groups.
template <Major kB>
void check_grouped_gemm(std::mt19937& rng) {
  using G = GroupedOperands<float, Major::kK, kB, float>;
  constexpr int32_t kN = 5, kK = 3, kOutLd = kN + 2, kALd = kK + 1;
  constexpr int64_t kBLd = kB == Major::kMN ? kN + 1 : kK + 2, kExpertStride = kK * kN + 11;
  const int before = errors;
  std::uniform_int_distribution<int> small(-3, 3);
  for (int32_t tile_m : {4, 8}) {
    for (int trial = 0; trial <= 20; ++trial) {
      // The last: more groups than build_problems' blocks have threads (in chunks of 64 tiles).
      const List l =
          make_ordered_list(rng, tile_m, trial, trial < 20 ? 0 : 2 * kProblemThreads + 5);
      // Each device's experts' weights (two a device, more where the list has more groups than
      // 8 devices hold); an expert's (k, n) at k * ld + n, or n * ld + k.
      const int32_t per_device = std::max(2, (l.groups() + kMaxPeers - 1) / kMaxPeers);
      std::vector<std::vector<float>> weights(kMaxPeers);
      for (std::vector<float>& device : weights) {
        device.resize(per_device * kExpertStride);
        for (float& x : device) x = small(rng);
      }
      const auto weight = [&](int32_t expert, int k, int n) {
        return weights[expert / per_device][expert % per_device * kExpertStride +
                                            (kB == Major::kMN ? k * kBLd + n : n * kBLd + k)];
      };
      const std::vector<int32_t> chunk_sizes =
          trial < 20 ? std::vector<int32_t>{1, 3, 64} : std::vector<int32_t>{64};
      for (int32_t chunk_tiles : chunk_sizes)
        for (int32_t index = 0; index <= l.tiles() / chunk_tiles + 1; ++index)
          for (int32_t only_source : {kAllSources, 0, 1, 2})
            for (int32_t kept_rows : {0, 2, 5}) {
              const Chunk chunk{chunk_tiles, index};
              const std::string where = "kept " + std::to_string(kept_rows) + ", " +
                                        describe(l, chunk, only_source, 1);
              GemmParams p = skipping_kept(params_of(l, chunk, only_source, kN), kept_rows);
              const int64_t rows = chunk.rows(tile_m);
              std::vector<float> a(rows * kALd), out(rows * kOutLd, poison_float());
              for (float& x : a) x = small(rng);
              p.experts_per_device = per_device;
              p.k = kK;
              p.a.data = a.data();
              p.a.ld = kALd;
              for (int d = 0; d < kMaxPeers; ++d) p.b.peers[d] = weights[d].data();
              p.b.ld = kBLd;
              p.b.expert_stride = kExpertStride;
              p.out = out.data();
              p.out_ld = kOutLd;
              std::vector<unsigned char> workspace(GroupArrays<G>::bytes(l.groups()));
              const GroupArrays<G> w = GroupArrays<G>::carve(workspace.data(), l.groups());
              lanes::grid = dim3((l.groups() + kProblemThreads - 1) / kProblemThreads);
              for (unsigned b = 0; b < lanes::grid.x; ++b)
                expect(lanes::run_block(make_uint3(b, 0, 0), kProblemThreads,
                                        [&] { build_problems<G>(p, w); }),
                       where, "build_problems' threads part at a collective");
              grouped_gemm_model(w, l.groups(), 0.0f);
              const std::vector<Pair> pass = pass_rows(l, chunk, only_source, l.tiles());
              bool exact = true;
              for (int64_t row = 0; row < rows; ++row) {
                const Pair& pair = pass[row];
                const bool wanted = pair.group >= 0 && kept_index(p, pair.group, pair.pos) < 0;
                for (int32_t n = 0; n < kOutLd; ++n) {
                  float want = poison_float();
                  if (wanted && n < kN) {
                    want = 0.0f;
                    for (int32_t k = 0; k < kK; ++k)
                      want += a[row * kALd + k] * weight(l.expert[pair.group], k, n);
                  }
                  exact &= std::memcmp(&out[row * kOutLd + n], &want, sizeof(float)) == 0;
                }
              }
              expect(exact, where, "a row other than its pair row times its expert's weights");
            }
    }
  }
  if (errors == before)
    std::printf("grouped GEMMs' problems give their groups' rows, weights %s: ok\n",
                kB == Major::kMN ? "as stored" : "transposed");
}

// expert_gemm's tiles over a call's source phases (tile_in_launch): each source's phase computes
// the tiles whose rows all come from it (and reads no other source's) and the spanning phase
// the others, so across the phases each M-tile (and N-tile) of the chunk is computed once, as in
// one launch over every source, which computes each tile of a group here but those whose pairs
// all keep their h.
template <int kTileM>
void check_phase_tiles(std::mt19937& rng) {
  constexpr int kTileN = 16;
  for (int trial = 0; trial < 20; ++trial) {
    const List l = make_ordered_list(rng, kTileM, trial);
    for (int32_t chunk_tiles : {1, 3, 64})
      for (int32_t index = 0; index <= l.tiles() / chunk_tiles + 1; ++index)
        for (int32_t kept_rows : {0, 2, 5}) {
          const Chunk chunk{chunk_tiles, index};
          GemmParams p = skipping_kept(params_of(l, chunk, kAllSources, 2 * kTileN), kept_rows);
          const std::string where = "kept " + std::to_string(kept_rows) + ", " +
                                    describe(l, chunk, kAllSources, 1);
          const int64_t units = num_units<kTileM, kTileN>(p);
          const int64_t tiles = std::max<int64_t>(
              std::min<int64_t>(l.tiles(), chunk.end_tile()) - chunk.first_tile(), 0);
          expect(units == 2 * tiles, where, "the launch's units are not the chunk's tiles");
          // A source's phase runs once that source's rows are in: it may read no other's.
          std::vector<int> computed(units, 0);
          for (int32_t phase = 0; phase <= kSources; ++phase) {  // as cuda_launch.cc's phases
            p.only_source = phase < kSources ? phase : kSpanningSources;
            for (int64_t unit = 0; unit < units; ++unit) {
              const GemmTile tile = decode_tile<kTileM, kTileN>(p, unit);
              if (!tile_in_launch<kTileM>(p, tile)) continue;
              ++computed[unit];
              std::set<int32_t> sources;
              for (int32_t m = tile.m0; m < std::min(tile.m0 + kTileM, tile.m_extent); ++m)
                sources.insert(l.items[tile.pair_begin + m].source);
              expect(phase < kSources ? sources == std::set<int32_t>{phase} : sources.size() > 1,
                     where + ", unit " + std::to_string(unit),
                     "a phase computes a tile with rows of a source not its own");
            }
          }
          p.only_source = kAllSources;
          for (int64_t unit = 0; unit < units; ++unit) {
            // The tile's group and pairs, from the list.
            const int64_t tile = chunk.first_tile() + unit / 2;
            int32_t g = 0;
            while (l.tile_offset[g + 1] <= tile) ++g;
            const int32_t first =
                l.begin[g] + static_cast<int32_t>(tile - l.tile_offset[g]) * kTileM;
            const int32_t last = std::min(first + kTileM, l.end[g]) - 1;
            const bool all_kept = kept_rows > 0 && last - l.begin[g / 2 * 2] < kept_rows;
            const bool wanted = l.expert[g] >= 0 && !all_kept;
            const bool whole = tile_in_launch<kTileM>(p, decode_tile<kTileM, kTileN>(p, unit));
            expect(whole == wanted, where + ", unit " + std::to_string(unit),
                   "one launch over every source computes another set of tiles");
            expect(computed[unit] == (wanted ? 1 : 0), where + ", unit " + std::to_string(unit),
                   "the source phases compute a tile twice, or not at all");
          }
        }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernels.

constexpr uint16_t kPoisonHalf = 0x7fa1;       // a NaN in bfloat16 and in float16 alike
constexpr int32_t kKeptRows = 3, kExpertsPerDevice = 2;

template <class V>
bool same_bytes(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0;
}

// Whether elements [first, first + count) of `v` all hold their poison.
template <class V>
bool poisoned(const std::vector<V>& v, int64_t first, int64_t count, const V& poison) {
  for (int64_t i = first; i < first + count; ++i)
    if (std::memcmp(&v[i], &poison, sizeof(V)) != 0) return false;
  return true;
}

struct Case {
  const char* name;
  int activation;
  int32_t f, columns;
  bool half;    // float16, else bfloat16
  bool others;  // groups of other devices, as with a plan: then nothing is kept
};

// A grid's warps one after another, each's lanes as fibers.
void launch(int blocks, const std::string& where, const std::function<void()>& kernel) {
  lanes::grid = dim3(blocks);
  for (int b = 0; b < blocks; ++b)
    for (int w = 0; w < kTokenWarps; ++w)
      expect(lanes::run_warp(make_uint3(b, 0, 0), w, kernel), where,
             "a warp's lanes part at a collective");
}

// expert_gemm's configuration as its epilogues read it: the list's M tile, an N tile, 4 warps,
// operand layouts whose epilogues include the pass's (gemm_epilogues.cuh's `serves`).
template <class T, int kN, Major kB>
struct TileConfig {
  using Element = T;
  static constexpr int kTileM = 8, kTileN = kN, kThreads = 128;
  static constexpr Major kAMajor = Major::kK, kBMajor = kB;
};

// The float32 accumulator tile in shared memory, as the kernel's sC is read.
template <int kN>
struct TileC {
  std::vector<float> v;
  float& operator()(int r, int c) { return v[r * kN + c]; }
  float operator()(int r, int c) const { return v[r * kN + c]; }
};

// expert_gemm's epilogue over every tile of `q.gemm`'s launch (decode_tile, tile_in_launch), a
// block a tile: its C the rows of `q.rows` (the GEMM's product, [chunk rows, n + n_split]) that
// the kernel's loads take for the tile's M and N indices (RowMap and operand_row for A's rows,
// ColumnMap for B's columns), and poison where they take none.
template <class Config>
void run_tiles(const RowPass& q, const std::string& where) {
  constexpr int kTileM = Config::kTileM, kTileN = Config::kTileN;
  const GemmParams& p = q.gemm;
  GemmOperand product{};  // C as a pair-row operand: its rows are A's
  product.source = RowSource::kPair;
  product.data = q.rows;
  product.ld = p.n + p.n_split;
  lanes::grid = dim3(1);
  const int64_t units = num_units<kTileM, kTileN>(p);
  for (int64_t unit = 0; unit < units; ++unit) {
    const GemmTile tile = decode_tile<kTileM, kTileN>(p, unit);
    if (!tile_in_launch<kTileM>(p, tile)) continue;
    const RowMap rows{tile.m0, tile.m_extent};
    const int32_t half = columns_per_tile<kTileN>(p);
    const ColumnMap columns{half, tile.n_tile * half, p.n_split, p.n};
    TileC<kTileN> sC{std::vector<float>(kTileM * kTileN, poison_float())};
    for (int r = 0; r < kTileM; ++r)
      for (int c = 0; c < kTileN; ++c)
        if (rows.valid(r) && columns.valid(c))
          sC(r, c) = operand_row<float>(product, p, tile, rows.index(r))[columns.index(c)];
    expect(lanes::run_block(make_uint3(0, 0, 0), Config::kThreads,
                            [&] { epilogue<Config>(p, tile, sC); }),
           where, "a block's threads part at a collective");
  }
}

// run_tiles on the configuration of N tile `columns` (the kernel's: 64 or 128) and B layout `b`.
template <class T>
void run_epilogue(int32_t columns, Major b, const RowPass& q, const std::string& where) {
  if (columns == 64 && b == Major::kK) run_tiles<TileConfig<T, 64, Major::kK>>(q, where);
  if (columns == 64 && b == Major::kMN) run_tiles<TileConfig<T, 64, Major::kMN>>(q, where);
  if (columns == 128 && b == Major::kK) run_tiles<TileConfig<T, 128, Major::kK>>(q, where);
  if (columns == 128 && b == Major::kMN) run_tiles<TileConfig<T, 128, Major::kMN>>(q, where);
}

// What a pass writes, poisoned; `kept` holds poison for the forward (which writes it) and the
// kept h for the backward (which reads it).
template <class T>
struct Outputs {
  std::vector<float> kept, dots;
  std::vector<T> out, dh, aw;
};

template <class T>
void check_kernels(const Case& c, std::mt19937& rng) {
  const bool gated = IsGated(static_cast<Activation>(c.activation));
  const int32_t f = c.f, gf = gated ? 2 * f : f, out_ld = f + 4;
  const int32_t slices = (f + c.columns - 1) / c.columns;
  const int32_t tile_m = 8, chunk_tiles = 3;
  const T poison_t = T::bitcast(kPoisonHalf);
  const float poison_f = poison_float();
  std::normal_distribution<float> normal;
  const List l = make_list(rng, tile_m, c.others);
  std::vector<float> weights(kSources * kTokens * kTopK);
  for (float& w : weights) w = normal(rng);
  const int64_t rows = int64_t{chunk_tiles} * tile_m;
  const int64_t kept_size = int64_t{(l.groups() + kExpertsPerDevice - 1) / kExpertsPerDevice} *
                            kKeptRows * gf;

  const int before = errors;
  for (int32_t index = 0; index <= l.tiles() / chunk_tiles + 1; ++index)  // one wholly past the end
    for (int32_t only_source : {kAllSources, 1}) {
      const Chunk chunk{chunk_tiles, index};
      const std::vector<Pair> want = pass_rows(l, chunk, only_source, l.tiles());
      auto random = [&](int64_t size) {
        std::vector<float> v(size);
        for (float& x : v) x = normal(rng);
        return v;
      };
      const std::vector<float> c_rows = random(rows * gf), u_rows = random(rows * f),
                               h = random(rows * gf), kept_h = random(kept_size);
      GemmParams p = params_of(l, chunk, only_source, f);
      p.activation = c.activation;
      p.gated = gated;
      p.top_k = kTopK;
      for (int s = 0; s < kSources; ++s) p.weights[s] = weights.data() + s * kTokens * kTopK;
      p.weights_f32 = 1;
      p.experts_per_device = kExpertsPerDevice;
      p.kept_rows = c.others ? 0 : kKeptRows;
      p.out_ld = out_ld;
      p.num_partials = slices;

      // The forward's and the backward's passes into `b`.
      auto forward = [&](Outputs<T>& b) {
        RowPass q{p, c_rows.data()};
        q.gemm.epilogue = Epilogue::kActivation;
        q.gemm.n_split = gated ? f : 0;
        q.gemm.out = b.out.data();
        q.gemm.kept = c.others ? nullptr : b.kept.data();
        return q;
      };
      auto backward = [&](Outputs<T>& b) {
        RowPass q{p, u_rows.data()};
        q.gemm.epilogue = Epilogue::kActivationBackward;
        q.gemm.h = h.data();
        q.gemm.kept = c.others ? nullptr : b.kept.data();
        q.gemm.dh = b.dh.data();
        q.gemm.aw = b.aw.data();
        q.gemm.dot_partial = b.dots.data();
        return q;
      };
      auto fresh = [&](bool forward_pass) {
        return Outputs<T>{forward_pass ? std::vector<float>(kept_size, poison_f) : kept_h,
                          std::vector<float>(rows * slices, poison_f),
                          std::vector<T>(rows * out_ld, poison_t),
                          std::vector<T>(rows * gf, poison_t), std::vector<T>(rows * f, poison_t)};
      };

      // What the passes must write: the row functions' bytes at one column a lane, called for
      // each row of the pass with its pair; the dots, per kVector, as warp_sum adds the lanes'.
      const bool vectors = f % 4 == 0 && c.columns % 4 == 0;  // else one column a lane alone
      Outputs<T> ref_fwd = fresh(true), ref_bwd = fresh(false);
      std::vector<float> ref_dots[2] = {ref_bwd.dots, ref_bwd.dots};  // kVector 1, 4
      Outputs<T> scratch = fresh(false);  // the four-column parts' dh and w * a, unread
      const RowPass qf = forward(ref_fwd), qb = backward(ref_bwd), q4 = backward(scratch);
      for (int64_t row = 0; row < rows; ++row) {
        if (want[row].group < 0) continue;
        const int32_t g = want[row].group;
        const int64_t pos = want[row].pos;
        const float* c_row = c_rows.data() + row * (f + qf.gemm.n_split);
        const float* u_row = u_rows.data() + row * f;
        for (int32_t s = 0; s < slices; ++s) {
          const int32_t begin = s * c.columns, end = std::min(begin + c.columns, f);
          float parts[2][32];
          for (int lane = 0; lane < 32; ++lane) {
            activate_row<T, 1>(qf.gemm, g, pos, row, begin, end, lane,
                               [&](int32_t j) { return Floats<1>::load(c_row + j); });
            parts[0][lane] = activation_backward_row<T, 1>(
                qb.gemm, g, pos, row, begin, end, lane,
                [&](int32_t j) { return Floats<1>::load(u_row + j); });
            if (vectors) {
              parts[1][lane] = activation_backward_row<T, 4>(
                  q4.gemm, g, pos, row, begin, end, lane,
                  [&](int32_t j) { return Floats<4>::load(u_row + j); });
            }
          }
          for (int v = 0; v < (vectors ? 2 : 1); ++v) {
            for (int offset = 16; offset > 0; offset /= 2) {
              float next[32];
              for (int lane = 0; lane < 32; ++lane)
                next[lane] = parts[v][lane] + parts[v][lane ^ offset];
              std::copy(next, next + 32, parts[v]);
            }
            ref_dots[v][row * slices + s] = parts[v][0];
          }
        }
      }

      for (int vector : {1, 4}) {
        if (vector == 4 && !vectors) continue;
        // One block (a warp takes many items), three, and the launcher's on a large GPU (a warp
        // takes one at most).
        const int full = static_cast<int>((rows * slices + kTokenWarps - 1) / kTokenWarps);
        for (int blocks : {1, 3, full}) {
          const std::string where = std::string(c.name) + ", " +
                                    describe(l, chunk, only_source, blocks) + ", " +
                                    std::to_string(vector) + " columns a lane";
          Outputs<T> fwd = fresh(true), bwd = fresh(false);
          const RowPass qf = forward(fwd), qb = backward(bwd);
          launch(blocks, where, [&] {
            if (vector == 4) {
              activate_rows<T, 4>(qf, c.columns);
              activation_backward_rows<T, 4>(qb, c.columns);
            } else {
              activate_rows<T, 1>(qf, c.columns);
              activation_backward_rows<T, 1>(qb, c.columns);
            }
          });
          bool untouched = true, past_f = true;
          for (int64_t row = 0; row < rows; ++row) {
            past_f &= poisoned(fwd.out, row * out_ld + f, out_ld - f, poison_t);
            if (want[row].group >= 0) continue;
            untouched &= poisoned(fwd.out, row * out_ld, out_ld, poison_t) &&
                         poisoned(bwd.dh, row * gf, gf, poison_t) &&
                         poisoned(bwd.aw, row * f, f, poison_t) &&
                         poisoned(bwd.dots, row * slices, slices, poison_f);
          }
          expect(untouched, where, "a row outside the pass was written");
          expect(past_f, where, "out was written past column F");
          expect(same_bytes(fwd.kept, ref_fwd.kept), where,
                 "the kept rows are not the pairs' h (or a row that keeps none was written)");
          expect(same_bytes(fwd.out, ref_fwd.out), where,
                 "a is not the row function's at one column a lane for the row's pair");
          expect(same_bytes(bwd.dh, ref_bwd.dh), where,
                 "dh is not the row function's at one column a lane for the row's pair");
          expect(same_bytes(bwd.aw, ref_bwd.aw), where,
                 "w * a is not the row function's at one column a lane for the row's pair");
          expect(same_bytes(bwd.dots, ref_dots[vector == 4]), where,
                 "a slice's dot is not its lanes' parts in warp_sum's order, at its index");
          expect(same_bytes(bwd.kept, kept_h), where, "the backward wrote the kept h");
        }
      }

      // expert_gemm's epilogues over the chunk's tiles, an N tile a slice (its N tiles are 64
      // and 128 columns): the passes' bytes at one column a lane, an N tile's dot a slice's.
      // Only the launch over every source: a source phase of expert_gemm computes the tiles
      // wholly of its source (the spanning phase the rest), not the pass's rows of that source.
      if (only_source == kAllSources && c.columns % 64 == 0) {
        const std::string where = std::string(c.name) + ", " +
                                  describe(l, chunk, only_source, 1) + ", expert_gemm's epilogues";
        Outputs<T> fwd = fresh(true), bwd = fresh(false);
        run_epilogue<T>(c.columns, Major::kMN, forward(fwd), where);
        run_epilogue<T>(c.columns, Major::kK, backward(bwd), where);
        expect(same_bytes(fwd.kept, ref_fwd.kept), where, "the kept rows are not the passes'");
        expect(same_bytes(fwd.out, ref_fwd.out), where, "a is not the passes'");
        expect(same_bytes(bwd.dh, ref_bwd.dh), where, "dh is not the passes'");
        expect(same_bytes(bwd.aw, ref_bwd.aw), where, "w * a is not the passes'");
        expect(same_bytes(bwd.dots, ref_dots[0]), where, "an N tile's dot is not its slice's");
        expect(same_bytes(bwd.kept, kept_h), where, "the backward wrote the kept h");

        // kStoreF32 (GEMM2's y and the recomputed h, (K, MN); the backward's dx, (K, K)): each
        // row of the pass its product's row, every other row and column past F its poison.
        for (const Major b : {Major::kMN, Major::kK}) {
          std::vector<float> out(rows * out_ld, poison_f);
          RowPass q{p, u_rows.data()};
          q.gemm.epilogue = Epilogue::kStoreF32;
          q.gemm.out = out.data();
          run_epilogue<T>(c.columns, b, q, where);
          std::vector<float> want_out(rows * out_ld, poison_f);
          for (int64_t row = 0; row < rows; ++row)
            if (want[row].group >= 0)
              std::copy_n(u_rows.data() + row * f, f, want_out.data() + row * out_ld);
          expect(same_bytes(out, want_out), where,
                 "a float32 row stored is not the product's, or a row outside the pass written");
        }
      }
    }
  if (errors == before) std::printf("%s: ok\n", c.name);
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // what it printed, should a bug crash it
  std::mt19937 rng(5);
  check_walk(rng);
  check_walk_stops_at_the_end(rng);
  check_walk_returns(rng);
  check_grouped_gemm<Major::kMN>(rng);
  check_grouped_gemm<Major::kK>(rng);
  {
    const int before = errors;
    check_phase_tiles<4>(rng);
    check_phase_tiles<8>(rng);
    if (errors == before) std::printf("expert_gemm's tiles, each once across the phases: ok\n");
  }
  // F past one slice, its last shorter (200 = 128 + 72, 264 = 2 * 128 + 8); slices narrower than
  // a lane span at four columns a lane (64, 32); one slice wider than F (36); F % 4 != 0 (18).
  const Case cases[] = {
      // name                                                 act  F    columns half   others
      {"swiglu, F 200 in slices of 128, bfloat16, kept h",     0, 200, 128, false, false},
      {"geglu, F 264 in slices of 128, float16, other groups", 1, 264, 128, true,  true},
      {"gelu, F 200 in slices of 32, bfloat16, kept h",        2, 200,  32, false, false},
      {"relu, F 36 in one slice of 64, float16, kept h",       3,  36,  64, true,  false},
      {"silu, F 18 (one column a lane), bfloat16, other groups", 4, 18, 128, false, true},
      {"swiglu, F 136 in slices of 64, float16, other groups", 0, 136,  64, true,  true},
  };
  for (const Case& c : cases)
    c.half ? check_kernels<cutlass::half_t>(c, rng) : check_kernels<cutlass::bfloat16_t>(c, rng);
  std::printf("errors: %d\n", errors);
  return errors == 0 ? 0 : 1;
}
