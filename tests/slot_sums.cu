// Checks, on the host, the combine's kernels of cuda/slot_sums.cuh: the code the GPU runs, built
// as host C++. scatter_slots and combine_slots run over random routings (a token's pairs on one
// to eight devices, K past 32, runs of over 32 pairs in one slot, other groups' experts and bad
// ids, with and without a reassignment plan, H past one step of the scatter and not a multiple
// of 4), each as one emulated group's work list and as every real device's own, in chunks of
// three rows and in one, at one and four columns a lane, into staging poisoned with NaN.
// y (float32 and bfloat16) and d_expert_weights must equal, bitwise, the sums in the order the
// kernels promise: a slot's rows in scratch-row order, then the slots in device order; a
// poisoned y is a slot read that the call never wrote. Also: a source that gave up gets no rows,
// an aborted call's outputs are NaN, and sum_partials sums its plan slots in order.
//
// A warp's 32 lanes run as fibers on one thread, each until it waits at a warp collective, which
// completes once all 32 wait at it: shuffles and ballots exchange values as on the GPU, and a
// collective that not every lane reaches (a divergent full-mask collective) is an error
// (tests/warp_lanes.h). Prints each case and the number of errors; exits 1 on any.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "tests/warp_lanes.h"

#include "cuda/slot_sums.cuh"

// scatter_slots' dynamic shared memory, for the largest K. Warps run one at a time, each in its
// own part, as in a block.
namespace ccf::cuda {
int32_t s_order[kTokenWarps * kMaxTopK];
}

using namespace ccf::cuda;
using Bf16 = cutlass::bfloat16_t;

namespace {

int errors = 0;

void expect(bool ok, const std::string& where, const char* what) {
  if (!ok && errors++ < 30) std::printf("  %s: %s\n", where.c_str(), what);
}

// NaNs no kernel computes, in memory the kernels must not read: the staging before the call,
// and the scratch rows that hold no pair. A sum that adds one keeps its bits (but for the sign).
constexpr uint32_t kUnwrittenSlot = 0x7fc0dead, kPaddingRow = 0x7fc0beef;

float nan_with(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

bool holds(float x, uint32_t poison) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return (bits & 0x7fffffffu) == poison;
}

template <class V>
bool same_bits(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0;
}

// A grid's warps one after another: no warp of these kernels waits on another.
void launch(dim3 grid, const std::string& where, const std::function<void()>& kernel) {
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x)
      for (int warp = 0; warp < kTokenWarps; ++warp)
        expect(lanes::run_warp(make_uint3(x, y, 0), warp, kernel), where,
               "a warp's lanes part at a collective");
}

constexpr int kPartials = 3;  // a pair's dot partials in the backward

struct Shape {
  const char* name;
  int D, T, K, E, H;  // E: experts a device
  bool plan;
  int other_experts;  // ids past the group's D * E: another group computes them
  double bad, hot;    // the shares of bad ids and of expert 0 (long runs in its slot)
};

struct Problem {
  Shape s;
  int pairs, slots;
  int64_t experts_total;
  std::vector<int32_t> ids, device, slot;  // [pairs], the sources' back to back; device -1: none
  std::vector<int32_t> order;              // the computed pairs in work-list order
  std::vector<float> weights, x, partials;  // [pairs], [pairs, H], [pairs, kPartials]
};

// Ids may repeat within a token, which only lengthens its runs. With a plan, half the pairs go to
// a device other than their expert's owner, as a plan's helpers take them.
Problem make_problem(const Shape& s, std::mt19937& rng) {
  Problem p{s, s.D * s.T * s.K, std::min(s.K, s.D), int64_t{s.D} * s.E + s.other_experts};
  std::uniform_real_distribution<double> share;
  std::normal_distribution<float> normal;
  for (int i = 0; i < p.pairs; ++i) {
    const double r = share(rng);
    const int32_t id = r < s.bad          ? (rng() % 2 ? -1 : static_cast<int32_t>(p.experts_total))
                       : r < s.bad + s.hot ? 0
                                           : static_cast<int32_t>(rng() % p.experts_total);
    p.ids.push_back(id);
    p.device.push_back(id < 0 || id >= s.D * s.E ? -1
                       : s.plan && rng() % 2      ? static_cast<int32_t>(rng() % s.D)
                                                  : id / s.E);
    p.weights.push_back(normal(rng));
  }
  // A pair's slot: its device's rank among the devices computing its token's pairs.
  for (int first = 0; first < p.pairs; first += s.K) {
    std::set<int32_t> devices(p.device.begin() + first, p.device.begin() + first + s.K);
    devices.erase(-1);
    for (int i = first; i < first + s.K; ++i)
      p.slot.push_back(p.device[i] < 0 ? -1 : std::distance(devices.begin(),
                                                             devices.find(p.device[i])));
  }
  for (int i = 0; i < p.pairs; ++i)
    if (p.device[i] >= 0) p.order.push_back(i);
  std::shuffle(p.order.begin(), p.order.end(), rng);
  p.x.resize(int64_t{p.pairs} * s.H);
  p.partials.resize(p.pairs * kPartials);
  for (auto* v : {&p.x, &p.partials})
    for (float& value : *v) value = normal(rng);
  return p;
}

// A work list as the scatter reads it: each pair's code (expert * kMaxPeers + slot; -1 when not
// computed here) and scratch row.
struct List {
  std::vector<int32_t> code, row;
  int64_t rows = 0;
};

// Device `device`'s list (-1: every device's, as an emulated group has it): its pairs in the
// problem's order, padding rows (a group's last tile) between some. A real device's list keeps
// its pairs' order in the emulated one, as the work lists do.
List make_list(const Problem& p, int32_t device, std::mt19937& rng) {
  List l{std::vector<int32_t>(p.pairs, -1), std::vector<int32_t>(p.pairs, -1)};
  for (int32_t i : p.order) {
    if (device >= 0 && p.device[i] != device) continue;
    if (rng() % 4 == 0) l.rows += 1 + rng() % 3;
    l.code[i] = p.ids[i] * kMaxPeers + p.slot[i];
    l.row[i] = l.rows++;
  }
  return l;
}

struct Outputs {
  std::vector<float> staging, y, dw;
  std::vector<Bf16> y16;
};

struct Run {
  bool backward, emulated;
  int64_t chunk_rows;  // 0: the whole list in one chunk
  int vector;          // columns a lane
  const uint64_t* flags = nullptr;
  int32_t aborted = 0;
};

template <int kVector>
void scatter(const ScatterParams& sp, const std::string& where) {
  launch(dim3(token_blocks(int64_t{sp.pairs.num_sources} * sp.pairs.num_tokens)), where,
         [&] { scatter_slots<float, kVector>(sp); });
}

template <class T, int kVector>
void combine(const CombineParams& cp, const std::string& where) {
  launch(dim3(token_blocks(cp.num_tokens)), where, [&] { combine_slots<T, kVector>(cp); });
}

Outputs run(const Problem& p, const Run& r, const std::string& where, std::mt19937& rng) {
  const Shape& s = p.s;
  const int64_t staging_per_source = int64_t{s.T} * p.slots * s.H;
  Outputs o{std::vector<float>(s.D * staging_per_source, nan_with(kUnwrittenSlot)),
            std::vector<float>(int64_t{s.D} * s.T * s.H), std::vector<float>(p.pairs, 0.0f),
            std::vector<Bf16>(int64_t{s.D} * s.T * s.H)};
  std::vector<List> lists;
  for (int32_t device = r.emulated ? -1 : 0; device < (r.emulated ? 0 : s.D); ++device)
    lists.push_back(make_list(p, device, rng));

  for (const List& l : lists) {
    const int64_t chunk = r.chunk_rows > 0 ? r.chunk_rows : std::max<int64_t>(l.rows, 1);
    for (int64_t row_begin = 0; row_begin < l.rows; row_begin += chunk) {
      std::vector<float> rows(chunk * s.H, nan_with(kPaddingRow)),
          partials(chunk * kPartials, nan_with(kPaddingRow));
      for (int i = 0; i < p.pairs; ++i) {
        const int64_t at = l.row[i] - row_begin;
        if (l.code[i] < 0 || at < 0 || at >= chunk) continue;
        std::copy_n(p.x.begin() + int64_t{i} * s.H, s.H, rows.begin() + at * s.H);
        std::copy_n(p.partials.begin() + i * kPartials, kPartials,
                    partials.begin() + at * kPartials);
      }
      ScatterParams sp{};
      sp.pairs = {l.code.data(), l.row.data(), s.D, s.T, s.K, row_begin, row_begin + chunk};
      sp.hidden = s.H;
      sp.num_slots = p.slots;
      sp.rows = rows.data();
      sp.weighted = !r.backward;
      sp.weights_f32 = 1;
      for (int source = 0; source < s.D; ++source) {
        sp.weights[source] = p.weights.data() + source * s.T * s.K;
        sp.staging[source] = o.staging.data() + source * staging_per_source;
        sp.d_weights[source] = o.dw.data() + source * s.T * s.K;
      }
      if (r.backward) {
        sp.dot_partial = partials.data();
        sp.num_partials = kPartials;
      }
      sp.flags = r.flags;
      r.vector == 4 ? scatter<4>(sp, where) : scatter<1>(sp, where);
    }
  }

  // The emulated group's sources in one launch, as its combine runs; a real device's alone.
  const int launches = r.emulated ? 1 : s.D, tokens = r.emulated ? s.D * s.T : s.T;
  for (int first = 0; first < launches; ++first) {
    const int64_t token = int64_t{first} * tokens;
    CombineParams cp{};
    cp.ids = p.ids.data() + token * s.K;
    cp.pair_device = s.plan ? p.device.data() + token * s.K : nullptr;
    cp.staging = o.staging.data() + token * p.slots * s.H;
    cp.num_tokens = tokens;
    cp.top_k = s.K;
    cp.hidden = s.H;
    cp.num_slots = p.slots;
    cp.experts_per_device = s.E;
    cp.num_experts = s.D * s.E;
    cp.experts_total = p.experts_total;
    cp.d_weights = r.backward ? o.dw.data() + token * s.K : nullptr;
    cp.weights_f32 = 1;
    cp.aborted = &r.aborted;
    cp.out = o.y.data() + token * s.H;
    r.vector == 4 ? combine<float, 4>(cp, where) : combine<float, 1>(cp, where);
    cp.out = o.y16.data() + token * s.H;
    r.vector == 4 ? combine<Bf16, 4>(cp, where) : combine<Bf16, 1>(cp, where);
  }
  return o;
}

// y and d_expert_weights as the kernels promise them: each device's pairs of a token in list
// order from zero, then the devices' sums in ascending order; NaN for a token with a bad id (and
// d_expert_weights NaN at the bad ids alone).
struct Expected {
  std::vector<float> y, dw;
};

Expected expected(const Problem& p, bool backward) {
  const Shape& s = p.s;
  Expected e{std::vector<float>(int64_t{s.D} * s.T * s.H), std::vector<float>(p.pairs, 0.0f)};
  auto dot = [&](int i) {
    float sum = 0.0f;
    for (int j = 0; j < kPartials; ++j) sum += p.partials[i * kPartials + j];
    return sum;
  };
  std::vector<int> position(p.pairs);
  for (int n = 0; n < static_cast<int>(p.order.size()); ++n) position[p.order[n]] = n;
  for (int token = 0; token < s.D * s.T; ++token) {
    std::vector<std::pair<int, int>> computed;  // (device, list position) of each computed pair
    bool bad = false;
    for (int i = token * s.K; i < (token + 1) * s.K; ++i) {
      const bool bad_id = p.ids[i] < 0 || p.ids[i] >= p.experts_total;
      bad |= bad_id;
      if (p.device[i] >= 0) computed.push_back({p.device[i], position[i]});
      if (backward) e.dw[i] = bad_id ? NAN : p.device[i] >= 0 ? dot(i) : 0.0f;
    }
    std::sort(computed.begin(), computed.end());
    for (int h = 0; h < s.H; ++h) {
      float y = 0.0f;
      for (size_t n = 0; n < computed.size();) {
        const int device = computed[n].first;
        float sum = 0.0f;
        for (; n < computed.size() && computed[n].first == device; ++n) {
          const int i = p.order[computed[n].second];
          sum += (backward ? 1.0f : p.weights[i]) * p.x[int64_t{i} * s.H + h];
        }
        y = device == computed[0].first ? sum : y + sum;
      }
      e.y[int64_t{token} * s.H + h] = bad ? NAN : y;
    }
  }
  return e;
}

// Every way the kernels may run a problem must give the expected sums, bitwise.
void check(const Shape& shape, std::mt19937& rng) {
  const Problem p = make_problem(shape, rng);
  for (bool backward : {false, true}) {
    const Expected e = expected(p, backward);
    const std::vector<Bf16> y16(e.y.begin(), e.y.end());
    const int before = errors;
    for (bool emulated : {true, false})
      for (int64_t chunk_rows : {0, 3})
        for (int vector : {1, 4}) {
          if (shape.H % 4 != 0 && vector == 4) continue;
          const std::string where =
              std::string(shape.name) + (backward ? ", backward" : ", forward") +
              (emulated ? ", emulated" : ", real devices") +
              (chunk_rows ? ", chunks of " + std::to_string(chunk_rows) + " rows" : ", one chunk") +
              ", " + std::to_string(vector) + " columns a lane";
          const Outputs o = run(p, {backward, emulated, chunk_rows, vector}, where, rng);
          auto any = [&](uint32_t poison) {
            return std::any_of(o.y.begin(), o.y.end(), [&](float y) { return holds(y, poison); });
          };
          if (any(kUnwrittenSlot))
            expect(false, where, "y read a staging slot the call never wrote");
          else if (any(kPaddingRow))
            expect(false, where, "y read a scratch row that holds no pair");
          else
            expect(same_bits(o.y, e.y), where, "y is not its slots' sums in list order");
          expect(same_bits(o.y16, y16), where, "bfloat16 y is not the sums rounded once");
          if (backward) expect(same_bits(o.dw, e.dw), where, "d_expert_weights are not the dots");
        }
    if (errors == before)
      std::printf("%s, %s: ok\n", shape.name, backward ? "backward" : "forward");
  }
}

// A source that gave up (its flag reads kAbortFlag at the scatter) gets none of its rows nor
// d_expert_weights, and the other sources theirs; a call whose barrier aborted gives NaN
// everywhere, whatever the staging holds.
void check_abort(const Shape& shape, std::mt19937& rng) {
  const Problem p = make_problem(shape, rng);
  const Shape& s = p.s;
  const Expected e = expected(p, true);
  constexpr int kGaveUp = 1;
  uint64_t flags[kMaxPeers] = {};
  flags[kGaveUp] = kAbortFlag;
  int before = errors;
  const Outputs o = run(p, {true, false, 3, 4, flags}, "a source gave up", rng);
  const int64_t staging = int64_t{s.T} * p.slots * s.H, y = int64_t{s.T} * s.H;
  for (int source = 0; source < s.D; ++source) {
    const auto slots = o.staging.begin() + source * staging;
    const bool untouched =
        std::all_of(slots, slots + staging, [](float x) { return holds(x, kUnwrittenSlot); });
    const auto dw = o.dw.begin() + source * s.T * s.K;
    if (source == kGaveUp) {
      expect(untouched, "a source gave up", "its staging was written");
      expect(std::all_of(dw, dw + s.T * s.K, [](float x) { return x == 0.0f; }),
             "a source gave up", "its d_expert_weights were written");
    } else {
      expect(std::equal(o.y.begin() + source * y, o.y.begin() + (source + 1) * y,
                        e.y.begin() + source * y,
                        [](float a, float b) { return std::memcmp(&a, &b, 4) == 0; }),
             "a source gave up", "another source's y is not its sums");
    }
  }
  if (errors == before) std::printf("a source that gave up: ok\n");

  before = errors;
  for (bool emulated : {true, false}) {
    const Outputs o = run(p, {true, emulated, 0, 4, nullptr, 1}, "an aborted call", rng);
    expect(std::all_of(o.y.begin(), o.y.end(), [](float x) { return std::isnan(x); }),
           "an aborted call", "a y is not NaN");
    expect(std::all_of(o.dw.begin(), o.dw.end(), [](float x) { return std::isnan(x); }),
           "an aborted call", "a d_expert_weight is not NaN");
  }
  if (errors == before) std::printf("an aborted call: ok\n");
}

// sum_partials: each expert's gradients are its plan slots' partials in slot order, up to the
// first slot without a worker (the slots after it hold poison), rounded once; NaN once aborted.
void check_partial_sums(std::mt19937& rng) {
  constexpr int kExperts = 3, kSlots = 4, kIn = 150, kOut = 70, kElements = kIn + kOut;
  const std::vector<int32_t> workers = {0, -1, -1, -1, 1, 3, 0, -1, 2, 0, 1, 3};
  std::normal_distribution<float> normal;
  std::vector<float> partials(kExperts * kSlots * kElements);
  for (int slot = 0; slot < kExperts * kSlots; ++slot)
    for (int i = 0; i < kElements; ++i)
      partials[slot * kElements + i] = workers[slot] >= 0 ? normal(rng) : nan_with(kUnwrittenSlot);
  const int before = errors;
  for (int32_t aborted : {0, 1}) {
    std::vector<Bf16> dw_in(kExperts * kIn), dw_out(kExperts * kOut);
    const PartialSumParams sp{partials.data(), workers.data(), kExperts, kSlots, kIn, kOut,
                              dw_in.data(), dw_out.data(), &aborted};
    launch(dim3((kElements + kTokenThreads - 1) / kTokenThreads, kExperts), "sum_partials",
           [&] { sum_partials<Bf16>(sp); });
    std::vector<Bf16> want_in, want_out;
    for (int e = 0; e < kExperts; ++e)
      for (int i = 0; i < kElements; ++i) {
        const float* partial = partials.data() + e * kSlots * kElements + i;
        float sum = partial[0];
        for (int slot = 1; slot < kSlots && workers[e * kSlots + slot] >= 0; ++slot)
          sum += partial[slot * kElements];
        (i < kIn ? want_in : want_out).push_back(Bf16(aborted ? NAN : sum));
      }
    expect(same_bits(dw_in, want_in) && same_bits(dw_out, want_out), "sum_partials",
           aborted ? "not NaN in an aborted call" : "not the slots' sums in slot order");
  }
  if (errors == before) std::printf("sum_partials: ok\n");
}

}  // namespace

int main() {
  std::mt19937 rng(11);
  // Each a token's pairs on up to D devices; the names say what else each reaches.
  const Shape shapes[] = {
      // name                                      D  T   K  E     H  plan  other bad   hot
      {"two pairs a token, other groups' experts", 4, 8,  2, 2,   16, false, 8,    0.0,  0.0},
      {"H % 4 != 0, other groups' experts",        4, 8,  3, 2,   18, false, 2,    0.0,  0.5},
      {"H past a span of four columns a lane",     2, 9,  8, 1,  136, false, 0,    0.0,  0.0},
      {"eight devices, H past a step, bad ids",    8, 2, 16, 1,  520, false, 0,    0.02, 0.0},
      {"K past 32",                                3, 4, 40, 2,   20, false, 3,    0.0,  0.3},
      {"runs of over 32 pairs in a slot",          2, 3, 48, 1,   40, false, 0,    0.0,  0.95},
      {"a plan",                                   4, 6,  3, 2,   24, true,  0,    0.0,  0.7},
      {"a plan, H % 4 != 0, bad ids",              8, 4,  8, 1, 1030, true,  2,    0.02, 0.5},
  };
  for (const Shape& shape : shapes) check(shape, rng);
  check_abort(shapes[0], rng);
  check_partial_sums(rng);
  std::printf("errors: %d\n", errors);
  return errors == 0 ? 0 : 1;
}
