#include "xla_ffi/cpu/work_list.h"

#include <algorithm>

namespace ccf {

int PlanView::WorkerOf(const MoeDims& d, int64_t expert, int64_t position) const {
  const int32_t* w = workers + expert * num_slots;
  const int32_t* b = bounds + expert * (num_slots + 1);
  int worker = d.owner(expert);
  for (int64_t s = 0; s < num_slots && w[s] >= 0; ++s) {
    worker = w[s];
    if (position < b[s + 1]) break;
  }
  return worker;
}

xla::ffi::Error CheckPlan(const PlanView& plan, const MoeDims& d) {
  for (int64_t e = 0; e < d.group_experts(); ++e) {
    const int32_t* w = plan.workers + e * plan.num_slots;
    const int32_t* b = plan.bounds + e * (plan.num_slots + 1);
    if (w[0] != d.owner(e) || b[0] != 0)
      return InvalidArgument("plan: slot 0 of expert " + std::to_string(e) +
                             " must be its owner, device " + std::to_string(d.owner(e)) +
                             ", from row 0");
    for (int64_t s = 0; s < plan.num_slots; ++s) {
      if (w[s] < -1 || w[s] >= d.num_devices || b[s + 1] < b[s])
        return InvalidArgument("plan: expert " + std::to_string(e) + " slot " +
                               std::to_string(s) + " names device " + std::to_string(w[s]) +
                               " or has decreasing bounds");
    }
  }
  return xla::ffi::Error::Success();
}

bool HasHelpers(const PlanView& plan, const MoeDims& d) {
  for (int64_t e = 0; e < d.group_experts(); ++e)
    for (int64_t s = 1; s < plan.num_slots; ++s)
      if (plan.workers[e * plan.num_slots + s] >= 0) return true;
  return false;
}

xla::ffi::Error BuildHostWorkList(const std::vector<PeerBuffers>& peers, const MoeDims& d,
                                  const PlanView& plan, int me, HostWorkList* work) {
  const int64_t num_experts = d.group_experts();
  // rows_before[src * E + e]: rows of expert e from sources before `src`: where src's rows of
  // e start in e's (source, token, k) order.
  std::vector<int64_t> rows_before((d.num_devices + 1) * num_experts, 0);
  for (int src = 0; src < d.num_devices; ++src) {
    const int32_t* ids = peers[src].ids;
    int64_t* next = rows_before.data() + (src + 1) * num_experts;
    std::copy(next - num_experts, next, next);
    for (int64_t i = 0; i < d.tokens * d.k; ++i) {
      const int32_t e = ids[i];
      if (e < 0 || e >= d.experts_total)
        return InvalidArgument("expert_ids[" + std::to_string(i / d.k) + ", " +
                               std::to_string(i % d.k) + "] = " + std::to_string(e) +
                               " on device " + std::to_string(src) + " is outside [0, " +
                               std::to_string(d.experts_total) + ")");
      if (e < num_experts) ++next[e];
    }
  }
  std::vector<std::vector<WorkRow>> by_expert(num_experts);
  work->tokens.clear();
  work->remote_tokens = 0;
  std::vector<int64_t> position(num_experts);
  std::vector<int> device(d.k);
  for (int src = 0; src < d.num_devices; ++src) {
    const int32_t* ids = peers[src].ids;
    std::copy_n(rows_before.data() + src * num_experts, num_experts, position.begin());
    for (int64_t t = 0; t < d.tokens; ++t) {
      const int32_t* row = ids + t * d.k;
      bool mine = false;
      for (int64_t k = 0; k < d.k; ++k) {
        // -1: another group's expert.
        device[k] = row[k] < num_experts ? plan.WorkerOf(d, row[k], position[row[k]]++) : -1;
        mine |= device[k] == me;
      }
      if (!mine) continue;
      // The token's distinct computing devices before `me` give `me`'s staging slot.
      int32_t slot = 0;
      for (int64_t j = 0; j < d.k; ++j) {
        if (device[j] < 0 || device[j] >= me) continue;
        slot += std::find(device.begin(), device.begin() + j, device[j]) == device.begin() + j;
      }
      const int32_t fetched = static_cast<int32_t>(work->tokens.size());
      work->tokens.push_back({src, static_cast<int32_t>(t)});
      work->remote_tokens += src != me;
      for (int64_t k = 0; k < d.k; ++k)
        if (device[k] == me)
          by_expert[row[k]].push_back(
              {src, static_cast<int32_t>(t), static_cast<int32_t>(k), slot, fetched});
    }
  }
  work->experts.clear();
  for (int64_t e = 0; e < num_experts; ++e)
    if (!by_expert[e].empty()) work->experts.push_back({e, std::move(by_expert[e])});
  return xla::ffi::Error::Success();
}

}  // namespace ccf
