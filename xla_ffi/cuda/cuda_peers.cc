#include "xla_ffi/cuda/cuda_peers.h"

#include <chrono>
#include <memory>
#include <string>
#include <utility>

#include "xla_ffi/region_layout.h"
#include "xla_ffi/shared_memory.h"

namespace ffi = xla::ffi;

namespace ccf {
namespace {

// The hash of a signature the start barrier compares between processes (cuda/signal.cu).
uint64_t SignatureHash(const MoeDims& d) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
  for (int64_t word : Signature(d)) {
    h ^= static_cast<uint64_t>(word);
    h *= 1099511628211ull;
  }
  return h;
}

// Completes a real group's call once the members' flags are in `call->barrier`: the rest of the
// barrier members, and the experts and tokens this device handles.
void JoinGroup(const CallAttrs& attrs, DeviceState& me, SitePlace* place, Call* call) {
  const MoeDims& d = call->d;
  cuda::BarrierParams& b = call->barrier;
  b.num_members = d.num_devices;
  b.rank = place->rank;
  b.timeout_ns = attrs.timeout_ms * 1000000;
  b.error = me.error;
  b.expected_group = place->group;
  call->place = place;
  call->me = place->rank;
  call->first_expert =
      call->plan.workers ? 0 : place->rank * static_cast<int32_t>(d.experts_local);
  call->own_tokens = d.tokens;
}

// What can still go wrong once the members of an in-process group know each other's buffers;
// every member checks the same table, and reports to the group what it finds.
ffi::Error CheckInProcessPeers(DeviceState& me, const Call& call, int32_t rank,
                               const PeerBuffers& mine) {
  const std::vector<PeerBuffers>& peers = call.peers;
  std::vector<std::array<int64_t, 9>> signatures;
  for (const PeerBuffers& p : peers) signatures.push_back(p.signature);
  if (ffi::Error err = CheckSignatures(rank, mine.signature, signatures); err.failure())
    return err;
  for (size_t dev = 0; dev < peers.size(); ++dev)
    for (size_t other = 0; other < dev; ++other)
      if (peers[other].gpu == peers[dev].gpu)
        return InvalidArgument("devices " + std::to_string(other) + " and " +
                               std::to_string(dev) + " of the group are the same GPU " +
                               std::to_string(peers[dev].gpu));
  for (size_t dev = 0; dev < peers.size(); ++dev) {
    const PeerBuffers& p = peers[dev];
    if (p.gpu == me.ordinal) continue;
    if (ffi::Error err = EnablePeerAccess(me, p.gpu); err.failure()) return err;
    // With a plan, helpers also read the owners' weights and write their partials.
    const bool planned = call.plan.workers != nullptr;
    for (auto [ptr, what] : {std::pair<const void*, const char*>{p.x, "x"},
                             {p.ids, "expert_ids"}, {p.weights, "expert_weights"},
                             {p.staging, "staging"}, {p.dy, "dy"},
                             {p.d_weights, "d expert_weights"},
                             {planned ? p.w_in : nullptr, "w_in"},
                             {planned ? p.w_out : nullptr, "w_out"},
                             {p.partials, "weight-gradient partials"}})
      if (ptr != nullptr)
        if (ffi::Error err = CheckPeerMemory(ptr, static_cast<int>(dev), what); err.failure())
          return err;
  }
  if (TakeInjectedFault(rank))
    return ffi::Error::Internal("jax_ccfuser: injected fault on device " + std::to_string(rank));
  return ffi::Error::Success();
}

// Meets the peers of a real group in this process and fills the peer table and the barrier
// members. A bad id this GPU's earlier call found (`earlier`) fails this call on every member:
// one that stopped its program alone would leave the others waiting for it at their next
// meeting, a timeout long.
ffi::Error ConnectInProcess(const CallAttrs& attrs, DeviceState& me, const ScalarS32& rank_op,
                            const ScalarS32& group_op, const PeerBuffers& own, cudaStream_t stream,
                            ffi::Error* earlier, Call* call) {
  const MoeDims& d = call->d;
  SitePlace* place;
  if (ffi::Error err = Place(me, attrs.site, rank_op, group_op, d.num_devices,
                             /*own_signals=*/true, stream, &place);
      err.failure())
    return err;
  std::shared_ptr<PeerGroup> group;
  if (ffi::Error err = FindPeerGroup(attrs.site, place->group, d.num_devices, &group);
      err.failure())
    return err;
  const auto timeout = std::chrono::milliseconds(attrs.timeout_ms);
  PeerBuffers published = own;
  published.signature = Signature(d);
  published.signals = place->signals;
  published.gpu = me.ordinal;
  group->Publish(place->rank, published);
  if (ffi::Error err = group->Arrive(place->rank, Phase::kPublished, timeout); err.failure())
    return err;
  for (int dev = 0; dev < d.num_devices; ++dev) call->peers.push_back(group->peer(dev));
  if (ffi::Error bad = CheckInProcessPeers(me, *call, place->rank, published); bad.failure())
    group->ReportFailure(bad.message());
  if (earlier->failure()) group->ReportFailure(earlier->message());
  // The second host meeting: every device holds its copy of the table, so a fast device may
  // publish its next call's buffers (the kernels' own ordering is the device barriers'), and
  // every member knows whether any member failed.
  if (ffi::Error err = group->Arrive(place->rank, Phase::kComputed, timeout); err.failure())
    return err;
  if (std::string failed = group->Failure(); !failed.empty())
    return earlier->failure() ? *earlier : ffi::Error::Internal(failed);
  for (int dev = 0; dev < d.num_devices; ++dev) call->barrier.signals[dev] = call->peers[dev].signals;
  JoinGroup(attrs, me, place, call);
  call->recorded_source = place->rank;
  return ffi::Error::Success();
}

// Meets peers in other processes of the host through the call site's regions in the CUDA IPC
// workspaces: every member's buffers are its region (registry + offset + layout), this device's
// operands are staged into its own on the stream, and the device barriers' flags, counts and
// shape signatures are in the regions.
ffi::Error ConnectIpc(const CallAttrs& attrs, DeviceState& me, const ScalarS32& rank_op,
                      const ScalarS32& group_op, const PeerBuffers& own, cudaStream_t stream,
                      Call* call) {
  const MoeDims& d = call->d;
  const int64_t n = d.num_devices;
  // The peers count this device's barriers whether it comes or not: a failure must stop it for
  // good.
  auto give_up = [&](ffi::Error err) {
    MarkBroken(me, "a call at site " + std::to_string(attrs.site) +
                       " gave up on its group in other processes: " + err.message());
    return err;
  };
  SitePlace* place;
  if (ffi::Error err = Place(me, attrs.site, rank_op, group_op, d.num_devices,
                             /*own_signals=*/false, stream, &place);
      err.failure())
    return give_up(std::move(err));
  const int32_t rank = place->rank, group = place->group;
  // The kernels move 16-byte vectors through the regions.
  if (attrs.workspace_offset % cuda::kWorkspaceAlignment)
    return give_up(ffi::Error::Internal("jax_ccfuser: call site region at offset " +
                                        std::to_string(attrs.workspace_offset) + " is not " +
                                        std::to_string(cuda::kWorkspaceAlignment) +
                                        "-byte aligned"));
  const bool backward = own.dy != nullptr;
  const IpcRegionLayout at =
      LayoutIpcRegion(d.tokens, d.hidden, d.k, d.slots, ffi::ByteWidth(d.x_type),
                      ffi::ByteWidth(d.weights_type), backward);
  char* mine = nullptr;
  std::vector<int> local_gpus;  // where the members this process runs keep their regions
  for (int64_t r = 0; r < n; ++r) {
    const Segment* seg;
    if (ffi::Error err = FindRegion(attrs, group, n, r, r == rank, at.bytes, &seg); err.failure())
      return give_up(std::move(err));
    const int32_t device = attrs.devices[group * n + r];
    char* base = seg->base + attrs.workspace_offset;
    if (seg->owned) {
      cudaPointerAttributes where;
      if (cudaError_t st = cudaPointerGetAttributes(&where, seg->base); st != cudaSuccess)
        return give_up(CudaFailure("locating device " + std::to_string(device) + "'s workspace", st));
      if (r == rank && where.device != me.ordinal)
        return give_up(Misplaced(device, r,
                                 "has its shared workspace on GPU " +
                                     std::to_string(where.device) + " but runs on GPU " +
                                     std::to_string(me.ordinal)));
      local_gpus.push_back(where.device);
    }
    if (r == rank) mine = base;
    call->peers.push_back(RegionPeer(base, at.operands));
    call->barrier.signals[r] = reinterpret_cast<uint64_t*>(base + at.signals);
    call->barrier.signatures[r] = reinterpret_cast<uint64_t*>(base + at.signature);
  }
  // A peer's mapping opened from its IPC handle is read by the one GPU it was opened on.
  if (local_gpus.size() > 1 && static_cast<int64_t>(local_gpus.size()) < n)
    return give_up(Unimplemented(
        "this process runs " + std::to_string(local_gpus.size()) + " of the " +
        std::to_string(n) + " devices of a group that spans processes; across processes each "
        "runs one device of a group (one process per GPU)"));
  for (int gpu : local_gpus)
    if (ffi::Error err = EnablePeerAccess(me, gpu); err.failure()) return give_up(std::move(err));

  const size_t x_bytes = d.tokens * d.hidden * ffi::ByteWidth(d.x_type);
  const size_t weights_bytes = d.tokens * d.k * ffi::ByteWidth(d.weights_type);
  const OperandOffsets& o = at.operands;
  call->staged = {{mine + o.x, own.x, x_bytes},
                  {mine + o.ids, own.ids, d.tokens * d.k * sizeof(int32_t)},
                  {mine + o.weights, own.weights, weights_bytes}};
  if (backward) call->staged.push_back({mine + o.dy, own.dy, x_bytes});
  call->own_staging = call->peers[rank].staging;
  call->own_d_weights = call->peers[rank].d_weights;
  call->barrier.passed = reinterpret_cast<uint64_t*>(mine + at.passed);
  call->barrier.signature = SignatureHash(d);
  JoinGroup(attrs, me, place, call);
  return ffi::Error::Success();
}

}  // namespace

int32_t OwnExperts(const CallAttrs& attrs, const MoeDims& d) {
  const bool emulating = attrs.emulated || d.num_devices == 1;
  return static_cast<int32_t>(emulating ? d.group_experts() : d.experts_local);
}

int32_t ExpertsHere(const CallAttrs& attrs, const MoeDims& d, bool planned) {
  return planned ? static_cast<int32_t>(d.group_experts()) : OwnExperts(attrs, d);
}

ffi::Error ConnectPeers(const CallAttrs& attrs, DeviceState& me, const ScalarS32& rank,
                        const ScalarS32& group, const PeerBuffers& own, cudaStream_t stream,
                        ffi::Error* earlier, Call* call) {
  const MoeDims& d = call->d;
  call->w_in = own.w_in;
  call->w_out = own.w_out;
  call->own_ids = own.ids;
  call->own_staging = own.staging;
  call->own_d_weights = own.d_weights;
  if (InWorkspace(attrs, d)) return ConnectIpc(attrs, me, rank, group, own, stream, call);
  if (!attrs.emulated && d.num_devices > 1)
    return ConnectInProcess(attrs, me, rank, group, own, stream, earlier, call);
  // Each emulated device's partials [E_local, S, H*G*F + F*H] are stacked like its weights.
  const int64_t partials = d.experts_local * call->plan.slots * d.expert_elements();
  for (int dev = 0; dev < d.num_devices; ++dev) {
    call->peers.push_back(EmulatedPeer(own, d, dev));
    if (own.partials) call->peers.back().partials = own.partials + dev * partials;
  }
  call->me = -1;
  call->first_expert = 0;
  call->own_tokens = d.num_devices * d.tokens;
  return ffi::Error::Success();
}

}  // namespace ccf
