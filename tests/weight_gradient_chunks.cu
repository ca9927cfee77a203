// Checks, on the host, how a backward's weight gradients are summed over a work list that runs
// in chunks (cuda/gemm_units.cuh). Over random work lists (groups without rows, of one row, of
// whole and partial M-tiles, groups another device computes, chunks past the list's end) and
// chunks of 1 to 9 tiles, it replays one weight gradient's launches in the order
// xla_ffi/cuda/cuda_launch.cc's LaunchWeightGradient enqueues them:
//   - expert_gemm alone (the SM80 kernels, and any plan): CTAs walk their units (num_units,
//     next_unit, decode_tile), each from the group's carried sum (gemm_epilogues.cuh's load_carry)
//     or zero, its MMAs modelled as float sums, and store it through the kernel's epilogue (into
//     carry, or the gradient of its group), a block's threads as fibers (tests/warp_lanes.h);
//   - Hopper's split (skip_rows): expert_gemm stores the zeros of the groups without rows in
//     chunk 0, and grouped GEMMs sum the rest: the groups the chunk holds whole, then the carried
//     ones, each launch's problems as grouped_problems.cuh's build_reduction_problems writes
//     them (into a workspace of the size GroupArrays claims), CUTLASS's GEMM over them modelled
//     (tests/grouped_gemm_model.h: CuTe tensors of the arrays' pointers and strides, C unread
//     where beta is 0, K = 0 stores NaN), then finish_carry's stores.
// Every element of each computed group's gradient must be written once (its stores are counted)
// and equal its exact sum (small integers: float sums are exact in any order); with a plan, in
// its expert's owner's partial of its slot, and nothing else of the partials written; after an
// aborted barrier (no group with rows), NaN. No launch reads a padding row (NaN) or a row
// outside its chunk, and a carried launch has at most one problem. Prints each configuration
// kind and the number of errors; exits 1 on any.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "tests/warp_lanes.h"

using std::min;  // the kernels' min(int, int): CUDA's, which nvcc alone declares

#include "cuda/gemm_epilogues.cuh"
#include "cuda/gemm_units.cuh"
#include "cuda/grouped_problems.cuh"
#include "tests/grouped_gemm_model.h"

using namespace ccf::cuda;

namespace {

constexpr int kTileM = 128, kTileN = 64;
int errors = 0;

// An element of a gradient that counts the stores into it (the epilogue's `out[j] = T(sum)`).
struct Stored {
  float value = NAN;
  int stores = 0;
  Stored() = default;
  explicit Stored(float v) : value(v) {}
  Stored(const Stored&) = default;
  Stored& operator=(const Stored& other) {
    value = other.value;
    ++stores;
    return *this;
  }
};

// expert_gemm's weight-gradient configuration as its epilogues read it: both operands MN-major,
// its M and N tiles, 4 warps; the gradients' elements counted.
struct WeightGradientConfig {
  using Element = Stored;
  static constexpr int kTileM = 128, kTileN = 64, kThreads = 128;
  static constexpr Major kAMajor = Major::kMN, kBMajor = Major::kMN;
};

// The float32 accumulator tile in shared memory, as the kernel's sC is read.
struct TileC {
  std::vector<float> v = std::vector<float>(kTileM * kTileN, 0.0f);
  float& operator()(int r, int c) { return v[r * kTileN + c]; }
  float operator()(int r, int c) const { return v[r * kTileN + c]; }
};

void expect(bool ok, const char* what, int g) {
  if (!ok && errors++ < 20) std::printf("  group %d: %s\n", g, what);
}

// With a plan: groups are (expert, slot) pairs of kSlots slots, experts from 1 on, kExpertsHere
// to a device; each group's sums go to its expert's owner's partials, [kExpertsHere, kSlots,
// stride] float32, this gradient's part of each from kPartialOffset on (after the other's).
constexpr int kSlots = 2, kExpertsHere = 2, kDevices = 4, kPartialOffset = 5;
constexpr uint32_t kUnwritten = 0x7fc0beef;  // a NaN no sum is

struct List {
  bool planned;
  int m, n;                      // the gradient's shape, [m, n] per group
  std::vector<int32_t> begin, end, expert, tile_offset;
  std::vector<float> a, b;       // every tile's rows, [rows, m] and [rows, n]: pairs, else NaN
  std::vector<double> exact;     // [groups, m, n]
  int64_t worst_tiles;           // what the handler sizes chunks for
};

// `empty`: no group has rows, as after an aborted start barrier.
List make_list(std::mt19937& rng, bool planned, bool empty = false) {
  List l;
  l.planned = planned;
  // Gradients past one M-tile at times, and past one N-tile; or past finish_carry's block of
  // columns (kFinishThreads), then a few rows; or, without a plan, small ones of more groups
  // than the problems' blocks have threads (kProblemThreads). With a plan, experts 1 to 6:
  // devices 0 to 3.
  const int kind = rng() % 8;
  const bool wide = kind == 0, many = kind == 1 && !planned;
  const int groups = many ? kProblemThreads + 1 + rng() % 20 : 1 + rng() % 12;
  l.m = wide ? 1 + rng() % 4 : many ? 1 + rng() % 8 : 1 + rng() % 160;
  l.n = wide ? kFinishThreads + 1 + rng() % 64 : many ? 1 + rng() % 8 : 1 + rng() % 100;
  int32_t pos = 0, tile = 0;
  for (int g = 0; g < groups; ++g) {
    const int kind = rng() % 5;
    int rows = kind == 0 || empty ? 0 : kind == 1 ? 1 : kind == 2 ? 1 + rng() % 300
             : kind == 3 ? kTileM * (1 + rng() % 3) : 200 + rng() % 200;
    const bool elsewhere = planned && rng() % 4 == 0;  // a plan slot another device computes
    if (elsewhere) rows = 0;
    l.begin.push_back(pos);
    l.end.push_back(pos + rows);
    // Without a plan, device 1's experts: ids from `groups` on.
    l.expert.push_back(elsewhere ? -1 : planned ? 1 + g / kSlots : groups + g);
    l.tile_offset.push_back(tile);
    pos += rows;
    tile += (rows + kTileM - 1) / kTileM;
  }
  l.tile_offset.push_back(tile);
  const int64_t rows = int64_t{tile} * kTileM;
  l.a.assign(rows * l.m, NAN);
  l.b.assign(rows * l.n, NAN);
  l.exact.assign(int64_t{groups} * l.m * l.n, 0.0);
  std::uniform_int_distribution<int> small(-3, 3);
  for (int g = 0; g < groups; ++g)
    for (int i = 0; i < l.end[g] - l.begin[g]; ++i) {
      const int64_t row = int64_t{l.tile_offset[g]} * kTileM + i;
      for (int r = 0; r < l.m; ++r) l.a[row * l.m + r] = small(rng);
      for (int c = 0; c < l.n; ++c) l.b[row * l.n + c] = small(rng);
      for (int r = 0; r < l.m; ++r)
        for (int c = 0; c < l.n; ++c)
          l.exact[(int64_t{g} * l.m + r) * l.n + c] += l.a[row * l.m + r] * l.b[row * l.n + c];
    }
  // Pairs computed elsewhere count towards the worst case, so chunks past the list's end occur.
  const int64_t pairs = pos + rng() % 400;
  l.worst_tiles = (pairs + int64_t{groups} * (kTileM - 1)) / kTileM;
  return l;
}

struct Run {
  const List& l;
  GemmParams p{};
  std::vector<float> chunk_a, chunk_b, carry;
  std::vector<Stored> out;  // [groups, m, n]
  std::vector<std::vector<float>> partials;  // with a plan, each device's

  explicit Run(const List& list) : l(list) {}

  // One element of the chunk's operands, NaN past the list's tiles as in unwritten scratch.
  float at(const std::vector<float>& chunk, int width, int64_t row, int col) const {
    return row >= 0 && row < p.chunk.rows(kTileM) ? chunk[row * width + col] : NAN;
  }
  void store(int32_t g, int r, int c, float value) {
    out[(int64_t{g} * l.m + r) * l.n + c] = Stored(value);
  }

  // A CTA's threads through `body` (gemm_epilogues.cuh's carry load or epilogue), as fibers.
  void block(int64_t cta, int32_t g, const std::function<void()>& body) {
    expect(lanes::run_block(make_uint3(static_cast<unsigned>(cta), 0, 0),
                            WeightGradientConfig::kThreads, body),
           "a block's threads part at a collective", g);
  }

  // expert_gemm's CTAs over the chunk: from the carry (load_carry) or zeros, its MMAs as float
  // sums, k ascending, then the epilogue's stores into carry or the gradient.
  void sm80(ReductionPart part, int64_t grid) {
    p.part = part;
    const int64_t units = num_units<kTileM, kTileN>(p);
    for (int64_t cta = 0; cta < grid; ++cta)
      for (int64_t unit = next_unit<kTileM, kTileN>(p, cta, units, grid); unit < units;
           unit = next_unit<kTileM, kTileN>(p, unit + grid, units, grid)) {
        const GemmTile t = decode_tile<kTileM, kTileN>(p, unit);
        if (t.expert < 0) continue;
        expect(!p.skip_rows || l.tile_offset[t.group] == l.tile_offset[t.group + 1],
               "expert_gemm summed a group with rows under skip_rows", t.group);
        TileC sC;
        if (t.load_carry) block(cta, t.group, [&] { load_carry<WeightGradientConfig>(p, t, sC); });
        for (int r = t.m0; r < std::min(t.m0 + kTileM, l.m); ++r)
          for (int c = t.n_tile * kTileN; c < std::min((t.n_tile + 1) * kTileN, l.n); ++c)
            for (int k = 0; k < t.k_extent; ++k)
              sC(r - t.m0, c - t.n_tile * kTileN) +=
                  at(chunk_a, l.m, t.row_begin + k, r) * at(chunk_b, l.n, t.row_begin + k, c);
        block(cta, t.group, [&] { epilogue<WeightGradientConfig>(p, t, sC); });
      }
  }

  // A grid of `blocks` blocks of `threads`, each block's threads as fibers.
  void launch(int64_t blocks, int threads, const std::function<void()>& kernel) {
    lanes::grid = dim3(static_cast<unsigned>(blocks));
    for (int64_t b = 0; b < blocks; ++b)
      expect(lanes::run_block(make_uint3(static_cast<unsigned>(b), 0, 0), threads, kernel),
             "a block's threads part at a collective", -1);
  }

  // One grouped GEMM of the launch's part (G: the reduction's or the carry's): its problems as
  // build_reduction_problems writes them into a workspace of the size it claims, then the GEMM
  // over them (tests/grouped_gemm_model.h).
  template <class G>
  void grouped_gemm(float beta) {
    const int32_t groups = p.num_groups;
    const int64_t bytes = GroupArrays<G>::bytes(groups);
    std::vector<unsigned char> workspace(bytes + kWorkspaceAlignment, 0xa5);
    const GroupArrays<G> w = GroupArrays<G>::carve(workspace.data(), groups);
    launch((groups + kProblemThreads - 1) / kProblemThreads, kProblemThreads,
           [&] { build_reduction_problems<G>(p, w); });
    expect(std::all_of(workspace.begin() + bytes, workspace.end(),
                       [](unsigned char byte) { return byte == 0xa5; }),
           "the problems written past the arrays' bytes", -1);
    int problems = 0;
    for (int32_t g = 0; g < groups; ++g) {
      const int k = cute::get<2>(w.problems[g]);
      if (cute::get<0>(w.problems[g]) == 0) continue;
      ++problems;
      // The problem's rows within the chunk's operands.
      const int64_t first = w.a[g] - chunk_a.data();
      expect(first % l.m == 0 && w.b[g] - chunk_b.data() == first / l.m * l.n &&
                 first >= 0 && first / l.m + k <= p.chunk.rows(kTileM),
             "a problem's rows outside the chunk", g);
    }
    if (G::kReadsC) expect(problems <= 1, "several carried problems in one launch", -1);
    grouped_gemm_model(w, groups, beta);
  }

  // A grouped launch of the weight gradient (cuda/grouped_gemm_sm90.cu's, with the dtype's
  // elements for floats that count their stores): the reduction or the carry's GEMM; after
  // kContinued's, finish_carry.
  void grouped(ReductionPart part, int64_t grid) {
    p.part = part;
    if (part == ReductionPart::kEveryGroup) {
      grouped_gemm<GroupedOperands<float, Major::kMN, Major::kMN, Stored>>(0.0f);
      return;
    }
    // kContinued adds to the group's sum so far; kBegun starts it (C unread).
    using Carry = GroupedOperands<float, Major::kMN, Major::kMN, float, float>;
    grouped_gemm<Carry>(part == ReductionPart::kContinued ? 1.0f : 0.0f);
    if (part == ReductionPart::kContinued)
      launch(grid, kFinishThreads, [&] { finish_carry<Stored>(p); });
  }

  // LaunchWeightGradient's launches in each chunk.
  // `aborted`: the call's start barrier aborted (DeviceError::aborted set), so the gradients
  // are NaN, stored once each.
  void all_chunks(int32_t chunk_tiles, bool skip_rows, int64_t grid, bool aborted = false) {
    const int32_t aborted_flag = aborted;
    p.aborted = &aborted_flag;
    const int32_t groups = static_cast<int32_t>(l.begin.size());
    p.shape = GemmShape::kPairReduction;
    p.m = l.m;
    p.n = l.n;
    p.num_groups = groups;
    p.group_begin = l.begin.data();
    p.group_end = l.end.data();
    p.group_expert = l.expert.data();
    p.tile_offset = l.tile_offset.data();
    p.tile_m = kTileM;
    p.skip_rows = skip_rows;
    const int64_t chunks = (l.worst_tiles + chunk_tiles - 1) / chunk_tiles;
    const bool carrying = chunks > 1;
    const int64_t elements = int64_t{l.m} * l.n;  // of one group's gradient
    carry.assign(elements, NAN);
    out.assign(groups * elements, Stored());
    p.epilogue = Epilogue::kStoreExpert;
    p.out = out.data();
    p.out_ld = l.n;
    p.out_expert_stride = elements;
    p.carry = carrying ? carry.data() : nullptr;
    if (l.planned) {
      float unwritten;
      std::memcpy(&unwritten, &kUnwritten, sizeof(float));
      p.plan_slots = kSlots;
      p.experts_per_device = kExpertsHere;
      p.partial_offset = kPartialOffset;
      p.partial_stride = kPartialOffset + elements + 3;
      partials.assign(kDevices, std::vector<float>(kExpertsHere * kSlots * p.partial_stride,
                                                   unwritten));
      for (int d = 0; d < kDevices; ++d) p.partials[d] = partials[d].data();
    }
    for (int32_t index = 0; index < chunks; ++index) {
      p.chunk = {chunk_tiles, index};
      const int64_t first = p.chunk.first_row(kTileM), rows = p.chunk.rows(kTileM);
      chunk_a.assign(rows * l.m, NAN);
      chunk_b.assign(rows * l.n, NAN);
      for (int64_t r = 0; r < rows && first + r < int64_t(l.a.size()) / l.m; ++r) {
        std::copy_n(&l.a[(first + r) * l.m], l.m, &chunk_a[r * l.m]);
        std::copy_n(&l.b[(first + r) * l.n], l.n, &chunk_b[r * l.n]);
      }
      p.a.data = chunk_a.data();  // the pairs' rows, [rows, m]: A M-major
      p.a.ld = l.m;
      p.b.data = chunk_b.data();
      p.b.ld = l.n;
      if (!skip_rows) {
        if (carrying) {
          sm80(ReductionPart::kContinued, grid);
          sm80(ReductionPart::kBegun, grid);
        } else {
          sm80(ReductionPart::kEveryGroup, grid);
        }
        continue;
      }
      if (index == 0) sm80(carrying ? ReductionPart::kBegun : ReductionPart::kEveryGroup, grid);
      grouped(ReductionPart::kEveryGroup, grid);
      if (carrying) {
        grouped(ReductionPart::kContinued, grid);
        grouped(ReductionPart::kBegun, grid);
      }
    }
    int64_t in_partials = 0;  // elements the groups' sums fill in the partials
    for (int32_t g = 0; g < groups; ++g) {
      const int64_t base = g * elements;
      const int32_t e = l.expert[g];
      const int want = e >= 0 && !l.planned ? 1 : 0;
      bool once = true, equal = true;
      for (int64_t i = 0; i < elements; ++i) {
        const Stored& element = out[base + i];
        once = once && element.stores == want;
        equal = equal && (want == 0 || (aborted ? std::isnan(element.value)
                                                : element.value == static_cast<float>(
                                                                       l.exact[base + i])));
      }
      if (e >= 0 && l.planned) {  // the owner's partial of the expert's slot
        const float* partial = partials[e / kExpertsHere].data() +
                               ((e % kExpertsHere) * kSlots + g % kSlots) * p.partial_stride +
                               kPartialOffset;
        for (int64_t i = 0; i < elements; ++i)
          equal = equal && partial[i] == static_cast<float>(l.exact[base + i]);
        in_partials += elements;
      }
      expect(once, want ? "an element written other than once"
                        : "an element written of another device's group, or with a plan",
             g);
      expect(equal, "a sum other than the exact one", g);
    }
    int64_t written = 0;
    for (const std::vector<float>& device : partials)
      for (const float& x : device) written += std::memcmp(&x, &kUnwritten, sizeof(float)) != 0;
    expect(written == in_partials, "a partial written outside its group's sums", -1);
  }
};

}  // namespace

int main() {
  std::mt19937 rng(2026);
  int lists = 0;
  for (const bool skip_rows : {false, true}) {
    const int before = errors;
    for (int i = 0; i < 300; ++i) {
      // Plans keep to expert_gemm (LaunchWeightGradient sets skip_rows only without one).
      const List list = make_list(rng, /*planned=*/!skip_rows && i % 2 == 1);
      Run(list).all_chunks(1 + rng() % 9, skip_rows, 1 + rng() % 9);
      ++lists;
    }
    std::printf("%s: %s\n", skip_rows ? "grouped GEMMs beside expert_gemm" : "expert_gemm alone",
                errors == before ? "ok" : "FAILED");
  }
  {
    const int before = errors;
    for (int i = 0; i < 20; ++i) {
      const List list = make_list(rng, /*planned=*/false, /*empty=*/true);
      Run(list).all_chunks(1 + rng() % 9, /*skip_rows=*/i % 2 == 1, 1 + rng() % 9,
                           /*aborted=*/true);
      ++lists;
    }
    std::printf("after an aborted barrier, NaN: %s\n", errors == before ? "ok" : "FAILED");
  }
  std::printf("work lists: %d\nerrors: %d\n", lists, errors);
  return errors != 0;
}
