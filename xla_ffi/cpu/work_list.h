// Which routed rows a device computes: read from every peer's expert_ids, split by the plan.
//
// The rows of expert e are ordered (source device, token, k); worker slot s of e computes the
// rows [bounds[e, s], bounds[e, s + 1]) of that order (slot 0 is the owner; the last slot in
// use is open-ended). Without reassignment the plan is one slot, the owner, for every expert.
#pragma once

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/moe_call.h"
#include "xla_ffi/moe_dims.h"
#include "xla_ffi/peer_group.h"

namespace ccf {

// A reassignment plan of S helpers: workers [E, S + 1] (device ids, -1 unused), bounds
// [E, S + 2].
struct PlanView {
  const int32_t* workers;
  const int32_t* bounds;
  int64_t num_slots;  // S + 1

  int WorkerOf(const MoeDims& d, int64_t expert, int64_t position) const;
};

// InvalidArgument saying what is wrong with the plan, or success.
xla::ffi::Error CheckPlan(const PlanView& plan, const MoeDims& d);

// Whether any expert's rows are split with a helper device.
bool HasHelpers(const PlanView& plan, const MoeDims& d);

// One routed (token, k) pair of a source device. `slot` is the computing device's staging row
// for that token: its rank among the token's distinct computing devices, so each staging row
// of the source has exactly one writer. `fetched` indexes the device's fetched token rows.
struct WorkRow {
  int32_t src, token, k, slot, fetched;
};

// The rows of one expert that this device computes, in (source, token, k) order.
struct ExpertWork {
  int64_t expert;  // global id
  std::vector<WorkRow> rows;
};

struct SourceToken {
  int32_t src, token;
};

// Everything one device computes in a call, worked out on the host (cuda::WorkList is the CUDA
// handler's, built on the device).
struct HostWorkList {
  std::vector<ExpertWork> experts;  // ascending expert id
  // The distinct (source, token) rows the experts need, in (source, token) order: each is read
  // from its source once however many of the token's K experts are here, and the results go
  // back as one partial-sum row per (token, device).
  std::vector<SourceToken> tokens;
  int64_t remote_tokens = 0;  // of those, rows on other devices
};

// `me`'s work. Checks every id of every peer, so all devices reach the same verdict on bad
// input: returns InvalidArgument naming the first bad id, or success.
xla::ffi::Error BuildHostWorkList(const std::vector<PeerBuffers>& peers, const MoeDims& d,
                                  const PlanView& plan, int me, HostWorkList* work);

}  // namespace ccf
