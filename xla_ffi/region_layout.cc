#include "xla_ffi/region_layout.h"

#include "cuda/config.cuh"

namespace ccf {

namespace {

// Hands out a region's sections one after another, each rounded up to `align` bytes.
struct Sections {
  int64_t align;
  int64_t at = 0;

  // The offset of a `bytes` section, or -1 where it does not exist.
  int64_t Take(bool exists, int64_t bytes) {
    if (!exists) return -1;
    const int64_t offset = at;
    at += (bytes + align - 1) / align * align;
    return offset;
  }
};

OperandOffsets LayoutOperands(int64_t tokens, int64_t hidden, int64_t k, int64_t slots,
                              int64_t x_bytes, int64_t weights_bytes, bool backward,
                              Sections& s) {
  OperandOffsets o;
  o.x = s.Take(true, tokens * hidden * x_bytes);
  o.ids = s.Take(true, tokens * k * static_cast<int64_t>(sizeof(int32_t)));
  o.weights = s.Take(true, tokens * k * weights_bytes);
  o.staging = s.Take(true, tokens * slots * hidden * static_cast<int64_t>(sizeof(float)));
  o.dy = s.Take(backward, tokens * hidden * x_bytes);
  o.d_weights = s.Take(backward, tokens * k * weights_bytes);
  return o;
}

}  // namespace

PeerBuffers RegionPeer(char* base, const OperandOffsets& at) {
  PeerBuffers b;
  b.x = base + at.x;
  b.ids = reinterpret_cast<const int32_t*>(base + at.ids);
  b.weights = base + at.weights;
  b.staging = reinterpret_cast<float*>(base + at.staging);
  if (at.dy >= 0) b.dy = base + at.dy;
  if (at.d_weights >= 0) b.d_weights = base + at.d_weights;
  return b;
}

RegionLayout LayoutRegion(const RegionShape& s) {
  Sections sections{64};  // a cache line: peers' sections never share one
  sections.Take(true, sizeof(RegionHeader));
  RegionLayout l;
  l.operands = LayoutOperands(s.tokens, s.hidden, s.k, s.slots, s.x_bytes, s.weights_bytes,
                              s.backward, sections);
  const bool helpers = s.plan_slots > 1;
  l.w = sections.Take(helpers, s.experts_local * s.expert_elements * s.w_bytes);
  l.partials = sections.Take(helpers && s.backward, s.experts_local * (s.plan_slots - 1) *
                                                        s.expert_elements * sizeof(float));
  l.bytes = sections.at;
  return l;
}

IpcRegionLayout LayoutIpcRegion(int64_t tokens, int64_t hidden, int64_t k, int64_t slots,
                                int64_t x_bytes, int64_t weights_bytes, bool backward) {
  Sections sections{cuda::kWorkspaceAlignment};
  IpcRegionLayout l;
  l.signals = sections.Take(true, sizeof(uint64_t) * cuda::kMaxPeers);
  l.passed = sections.Take(true, sizeof(uint64_t));
  l.signature = sections.Take(true, sizeof(uint64_t));
  l.operands =
      LayoutOperands(tokens, hidden, k, slots, x_bytes, weights_bytes, backward, sections);
  l.bytes = sections.at;
  return l;
}

xla::ffi::Error Misplaced(int32_t device, int64_t rank, const std::string& why) {
  return xla::ffi::Error::Internal("jax_ccfuser: device " + std::to_string(device) + " (rank " +
                                   std::to_string(rank) + ") " + why +
                                   "; the mesh the call was traced for places devices "
                                   "differently (pass it with jax.set_mesh)");
}

xla::ffi::Error FindRegion(const CallAttrs& attrs, int32_t group, int64_t num_devices,
                           int64_t rank, bool mine, int64_t bytes, const Segment** segment) {
  if (group < 0 || (group + 1) * num_devices > static_cast<int64_t>(attrs.devices.size()))
    return InvalidArgument("group " + std::to_string(group) + " outside the device table");
  const int32_t device = attrs.devices[group * num_devices + rank];
  const Segment* seg = FindSegment(device, attrs.workspace);
  if (!seg || (mine && !seg->owned))
    return Misplaced(device, rank,
                     std::string("has no shared workspace ") +
                         (seg ? "owned by" : "mapped in") + " this process");
  if (attrs.workspace_offset + bytes > seg->bytes)
    return xla::ffi::Error::Internal("jax_ccfuser: call site region exceeds the shared workspace");
  *segment = seg;
  return xla::ffi::Error::Success();
}

}  // namespace ccf
