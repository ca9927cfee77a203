// Checks, on the host, the device-built work list of cuda/work_list.cuh: the kernels the GPU runs
// before every call's GEMMs, built as host C++ with each block's threads as fibers
// (tests/warp_lanes.h: their matches, ballots and barriers as on the GPU; cub's block scans as
// tests/host_cub's), against the CPU handler's list of the same call (BuildHostWorkList,
// xla_ffi/cpu/work_list.cc), over random routings: one device of a group and every device
// emulated; K = 1, 2, 4 and 8; lists of part of one chunk to many blocks; 1024 experts a device;
// M tiles of 8, 64 and 128; ids of another group's experts (a hierarchical call); reassignment
// plans with random helpers and bounds (unused slots, empty and overlong slices) for each device
// and emulated; out-of-range ids; an aborted barrier. In each case:
//   - each pair that the device computes is listed once, in its expert's (source, token, k)
//     order, each group of the list is computed by one device (the CPU list's for its pairs),
//     and each pair's staging slot is the CPU list's; no other pair is listed;
//   - positions, the groups' bounds and tile offsets, and each pair's scratch row (place_rows)
//     are what the GEMMs read: a tile's rows in one group, no row shared, none past the tiles;
//   - an out-of-range id is the fault recorded (of the recorded source only) and gets no work;
//     after an aborted barrier no id is read and the list is empty;
//   - the same bytes whether the blocks run in order or in reverse, and nothing written past the
//     list (nor through the null expert_offset and pair_device of a call without a plan);
//   - and for plans as no handler checks them on the GPU (workers outside the group, bounds in
//     any order and out of range): every pair of the group listed by one device, which all the
//     lists agree on, with the staging slot the source side counts, and lists the GEMMs can walk.
// Prints each case and the number of errors; exits 1 on any.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime.h>

#include "tests/warp_lanes.h"

#include "cuda/api.cuh"

// Shared memory: one copy for the fibers of the block running (blocks run one at a time).
#undef __shared__
#define __shared__ thread_local

namespace ccf::cuda {

thread_local int32_t s_counts[kListWarps * kMaxExpertsHere];
thread_local int32_t s_run[kListWarps * kMaxExpertsHere];

// exception.cuh's, which it defines for nvcc alone: the first fault wins.
void record_device_error(DeviceError* error, int32_t code, int32_t source, int32_t token,
                         int32_t k, int64_t value, int64_t limit) {
  if (error->code != kDeviceOk) return;
  *error = DeviceError{code, source, token, k, error->aborted, error->signalled, value, limit};
}

}  // namespace ccf::cuda

using std::max;  // the kernels' min and max of int: CUDA's, which nvcc alone declares
using std::min;

#include "cuda/work_list.cuh"
#include "xla_ffi/cpu/work_list.cc"
#include "xla_ffi/moe_call.cc"

using namespace ccf;
using namespace ccf::cuda;

namespace {

int errors = 0;

void expect(bool ok, const std::string& where, const std::string& what) {
  if (!ok && errors++ < 30) std::printf("  %s: %s\n", where.c_str(), what.c_str());
}

constexpr int32_t kPoison = 0x7f7f7f7f;

struct Case {
  const char* name;
  int D, T, K, E_local;
  int me;            // the device whose list it is; -1: every device's (emulated)
  int other_groups;  // ids of experts past the group's D * E_local, valid
  int slots;         // a plan's slots S + 1 (0: no plan)
  int tile_m;
  int bad_ids;
  int recorded_source;
  bool aborted;
};

// What the kernels write, with the buffers the handler carves.
struct Lists {
  std::vector<int32_t> pair_code, pair_pos, pair_row, chunk_counts, expert_count, expert_offset,
      group_begin, group_end, group_expert, tile_offset, pair_device;
  std::vector<WorkItem> items;
  DeviceError error{};

  bool operator==(const Lists& o) const {
    const auto same_items = std::equal(items.begin(), items.end(), o.items.begin(),
                                       o.items.end(), [](const WorkItem& a, const WorkItem& b) {
                                         return a.source == b.source && a.token == b.token &&
                                                a.k == b.k;
                                       });
    return std::tie(pair_code, pair_pos, pair_row, expert_count, expert_offset, group_begin,
                    group_end, group_expert, tile_offset, pair_device) ==
               std::tie(o.pair_code, o.pair_pos, o.pair_row, o.expert_count, o.expert_offset,
                        o.group_begin, o.group_end, o.group_expert, o.tile_offset,
                        o.pair_device) &&
           same_items && error.code == o.error.code && error.source == o.error.source &&
           error.token == o.error.token && error.k == o.error.k;
  }
};

// A grid of `blocks` blocks of kListThreads, in order or in reverse.
void launch(int blocks, bool reverse, const std::string& where,
            const std::function<void()>& kernel) {
  lanes::grid = dim3(blocks);
  for (int i = 0; i < blocks; ++i) {
    const unsigned b = reverse ? blocks - 1 - i : i;
    expect(lanes::run_block(make_uint3(b, 0, 0), kListThreads, kernel), where,
           "a block's threads part at a collective");
  }
}

// The handler's launch sequence of the list (cuda_launch.cc's LaunchWorkList), with the grids
// work_list.cu's launchers give.
Lists build(const Routing& r, int32_t tile_m, bool reverse, const std::string& where) {
  const int64_t pairs = int64_t{r.num_sources} * r.num_tokens * r.top_k;
  const int32_t chunks = work_list_chunks(pairs);
  const bool planned = r.plan.workers != nullptr;
  const int32_t groups = r.num_experts_here * (planned ? r.plan.slots : 1);
  Lists l;
  l.pair_code.assign(pairs, kPoison);
  l.pair_pos.assign(pairs, kPoison);
  l.pair_row.assign(pairs, kPoison);
  l.chunk_counts.assign(int64_t{r.num_experts_here} * chunks, kPoison);
  l.expert_count.assign(r.num_experts_here, kPoison);
  if (planned) l.expert_offset.assign(r.num_experts_here + 1, kPoison);
  l.items.assign(pairs, WorkItem{kPoison, kPoison, kPoison});
  l.group_begin.assign(groups, kPoison);
  l.group_end.assign(groups, kPoison);
  l.group_expert.assign(groups, kPoison);
  l.tile_offset.assign(groups + 1, kPoison);
  if (planned) l.pair_device.assign(pairs, kPoison);
  const WorkList list{l.pair_code.data(),    l.pair_pos.data(),
                      l.pair_row.data(),     l.chunk_counts.data(),
                      l.expert_count.data(), planned ? l.expert_offset.data() : nullptr,
                      l.items.data(),        tile_m,
                      groups,                l.group_begin.data(),
                      l.group_end.data(),    l.group_expert.data(),
                      l.tile_offset.data(),  planned ? l.pair_device.data() : nullptr};
  launch(chunk_blocks(chunks), reverse, where + ", count_pairs",
         [&] { count_pairs(r, list, chunks, &l.error); });
  launch(r.num_experts_here, reverse, where + ", scan_counts", [&] { scan_counts(list, chunks); });
  launch(chunk_blocks(chunks), reverse, where + ", fill_work_list",
         [&] { fill_work_list(r, list, chunks); });
  if (planned) {
    launch(item_blocks(int64_t{r.num_sources} * r.num_tokens), reverse, where + ", assign_plan",
           [&] { assign_plan_pairs(r, list); });
    launch(1, reverse, where + ", assign_plan", [&] { assign_plan_groups(r, list); });
  }
  if (pairs > 0) launch(item_blocks(pairs), reverse, where + ", place_rows",
                        [&] { place_rows(r, list); });
  return l;
}

// The CPU handler's rows of every device in scope: (source, token, k) -> (device, slot, expert).
struct HostRow {
  int device, slot;
  int64_t expert;
};

std::map<std::tuple<int, int, int>, HostRow> host_rows(const Case& c,
                                                       const std::vector<int32_t>& ids,
                                                       const std::vector<int32_t>& workers,
                                                       const std::vector<int32_t>& bounds,
                                                       const std::string& where) {
  MoeDims d{};
  d.tokens = c.T;
  d.k = c.K;
  d.experts_local = c.E_local;
  d.num_devices = c.D;
  // Out-of-range ids (which the CPU handler refuses) as the first expert of another group: the
  // GPU gives them no work and no slot, as it does another group's.
  d.experts_total = int64_t{c.D} * c.E_local * (c.other_groups + 1) + 1;
  std::vector<int32_t> valid = ids;
  for (int32_t& id : valid)
    if (id < 0 || id >= int64_t{c.D} * c.E_local * (c.other_groups + 1))
      id = static_cast<int32_t>(d.group_experts());
  std::vector<PeerBuffers> peers(c.D);
  for (int s = 0; s < c.D; ++s) peers[s].ids = valid.data() + int64_t{s} * c.T * c.K;
  const ccf::PlanView plan{workers.data(), bounds.data(), static_cast<int64_t>(workers.size()) /
                                                         d.group_experts()};
  expect(CheckPlan(plan, d).success(), where, "the case's plan is one the handlers take");
  std::map<std::tuple<int, int, int>, HostRow> rows;
  for (int dev = 0; dev < c.D; ++dev) {
    if (c.me >= 0 && dev != c.me) continue;
    HostWorkList work;
    expect(BuildHostWorkList(peers, d, plan, dev, &work).success(), where, "the CPU list");
    for (const ExpertWork& e : work.experts)
      for (const WorkRow& row : e.rows)
        rows[{row.src, row.token, row.k}] = HostRow{dev, row.slot, e.expert};
  }
  return rows;
}

// The group computed here that holds list position `pos`, or -1.
int group_of(const Lists& l, int32_t pos) {
  for (int g = 0; g < static_cast<int>(l.group_begin.size()); ++g)
    if (l.group_expert[g] >= 0 && l.group_begin[g] <= pos && pos < l.group_end[g]) return g;
  return -1;
}

// The list as the GEMMs walk it, whatever the routing and plan: groups in list order without
// overlap (without a plan, the experts end to end), each within the list, a group not computed
// here without rows, tiles from each group's tile offset; each listed pair's scratch row in its
// group's tiles at its index there, no row twice, none past the tiles, no item past the list.
void check_walk(const Lists& l, int32_t tile_m, bool planned, const std::string& where) {
  const int32_t groups = static_cast<int32_t>(l.group_begin.size());
  const int64_t pairs = static_cast<int64_t>(l.pair_code.size());
  int64_t total = 0;
  for (int32_t count : l.expert_count) total += count;
  int32_t tiles = 0, last_end = 0;
  for (int32_t g = 0; g < groups; ++g) {
    const std::string group = where + ", group " + std::to_string(g);
    expect(l.tile_offset[g] == tiles, group, "its tile offset");
    expect(l.group_begin[g] <= l.group_end[g] && l.group_end[g] <= total &&
               (planned || l.group_begin[g] == (g ? l.group_end[g - 1] : 0)),
           group, "its bounds");
    if (l.group_expert[g] < 0) {
      expect(l.group_begin[g] == l.group_end[g], group, "rows in a group not computed here");
      continue;
    }
    expect(l.group_begin[g] >= last_end, group, "overlaps the group before");
    last_end = l.group_end[g];
    tiles += (l.group_end[g] - l.group_begin[g] + tile_m - 1) / tile_m;
  }
  expect(l.tile_offset[groups] == tiles, where, "the list's tiles");
  std::set<int32_t> scratch_rows;
  for (int64_t i = 0; i < pairs; ++i) {
    if (l.pair_code[i] < 0) continue;
    const std::string pair = where + ", pair " + std::to_string(i);
    const int32_t pos = l.pair_pos[i];
    const int g = pos >= 0 && pos < total ? group_of(l, pos) : -1;
    if (g < 0) {
      expect(false, pair, "in no group computed here");
      continue;
    }
    expect(l.pair_row[i] == int64_t{l.tile_offset[g]} * tile_m + (pos - l.group_begin[g]), pair,
           "its scratch row");
    expect(scratch_rows.insert(l.pair_row[i]).second, pair, "a scratch row twice");
  }
  expect(scratch_rows.empty() || *scratch_rows.rbegin() < int64_t{tiles} * tile_m, where,
         "a scratch row past the tiles");
  for (int64_t pos = total; pos < pairs; ++pos)
    expect(l.items[pos].source == kPoison, where, "an item past the list's end");
}

// The ids `[D, T, K]` of a case: skewed towards a few hot experts, so some get several tiles and
// some none, with c.bad_ids of them (their indices into `bad`) out of range.
std::vector<int32_t> random_ids(const Case& c, std::mt19937& rng, std::set<int64_t>* bad) {
  const int group_experts = c.D * c.E_local;
  const int64_t valid = int64_t{group_experts} * (c.other_groups + 1);
  std::vector<int32_t> ids(int64_t{c.D} * c.T * c.K);
  std::uniform_int_distribution<int64_t> any(0, valid - 1);
  std::uniform_int_distribution<int> hot(0, std::min(3, group_experts - 1));
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % 3 == 0 ? hot(rng) : any(rng));
  while (static_cast<int>(bad->size()) < c.bad_ids)
    bad->insert(std::uniform_int_distribution<int64_t>(0, ids.size() - 1)(rng));
  for (int64_t i : *bad) ids[i] = rng() % 2 ? -1 - static_cast<int32_t>(rng() % 5)
                                            : static_cast<int32_t>(valid + rng() % 5);
  return ids;
}

// The routing the handler gives the kernels for the case's device (cuda_launch.cc's MakeRouting).
Routing routing_of(const Case& c, const std::vector<int32_t>& ids,
                   const std::vector<int32_t>& workers, const std::vector<int32_t>& bounds,
                   const int32_t* aborted) {
  const bool planned = c.slots > 0;
  const int group_experts = c.D * c.E_local;
  Routing r{};
  for (int s = 0; s < c.D; ++s)  // after an aborted barrier no id may be read
    r.ids[s] = c.aborted ? nullptr : ids.data() + int64_t{s} * c.T * c.K;
  r.num_sources = c.D;
  r.num_tokens = c.T;
  r.top_k = c.K;
  r.experts_per_device = c.E_local;
  r.first_expert = planned || c.me < 0 ? 0 : c.me * c.E_local;
  r.num_experts_here = planned || c.me < 0 ? group_experts : c.E_local;
  r.experts_total = int64_t{group_experts} * (c.other_groups + 1);
  r.aborted = aborted;
  if (planned) r.plan = cuda::PlanView{workers.data(), bounds.data(), c.slots};
  r.me = c.me;
  r.recorded_source = c.recorded_source;
  return r;
}

void check(const Case& c, uint32_t seed) {
  const std::string where = std::string(c.name) + " (seed " + std::to_string(seed) + ")";
  std::mt19937 rng(seed);
  const int group_experts = c.D * c.E_local;
  const int64_t valid = int64_t{group_experts} * (c.other_groups + 1);
  const bool planned = c.slots > 0;
  std::set<int64_t> bad;
  const std::vector<int32_t> ids = random_ids(c, rng, &bad);

  // A plan: slot 0 the owner from row 0, then helpers (or an unused slot) with ascending bounds,
  // some past the expert's rows; the identity plan of one slot for the CPU list without one.
  const int slots = planned ? c.slots : 1;
  std::vector<int32_t> workers(int64_t{group_experts} * slots, -1);
  std::vector<int32_t> bounds(int64_t{group_experts} * (slots + 1), 0);
  for (int e = 0; e < group_experts; ++e) {
    workers[int64_t{e} * slots] = e / c.E_local;
    int32_t bound = 0;
    const int32_t rows = 2 * c.T * c.K / std::max(1, c.E_local);
    for (int s = 1; s < slots; ++s) {
      workers[int64_t{e} * slots + s] = rng() % 4 == 0 ? -1 : static_cast<int32_t>(rng() % c.D);
      bound += static_cast<int32_t>(rng() % (rows + 1));
      bounds[int64_t{e} * (slots + 1) + s] = bound;
    }
    bounds[int64_t{e} * (slots + 1) + slots] = INT32_MAX;
  }

  const int32_t aborted = c.aborted;
  const Routing r = routing_of(c, ids, workers, bounds, &aborted);

  const Lists l = build(r, c.tile_m, false, where);
  expect(build(r, c.tile_m, true, where) == l, where, "blocks in reverse give other bytes");

  // The fault record: a bad id of a recorded source, or none.
  bool recordable = false;
  for (int64_t i : bad)
    recordable |= c.recorded_source < 0 || i / (int64_t{c.T} * c.K) == c.recorded_source;
  recordable &= !c.aborted;
  const int64_t faulted =
      (int64_t{l.error.source} * c.T + l.error.token) * c.K + l.error.k;
  expect(recordable ? l.error.code == kBadExpertId && bad.count(faulted) &&
                          l.error.value == ids[faulted] && l.error.limit == valid &&
                          (c.recorded_source < 0 || l.error.source == c.recorded_source)
                    : l.error.code == kDeviceOk,
         where, "the fault record");

  // The pairs listed, against the CPU handler's.
  const auto rows = c.aborted ? std::map<std::tuple<int, int, int>, HostRow>{}
                              : host_rows(c, ids, workers, bounds, where);
  const int64_t pairs = static_cast<int64_t>(ids.size());
  int64_t here = 0;
  for (int64_t i = 0; i < pairs; ++i) {
    const int s = static_cast<int>(i / (c.T * c.K)), t = static_cast<int>(i / c.K % c.T),
              k = static_cast<int>(i % c.K);
    const auto row = rows.find({s, t, k});
    const std::string pair = where + ", pair " + std::to_string(i);
    if (row == rows.end()) {
      expect(l.pair_code[i] == -1 && l.pair_row[i] == kPoison, pair, "listed, not the CPU's");
      continue;
    }
    ++here;
    const int32_t code = l.pair_code[i], pos = l.pair_pos[i];
    expect(code >= 0 && code / kMaxPeers == row->second.expert - r.first_expert &&
               code % kMaxPeers == row->second.slot,
           pair, "its expert or staging slot");
    if (code < 0 || pos < 0 || pos >= pairs) continue;
    const WorkItem item = l.items[pos];
    expect(item.source == s && item.token == t && item.k == k, pair, "its item");
    if (planned) expect(l.pair_device[i] == row->second.device, pair, "its device");
    const int g = group_of(l, pos);  // check_walk: there is one
    expect(g < 0 || l.group_expert[g] == (planned ? row->second.expert
                                                  : r.first_expert + code / kMaxPeers),
           pair, "its group's expert");
  }
  expect(here == static_cast<int64_t>(rows.size()), where, "pairs of the CPU's not listed");

  // Each group's pairs in (source, token, k) order, one device's.
  check_walk(l, c.tile_m, planned, where);
  int64_t total = 0;
  for (int32_t count : l.expert_count) total += count;
  const int32_t tiles = l.tile_offset.back();
  for (int32_t g = 0; g < static_cast<int32_t>(l.group_begin.size()); ++g) {
    if (l.group_expert[g] < 0) continue;
    const std::string group = where + ", group " + std::to_string(g);
    std::set<int> devices;
    for (int32_t pos = l.group_begin[g]; pos < l.group_end[g]; ++pos) {
      const WorkItem& item = l.items[pos];
      const auto row = rows.find({item.source, item.token, item.k});
      if (row == rows.end()) {
        expect(false, group, "lists a pair the CPU does not");
        continue;
      }
      devices.insert(row->second.device);
      if (pos > l.group_begin[g]) {
        const WorkItem& before = l.items[pos - 1];
        expect(std::tie(before.source, before.token, before.k) <
                   std::tie(item.source, item.token, item.k),
               group, "not in (source, token, k) order");
      }
    }
    expect(devices.size() <= 1, group, "pairs of two devices");
  }
  // After an aborted barrier nothing is here, not even an empty group of a plan (whose zero
  // weight-gradient partial would still go to its owner).
  if (c.aborted)
    expect(total == 0 && tiles == 0 &&
               (!planned || std::all_of(l.group_expert.begin(), l.group_expert.end(),
                                        [](int32_t e) { return e == -1; })),
           where, "a list after an aborted barrier");
}

// A plan as no handler checks it on the GPU (device arrays): workers inside and outside the
// group, bounds in any order and out of range. Whatever it holds, every pair of the group is
// computed by one device (each device's list and the emulated one agree which, and list it
// there alone) with the staging slot the source side counts; no other pair is listed.
void check_any_plan(uint32_t seed) {
  const std::string where = "any plan (seed " + std::to_string(seed) + ")";
  Case c{"any plan", 4, 100, 4, 2, -1, 1, 4, 8, 3, -1, false};
  std::mt19937 rng(seed);
  std::set<int64_t> bad;
  const std::vector<int32_t> ids = random_ids(c, rng, &bad);
  const int group_experts = c.D * c.E_local;
  std::vector<int32_t> workers(int64_t{group_experts} * c.slots);
  std::vector<int32_t> bounds(int64_t{group_experts} * (c.slots + 1));
  for (int32_t& w : workers) w = static_cast<int32_t>(rng() % (c.D + 6)) - 3;
  for (int32_t& b : bounds) b = static_cast<int32_t>(rng() % 400) - 50;
  const int32_t aborted = 0;
  std::vector<Lists> lists;  // emulated, then device 0, 1, ...
  for (int me = -1; me < c.D; ++me) {
    c.me = me;
    const std::string list = where + ", device " + std::to_string(me);
    lists.push_back(build(routing_of(c, ids, workers, bounds, &aborted), c.tile_m, false, list));
    check_walk(lists.back(), c.tile_m, true, list);
  }
  for (int64_t i = 0; i < static_cast<int64_t>(ids.size()); ++i) {
    const std::string pair = where + ", pair " + std::to_string(i);
    const bool in_group = ids[i] >= 0 && ids[i] < group_experts;
    int listed = 0, device = -1;
    for (int me = 0; me < c.D; ++me) {
      if (lists[me + 1].pair_code[i] < 0) continue;
      ++listed;
      device = me;
    }
    expect(listed == (in_group ? 1 : 0), pair, "listed by no device, or by two");
    for (const Lists& l : lists)
      expect(l.pair_device[i] == device, pair, "the devices' lists disagree on its device");
    if (device < 0) continue;
    expect(lists[0].pair_code[i] == lists[device + 1].pair_code[i], pair,
           "the emulated list gives it another expert or slot");
    // Its slot: the rank of its device among the token's distinct computing devices.
    const int64_t first = i - i % c.K;
    std::set<int32_t> below;
    for (int k = 0; k < c.K; ++k) {
      const int32_t d = lists[0].pair_device[first + k];
      if (d >= 0 && d < device) below.insert(d);
    }
    expect(lists[0].pair_code[i] % kMaxPeers == static_cast<int32_t>(below.size()), pair,
           "its staging slot");
  }
}

}  // namespace

int main() {
  const Case cases[] = {
      {"one device of 4, K=2, part of one block", 4, 37, 2, 3, 2, 0, 0, 8, 0, 2, false},
      {"8 emulated, K=8, many blocks", 8, 300, 8, 4, -1, 0, 0, 128, 0, -1, false},
      {"K=1, whole chunks", 8, 256, 1, 1, 5, 0, 0, 128, 0, 5, false},
      {"more chunks than a block has threads", 8, 600, 8, 2, 6, 0, 0, 128, 0, 6, false},
      {"1024 experts a device, emulated", 2, 64, 8, 512, -1, 0, 0, 8, 0, -1, false},
      {"hierarchical, bad ids of the recorded source", 2, 100, 4, 8, 1, 1, 0, 64, 5, 1, false},
      {"bad ids, every source recorded", 4, 64, 2, 2, 0, 0, 0, 8, 3, -1, false},
      {"bad ids, one source records", 4, 64, 2, 2, 0, 0, 0, 8, 6, 0, false},
      {"an aborted barrier", 4, 50, 2, 2, 1, 0, 0, 8, 2, 1, true},
      {"plan, device 0", 4, 200, 4, 2, 0, 0, 3, 8, 0, 0, false},
      {"plan, device 1", 4, 200, 4, 2, 1, 0, 3, 8, 0, 1, false},
      {"plan, device 3, K=8", 4, 100, 8, 2, 3, 0, 4, 64, 0, 3, false},
      {"plan, emulated", 4, 200, 4, 2, -1, 0, 3, 8, 0, -1, false},
      {"plan, hierarchical, bad ids", 4, 100, 2, 2, 3, 1, 2, 8, 4, 3, false},
      {"plan, an aborted barrier", 4, 50, 2, 2, 0, 0, 3, 8, 0, 0, true},
  };
  for (const Case& c : cases) {
    const int before = errors;
    for (uint32_t seed = 1; seed <= 3; ++seed) check(c, seed);
    std::printf("%s: %s\n", c.name, errors == before ? "ok" : "errors");
  }
  const int before = errors;
  for (uint32_t seed = 1; seed <= 3; ++seed) check_any_plan(seed);
  std::printf("any plan: %s\n", errors == before ? "ok" : "errors");
  std::printf("errors: %d\n", errors);
  return errors ? 1 : 0;
}
