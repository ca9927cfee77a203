// The fused MoE on the host: XLA FFI handlers for the simulated CPU devices of one process.
//
// Per call, on each device of the expert-parallel group:
//   publish  its buffers in the (call site, group) PeerGroup and meet the peers;
//   plan     the rows it computes, read straight from every peer's expert_ids, in one fixed
//            order, split between owners and helpers by the reassignment plan (work_list.h);
//   compute  tiles of those rows (expert_cpu.h): gather x rows from the peers (the dispatch),
//            GEMM, activation, GEMM, and accumulate the weighted result into the SOURCE
//            device's staging row for (token, slot) (the combine);
//   combine  after the second barrier, each device sums its own staging slots in slot order.
// The backward pass mirrors it, re-reading rows from the peers; it recomputes each row's hidden
// activation h = x @ w_in unless the forward kept it (residuals="hidden": expert_cpu.h's
// KeptHidden, in the computing device's own result). Owners add their helpers' weight-gradient
// partials in slot order before a last barrier. Each call runs on a thread of its own
// (host_async.h), so its waits for the peers never hold a thread of XLA's executor.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "common/activation.h"
#include "xla_ffi/cpu/cpu_gemm.h"
#include "xla_ffi/cpu/expert_cpu.h"
#include "xla_ffi/cpu/host_async.h"
#include "xla_ffi/cpu/host_dtype.h"
#include "xla_ffi/moe_call.h"
#include "xla_ffi/cpu/moe_cpu.h"
#include "xla_ffi/moe_dims.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/region_layout.h"
#include "xla_ffi/cpu/shared_group.h"
#include "xla_ffi/shared_memory.h"
#include "xla_ffi/cpu/traffic.h"
#include "xla_ffi/cpu/work_list.h"

namespace ffi = xla::ffi;

namespace ccf {

// Weight gradients for the experts a device helped with: owners read and add them.
struct HelpedGradients {
  struct Expert {
    int64_t expert;
    std::vector<float> dw_in, dw_out;  // [H, G*F], [F, H]
  };
  std::vector<Expert> experts;

  const Expert* Find(int64_t expert) const {
    for (const Expert& e : experts)
      if (e.expert == expert) return &e;
    return nullptr;
  }
};

namespace {

// The devices this call runs for and their buffers. A real group has one device per handler
// call (`ranks` = {rank}); an emulated one runs all D in this call over stacked buffers.
struct Peers {
  std::vector<PeerBuffers> buffers;
  std::vector<int> ranks;
  std::shared_ptr<Rendezvous> group;  // null unless peers live in other handler calls
  int concurrent = 1;  // devices among which this call's share of the cores is taken
  bool shared = false;  // peers' buffers are their regions of the shared workspaces
  std::chrono::milliseconds timeout{0};
  std::string failure;  // this device's call failed after publishing: compute nothing

  // Meets the peers at `phase`.
  ffi::Error Arrive(Phase phase) const {
    return group ? group->Arrive(ranks[0], phase, timeout) : ffi::Error::Success();
  }
};

// Where the helper in plan slot `slot` (>= 1) of `expert` puts its partial weight gradients
// when peers live in other processes: its area of the owner's region.
float* HelperPartial(const PeerBuffers& owner, const MoeDims& d, const PlanView& plan,
                     int64_t expert, int64_t slot) {
  const int64_t local = expert % d.experts_local;
  return owner.partials + (local * (plan.num_slots - 1) + slot - 1) * d.expert_elements();
}

// The first plan slot of `expert` that names `helper`: a helper named twice computes both
// slices in one pass and writes them there (the owner's zeroed other area adds nothing).
int64_t SlotOf(const PlanView& plan, int64_t expert, int helper) {
  int64_t slot = 1;
  while (plan.workers[expert * plan.num_slots + slot] != helper) ++slot;
  return slot;
}

// Peers in this process: publishes `own` in the (site, group) PeerGroup and meets them.
ffi::Error ConnectInProcess(const CallAttrs& attrs, const MoeDims& d, int32_t rank,
                            int32_t group, const PeerBuffers& own, Peers* peers) {
  std::shared_ptr<PeerGroup> peer_group;
  if (ffi::Error err = FindPeerGroup(attrs.site, group, d.num_devices, &peer_group);
      err.failure())
    return err;
  peers->group = peer_group;
  peers->concurrent = d.num_devices;
  PeerBuffers published = own;
  published.signature = Signature(d);
  peer_group->Publish(rank, published);
  if (ffi::Error err = peers->Arrive(Phase::kPublished); err.failure()) return err;
  std::vector<std::array<int64_t, 9>> signatures;
  for (int dev = 0; dev < d.num_devices; ++dev) {
    peers->buffers.push_back(peer_group->peer(dev));
    signatures.push_back(peers->buffers.back().signature);
  }
  return CheckSignatures(rank, published.signature, signatures);
}

// Peers in other processes of the host: stages `own` into this device's region of the shared
// workspace (the one local copy peers read), lays out every peer's region and meets them in
// rank 0's. Weights stay in XLA's buffers: only their owner reads them without helpers.
ffi::Error ConnectShared(const CallAttrs& attrs, const MoeDims& d, int32_t rank, int32_t group,
                         const PeerBuffers& own, const PlanView& plan, Peers* peers) {
  const int64_t n = d.num_devices;
  const bool backward = own.dy != nullptr;
  const int64_t w_bytes = ffi::ByteWidth(d.w_type);
  const RegionLayout at = LayoutRegion({d.tokens, d.hidden, d.k, d.slots,
                                        static_cast<int64_t>(ffi::ByteWidth(d.x_type)),
                                        static_cast<int64_t>(ffi::ByteWidth(d.weights_type)),
                                        d.experts_local, d.expert_elements(), w_bytes,
                                        plan.num_slots, backward});
  std::vector<RegionHeader*> headers;
  peers->concurrent = 0;
  for (int64_t r = 0; r < n; ++r) {
    const Segment* seg;
    if (ffi::Error err = FindRegion(attrs, group, n, r, r == rank, at.bytes, &seg); err.failure())
      return err;
    peers->concurrent += seg->owned;
    char* base = seg->base + attrs.workspace_offset;
    headers.push_back(reinterpret_cast<RegionHeader*>(base));
    PeerBuffers b = RegionPeer(base, at.operands);
    if (at.w >= 0) {  // a helper reads the owner's staged weights
      b.w_in = base + at.w;
      b.w_out = base + at.w + d.experts_local * d.hidden * d.gate_ffn * w_bytes;
    }
    if (at.partials >= 0) b.partials = reinterpret_cast<float*>(base + at.partials);
    peers->buffers.push_back(b);
  }
  PeerBuffers& mine = peers->buffers[rank];
  const int64_t x_bytes = d.tokens * d.hidden * ffi::ByteWidth(d.x_type);
  const int64_t weights_bytes = d.tokens * d.k * ffi::ByteWidth(d.weights_type);
  std::memcpy(const_cast<void*>(mine.x), own.x, x_bytes);
  std::memcpy(const_cast<int32_t*>(mine.ids), own.ids, d.tokens * d.k * sizeof(int32_t));
  std::memcpy(const_cast<void*>(mine.weights), own.weights, weights_bytes);
  std::memset(mine.staging, 0, d.tokens * d.slots * d.hidden * sizeof(float));
  if (backward) {
    std::memcpy(const_cast<void*>(mine.dy), own.dy, x_bytes);
    std::memset(mine.d_weights, 0, weights_bytes);
  }
  if (HasHelpers(plan, d)) {
    const int64_t in_bytes = d.experts_local * d.hidden * d.gate_ffn * w_bytes;
    std::memcpy(const_cast<void*>(mine.w_in), own.w_in, in_bytes);
    std::memcpy(const_cast<void*>(mine.w_out), own.w_out,
                d.experts_local * d.ffn * d.hidden * w_bytes);
    // A helper with no rows for its slice writes nothing: its partials must read as zero.
    if (mine.partials)
      std::memset(mine.partials, 0,
                  d.experts_local * (plan.num_slots - 1) * d.expert_elements() * sizeof(float));
  }
  // This device reads its own weights where XLA keeps them.
  mine.w_in = own.w_in;
  mine.w_out = own.w_out;
  headers[rank]->signature = Signature(d);
  peers->group = std::make_shared<SharedGroup>(group, headers);
  peers->shared = true;
  if (ffi::Error err = peers->Arrive(Phase::kPublished); err.failure()) return err;
  std::vector<std::array<int64_t, 9>> signatures;
  for (RegionHeader* h : headers) signatures.push_back(h->signature);
  return CheckSignatures(rank, headers[rank]->signature, signatures);
}

// Builds the peer table from `own` (this call's buffers, element offsets of device 0 when
// emulated): the emulated devices over the stacked blocks, or the real peers once they have
// published theirs.
ffi::Error ConnectPeers(const CallAttrs& attrs, const MoeDims& d, int32_t rank, int32_t group,
                        const PeerBuffers& own, const PlanView& plan, Peers* peers) {
  if (attrs.emulated || d.num_devices == 1) {
    // Each emulated device takes the share of the cores a real one gets: the GEMMs' column
    // blocks follow it, and so do their bits.
    peers->concurrent = d.num_devices;
    for (int dev = 0; dev < d.num_devices; ++dev) {
      peers->buffers.push_back(EmulatedPeer(own, d, dev));
      peers->ranks.push_back(dev);
    }
    return ffi::Error::Success();
  }
  if (rank < 0 || rank >= d.num_devices)
    return InvalidArgument("rank " + std::to_string(rank) + " outside the group of " +
                           std::to_string(d.num_devices) + " devices");
  peers->ranks = {rank};
  peers->timeout = std::chrono::milliseconds(attrs.timeout_ms);
  if (ffi::Error err = InWorkspace(attrs, d)
                           ? ConnectShared(attrs, d, rank, group, own, plan, peers)
                           : ConnectInProcess(attrs, d, rank, group, own, peers);
      err.failure())
    return err;
  if (TakeInjectedFault(rank))
    peers->failure = "jax_ccfuser: injected fault on device " + std::to_string(rank);
  return ffi::Error::Success();
}

// Decodes the operands both handlers share and the plan.
ffi::Error DecodeCall(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::S32>& ids,
                      const ffi::AnyBuffer& weights, const ffi::AnyBuffer& w_in,
                      const ffi::AnyBuffer& w_out, const PlanArray& workers,
                      const PlanArray& bounds, const CallAttrs& attrs, MoeDims* dims,
                      PlanView* plan) {
  if (ffi::Error err = DecodeDims(x, ids, weights, w_in, w_out, attrs, dims); err.failure())
    return err;
  const MoeDims& d = *dims;
  if (ffi::Error err = CheckPlanShape(workers, bounds, d); err.failure()) return err;
  *plan = {workers.typed_data(), bounds.typed_data(), workers.dimensions()[1]};
  return CheckPlan(*plan, d);
}

// Records what `me` moved: `rows_per_token` token rows read per fetched remote token (x, and
// dy backward) and one float32 partial-sum row written back per remote token.
void Record(uint64_t site, int me, bool backward, const MoeDims& d, const HostWorkList& work,
            int rows_per_token) {
  Traffic t;
  t.site = site;
  t.rank = me;
  t.backward = backward;
  for (const ExpertWork& ew : work.experts) t.pairs += static_cast<int64_t>(ew.rows.size());
  t.remote_rows_read = rows_per_token * work.remote_tokens;
  t.remote_bytes_read = t.remote_rows_read * d.hidden * ffi::ByteWidth(d.x_type);
  t.remote_rows_written = work.remote_tokens;
  t.remote_bytes_written = t.remote_rows_written * d.hidden * sizeof(float);
  RecordTraffic(t);
}

// Builds each device's work list and runs `compute(me, work)` for the devices of this call,
// then meets the peers after compute. A bad id is found identically by every device, and a
// device whose call failed reports it to the group; either way all still meet at the barrier
// (so nobody frees buffers a peer is reading) and then return the same error.
template <typename Compute>
ffi::Error PlanAndCompute(const Peers& peers, const MoeDims& d, const PlanView& plan,
                          Compute compute) {
  ffi::Error bad = ffi::Error::Success();
  HostWorkList work;
  if (peers.failure.empty()) {
    for (int me : peers.ranks) {
      bad = BuildHostWorkList(peers.buffers, d, plan, me, &work);
      if (bad.failure()) break;
      compute(me, work);
    }
  } else {
    peers.group->ReportFailure(peers.failure);
  }
  if (ffi::Error err = peers.Arrive(Phase::kComputed); err.failure()) return err;
  if (bad.failure()) return bad;
  if (std::string failed = peers.group ? peers.group->Failure() : ""; !failed.empty())
    return ffi::Error::Internal(failed);
  return ffi::Error::Success();
}

// This handler's share of the cores: the devices of a real group run at once and split them
// (emulated ones run one after another with the same share, to compute the same bits).
Workers ShareOfCores(const Peers& peers) {
  HostThreads& pool = HostThreads::Get();
  return Workers(&pool, pool.num_threads() / std::max(1, peers.concurrent));
}

// Device `me`'s kept h rows: its block of the call's `hidden` [C, G*F] (stacked when emulated).
KeptHidden KeptOf(const Peers& peers, const MoeDims& d, float* hidden, int64_t kept_rows,
                  int me) {
  return {hidden + (peers.group ? 0 : me) * kept_rows * d.gate_ffn, kept_rows};
}

// out[t, :] = sum over slots of staging[t, slot, :], in slot order.
void SumSlots(const MoeDims& d, const float* staging, void* out, int64_t out_offset) {
  std::vector<float> row(d.hidden);
  for (int64_t t = 0; t < d.tokens; ++t) {
    const float* s = staging + t * d.slots * d.hidden;
    std::copy(s, s + d.hidden, row.begin());
    for (int slot = 1; slot < d.slots; ++slot)
      for (int64_t j = 0; j < d.hidden; ++j) row[j] += s[slot * d.hidden + j];
    StoreFloats(row.data(), d.hidden, out, d.x_type, out_offset + t * d.hidden);
  }
}

ffi::Error MoeForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids,
                          ffi::AnyBuffer weights, ffi::AnyBuffer w_in, ffi::AnyBuffer w_out,
                          PlanArray plan_workers, PlanArray plan_bounds, ScalarS32 rank,
                          ScalarS32 group, CallAttrs attrs, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<Staging> staging, ffi::Result<Hidden> hidden) {
  MoeDims d;
  PlanView plan;
  if (ffi::Error err =
          DecodeCall(x, ids, weights, w_in, w_out, plan_workers, plan_bounds, attrs, &d, &plan);
      err.failure())
    return err;
  if (ffi::Error err = CheckForwardResults(d, attrs, x, *y, *staging); err.failure()) return err;
  if (ffi::Error err = CheckHidden(d, attrs, *hidden); err.failure()) return err;
  // Peers accumulate into this device's staging as soon as the publish barrier passes.
  std::memset(staging->typed_data(), 0, staging->size_bytes());
  // The h rows no tile keeps (the placeholder row where none are, those past this device's
  // kept tiles) read as zeros, not as whatever the memory held: jax_debug_nans reads them.
  std::memset(hidden->typed_data(), 0, hidden->size_bytes());
  Peers peers;
  if (ffi::Error err =
          ConnectPeers(attrs, d, rank.typed_data()[0], group.typed_data()[0],
                       OwnBuffers(x, ids, weights, w_in, w_out, *staging), plan, &peers);
      err.failure())
    return err;
  const Workers workers = ShareOfCores(peers);
  if (ffi::Error err = PlanAndCompute(
          peers, d, plan,
          [&](int me, const HostWorkList& work) {
            std::vector<float> x_rows(work.tokens.size() * d.hidden);
            FetchTokens(peers.buffers, &PeerBuffers::x, d, work, x_rows.data());
            const KeptHidden kept = KeptOf(peers, d, hidden->typed_data(), attrs.kept_rows, me);
            int64_t position = 0;
            for (const ExpertWork& ew : work.experts) {
              const ExpertWeights w(peers.buffers[d.owner(ew.expert)], d,
                                    ew.expert % d.experts_local);
              ExpertForward(workers, peers.buffers, d, ew, w, x_rows.data(), kept, position);
              position += static_cast<int64_t>(ew.rows.size());
            }
            Record(attrs.site, me, /*backward=*/false, d, work, 1);
          });
      err.failure())
    return err;
  for (int me : peers.ranks)
    SumSlots(d, peers.buffers[me].staging, y->untyped_data(),
             peers.group ? 0 : me * d.tokens * d.hidden);
  return ffi::Error::Success();
}

ffi::Error MoeBackwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids,
                           ffi::AnyBuffer weights, ffi::AnyBuffer w_in, ffi::AnyBuffer w_out,
                           PlanArray plan_workers, PlanArray plan_bounds, ffi::AnyBuffer dy,
                           Hidden hidden, ScalarS32 rank, ScalarS32 group, CallAttrs attrs,
                           ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> d_weights,
                           ffi::Result<ffi::AnyBuffer> dw_in, ffi::Result<ffi::AnyBuffer> dw_out,
                           ffi::Result<Staging> staging) {
  MoeDims d;
  PlanView plan;
  if (ffi::Error err =
          DecodeCall(x, ids, weights, w_in, w_out, plan_workers, plan_bounds, attrs, &d, &plan);
      err.failure())
    return err;
  if (ffi::Error err = CheckBackwardBuffers(d, attrs, x, w_in, w_out, dy, *dx, *d_weights, *dw_in,
                                            *dw_out, *staging);
      err.failure())
    return err;
  if (ffi::Error err = CheckHidden(d, attrs, hidden); err.failure()) return err;
  std::memset(staging->typed_data(), 0, staging->size_bytes());
  // Every (token, k) of a valid call is written by exactly one device; zero it anyway so a
  // failed call leaves no uninitialised memory behind.
  std::memset(d_weights->untyped_data(), 0, d_weights->size_bytes());
  // One per device of this call; peers read them between the compute and release barriers.
  std::vector<HelpedGradients> helped(attrs.emulated ? d.num_devices : 1);
  PeerBuffers own = OwnBuffers(x, ids, weights, w_in, w_out, *staging);
  own.dy = dy.untyped_data();
  own.d_weights = d_weights->untyped_data();
  own.helped = helped.data();
  Peers peers;
  if (ffi::Error err =
          ConnectPeers(attrs, d, rank.typed_data()[0], group.typed_data()[0], own, plan, &peers);
      err.failure())
    return err;
  if (!peers.group)
    for (int dev = 0; dev < d.num_devices; ++dev) peers.buffers[dev].helped = &helped[dev];
  // Weight gradients accumulate in float32: in the outputs where those are float32, else here,
  // then round once into them. Not wanted (frozen experts), the outputs are zeros.
  const int64_t n_in = d.hidden * d.gate_ffn, n_out = d.ffn * d.hidden;
  const bool wanted = attrs.weight_grads != 0, in_outputs = d.w_type == ffi::DataType::F32;
  std::vector<float> dw_in_acc(wanted && !in_outputs ? w_in.element_count() : 0, 0.0f);
  std::vector<float> dw_out_acc(wanted && !in_outputs ? w_out.element_count() : 0, 0.0f);
  if (in_outputs || !wanted) {
    std::memset(dw_in->untyped_data(), 0, dw_in->size_bytes());
    std::memset(dw_out->untyped_data(), 0, dw_out->size_bytes());
  }
  float* const acc_in_all = in_outputs ? static_cast<float*>(dw_in->untyped_data())
                                       : dw_in_acc.data();
  float* const acc_out_all = in_outputs ? static_cast<float*>(dw_out->untyped_data())
                                        : dw_out_acc.data();
  const Workers workers = ShareOfCores(peers);
  ffi::Error status = PlanAndCompute(
      peers, d, plan, [&](int me, const HostWorkList& work) {
        HelpedGradients& mine = helped[peers.group ? 0 : me];
        std::vector<float> x_rows(work.tokens.size() * d.hidden), dy_rows(x_rows.size());
        FetchTokens(peers.buffers, &PeerBuffers::x, d, work, x_rows.data());
        FetchTokens(peers.buffers, &PeerBuffers::dy, d, work, dy_rows.data());
        const KeptHidden kept = KeptOf(peers, d, hidden.typed_data(), attrs.kept_rows, me);
        int64_t position = 0;
        for (const ExpertWork& ew : work.experts) {
          const int owner = d.owner(ew.expert);
          const int64_t local = ew.expert % d.experts_local;
          const ExpertWeights w(peers.buffers[owner], d, local);
          float *acc_in = nullptr, *acc_out = nullptr;  // stay null for frozen experts
          if (wanted && owner == me) {
            // Emulated devices' accumulators are stacked like the outputs.
            const int64_t block = (peers.group ? 0 : me) * d.experts_local + local;
            acc_in = acc_in_all + block * n_in;
            acc_out = acc_out_all + block * n_out;
          } else if (wanted && peers.shared) {
            acc_in = HelperPartial(peers.buffers[owner], d, plan, ew.expert,
                                   SlotOf(plan, ew.expert, me));
            acc_out = acc_in + n_in;
          } else if (wanted) {
            mine.experts.push_back({ew.expert, std::vector<float>(n_in, 0.0f),
                                    std::vector<float>(n_out, 0.0f)});
            acc_in = mine.experts.back().dw_in.data();
            acc_out = mine.experts.back().dw_out.data();
          }
          ExpertBackward(workers, peers.buffers, d, ew, w, x_rows.data(), dy_rows.data(), kept,
                         position, wanted, acc_in, acc_out);
          position += static_cast<int64_t>(ew.rows.size());
        }
        Record(attrs.site, me, /*backward=*/true, d, work, 2);
      });
  if (status.success() && wanted) {
    // Owners add their helpers' partial weight gradients, in plan slot order.
    for (int me : peers.ranks) {
      for (int64_t local = 0; local < d.experts_local; ++local) {
        const int64_t e = me * d.experts_local + local;
        const int64_t block = (peers.group ? 0 : me) * d.experts_local + local;
        for (int64_t s = 1; s < plan.num_slots; ++s) {
          const int helper = plan.workers[e * plan.num_slots + s];
          if (helper < 0 || helper == me) continue;
          const float *part_in, *part_out;
          if (peers.shared) {
            part_in = HelperPartial(peers.buffers[me], d, plan, e, s);
            part_out = part_in + n_in;
          } else {
            const HelpedGradients::Expert* part = peers.buffers[helper].helped->Find(e);
            if (!part) continue;  // the helper's slice held no rows
            part_in = part->dw_in.data();
            part_out = part->dw_out.data();
          }
          for (int64_t i = 0; i < n_in; ++i) acc_in_all[block * n_in + i] += part_in[i];
          for (int64_t i = 0; i < n_out; ++i) acc_out_all[block * n_out + i] += part_out[i];
        }
      }
    }
  }
  // After a timeout the peers are gone: waiting at another barrier would only time out again.
  if (status.errc() == ffi::ErrorCode::kDeadlineExceeded) return status;
  if (ffi::Error err = peers.Arrive(Phase::kReleased); err.failure()) return err;
  if (status.failure()) return status;
  for (int me : peers.ranks)
    SumSlots(d, peers.buffers[me].staging, dx->untyped_data(),
             peers.group ? 0 : me * d.tokens * d.hidden);
  if (peers.shared)  // peers wrote d expert_weights into this device's region
    std::memcpy(d_weights->untyped_data(), peers.buffers[peers.ranks[0]].d_weights,
                d_weights->size_bytes());
  if (wanted && !in_outputs) {
    StoreFloats(dw_in_acc.data(), dw_in_acc.size(), dw_in->untyped_data(), d.w_type, 0);
    StoreFloats(dw_out_acc.data(), dw_out_acc.size(), dw_out->untyped_data(), d.w_type, 0);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ccf

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeForwardCpu, ccf::Detached<&ccf::MoeForwardImpl>::Call,
                              ccf::BindForward(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeBackwardCpu, ccf::Detached<&ccf::MoeBackwardImpl>::Call,
                              ccf::BindBackward(ffi::Ffi::Bind()));
