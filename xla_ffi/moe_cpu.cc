// The fused MoE on the host: XLA FFI handlers for the simulated CPU devices of one process.
//
// Per call, on each device of the expert-parallel group (DESIGN.md section 4):
//   publish  its buffers in the (call site, group) PeerGroup and meet the peers;
//   plan     the rows routed to its experts, read straight from every peer's expert_ids, in
//            one fixed order (local expert, source device, token, k);
//   compute  tiles of those rows: gather x rows from the peers (the dispatch), GEMM with w_in,
//            activation, GEMM with w_out, and accumulate the weighted result into the SOURCE
//            device's staging row for (token, slot) (the combine), one slot per destination
//            device of the token, so each staging row has exactly one writer;
//   combine  after the second barrier, each device sums its own staging slots in slot order.
// The backward pass mirrors it, re-reading rows from the peers (nothing is kept from forward).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/activation.h"
#include "xla_ffi/cpu_gemm.h"
#include "xla_ffi/host_dtype.h"
#include "xla_ffi/moe_cpu.h"
#include "xla_ffi/peer_group.h"

namespace ffi = xla::ffi;

namespace ccf {
namespace {

// Rows per GEMM panel: large enough for OpenBLAS to run at full rate, small enough that the
// panel's activations stay in cache between the two GEMMs.
constexpr int64_t kTileRows = 128;

// Spelled once: template commas cannot appear inside the binding macros.
using ScalarS32 = ffi::Buffer<ffi::S32, 0>;
using Staging = ffi::Buffer<ffi::F32, 3>;

// Static sizes of one call, per (possibly emulated) device.
struct MoeDims {
  int64_t tokens, hidden, k, ffn, experts_local, gate_ffn;  // gate_ffn = G * F
  int num_devices, slots;
  Activation activation;
  ffi::DataType x_type, weights_type, w_type;

  int64_t num_experts() const { return experts_local * num_devices; }
};

ffi::Error InvalidArgument(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_ccfuser: " + msg);
}

template <typename Buffer>
std::string ShapeString(const Buffer& b) {
  std::string s = "[";
  auto dims = b.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Decodes and checks the operands shared by the forward and backward handlers. With
// `emulated`, the leading dimension of every operand stacks the D devices' blocks.
ffi::Error DecodeDims(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::S32>& ids,
                      const ffi::AnyBuffer& weights, const ffi::AnyBuffer& w_in,
                      const ffi::AnyBuffer& w_out, int32_t num_devices, bool emulated,
                      int32_t activation, MoeDims* dims) {
  if (num_devices < 1) return InvalidArgument("num_devices must be >= 1");
  if (!IsValidActivation(activation))
    return InvalidArgument("unknown activation code " + std::to_string(activation));
  if (x.dimensions().size() != 2 || ids.dimensions().size() != 2 ||
      weights.dimensions().size() != 2 || w_in.dimensions().size() != 3 ||
      w_out.dimensions().size() != 3)
    return InvalidArgument("expected x [T, H], expert_ids [T, K], expert_weights [T, K], "
                           "w_in [E_local, H, G*F], w_out [E_local, F, H]; got x " +
                           ShapeString(x) + ", w_in " + ShapeString(w_in) + ", w_out " +
                           ShapeString(w_out));
  for (const ffi::AnyBuffer* b : {&x, &weights, &w_in, &w_out})
    if (!IsFloatType(b->element_type()))
      return InvalidArgument("x, expert_weights, w_in and w_out must be float32, bfloat16 or "
                             "float16");
  if (w_in.element_type() != x.element_type() || w_out.element_type() != x.element_type())
    return InvalidArgument("w_in and w_out must have x's dtype");
  const int64_t split = emulated ? num_devices : 1;
  MoeDims d;
  d.num_devices = num_devices;
  d.activation = static_cast<Activation>(activation);
  d.x_type = x.element_type();
  d.weights_type = weights.element_type();
  d.w_type = w_in.element_type();
  d.hidden = x.dimensions()[1];
  d.k = ids.dimensions()[1];
  d.experts_local = w_out.dimensions()[0] / split;
  d.ffn = w_out.dimensions()[1];
  d.gate_ffn = (IsGated(d.activation) ? 2 : 1) * d.ffn;
  d.tokens = x.dimensions()[0] / split;
  d.slots = static_cast<int>(std::min<int64_t>(d.k, num_devices));
  if (x.dimensions()[0] % split || w_out.dimensions()[0] % split)
    return InvalidArgument("emulating " + std::to_string(num_devices) +
                           " devices needs x and the weights stacked in equal blocks");
  if (ids.dimensions()[0] != x.dimensions()[0] || weights.dimensions()[0] != x.dimensions()[0] ||
      weights.dimensions()[1] != d.k || d.k < 1)
    return InvalidArgument("expert_ids and expert_weights must be [T, K] with x's T; got " +
                           ShapeString(ids) + " and " + ShapeString(weights));
  if (w_in.dimensions()[0] != w_out.dimensions()[0] || w_in.dimensions()[1] != d.hidden ||
      w_in.dimensions()[2] != d.gate_ffn || w_out.dimensions()[2] != d.hidden)
    return InvalidArgument("w_in " + ShapeString(w_in) + " and w_out " + ShapeString(w_out) +
                           " do not fit H=" + std::to_string(d.hidden) + " and the activation");
  *dims = d;
  return ffi::Error::Success();
}

// Byte offset helpers for the stacked (emulated) layout.
const void* Offset(const void* base, ffi::DataType t, int64_t elements) {
  return static_cast<const char*>(base) + elements * ffi::ByteWidth(t);
}
void* Offset(void* base, ffi::DataType t, int64_t elements) {
  return static_cast<char*>(base) + elements * ffi::ByteWidth(t);
}

std::array<int64_t, 8> Signature(const MoeDims& d) {
  return {d.tokens, d.hidden, d.k, d.ffn, d.experts_local, static_cast<int64_t>(d.x_type),
          static_cast<int64_t>(d.weights_type), static_cast<int64_t>(d.activation)};
}

// One routed (token, k) pair of some source device, computed by this device.
struct WorkRow {
  int32_t src, token, k, slot;
};

// The rows routed to `me`'s experts, grouped by local expert (`offsets[e]..offsets[e+1]`), in
// (source, token, k) order within an expert. Also checks every id of every peer, so all devices
// reach the same verdict on bad input; returns the message for the first bad id, or "".
std::string BuildWorkList(const std::vector<PeerBuffers>& peers, const MoeDims& d, int me,
                          std::vector<WorkRow>* rows, std::vector<int64_t>* offsets) {
  const int64_t num_experts = d.num_experts();
  offsets->assign(d.experts_local + 1, 0);
  for (int src = 0; src < d.num_devices; ++src) {
    const int32_t* ids = peers[src].ids;
    for (int64_t i = 0; i < d.tokens * d.k; ++i) {
      const int32_t e = ids[i];
      if (e < 0 || e >= num_experts)
        return "expert_ids[" + std::to_string(i / d.k) + ", " + std::to_string(i % d.k) +
               "] = " + std::to_string(e) + " on device " + std::to_string(src) +
               " is outside [0, " + std::to_string(num_experts) + ")";
      if (e / d.experts_local == me) ++(*offsets)[e % d.experts_local + 1];
    }
  }
  for (int64_t e = 0; e < d.experts_local; ++e) (*offsets)[e + 1] += (*offsets)[e];
  rows->resize(offsets->back());
  std::vector<int64_t> fill(offsets->begin(), offsets->end() - 1);
  for (int src = 0; src < d.num_devices; ++src) {
    const int32_t* ids = peers[src].ids;
    for (int64_t t = 0; t < d.tokens; ++t) {
      const int32_t* row = ids + t * d.k;
      for (int64_t k = 0; k < d.k; ++k) {
        if (row[k] / d.experts_local != me) continue;
        // The slot of `me` for this token: how many of its distinct devices come before `me`.
        int32_t slot = 0;
        for (int64_t j = 0; j < d.k; ++j) {
          const int64_t dev = row[j] / d.experts_local;
          if (dev >= me) continue;
          bool first = true;
          for (int64_t i = 0; i < j; ++i) first &= row[i] / d.experts_local != dev;
          slot += first;
        }
        (*rows)[fill[row[k] % d.experts_local]++] = {src, static_cast<int32_t>(t),
                                                     static_cast<int32_t>(k), slot};
      }
    }
  }
  return {};
}

// An expert's weights as float32 row-major panels: the buffers themselves for float32, a
// converted copy otherwise.
struct ExpertWeights {
  const float* w_in;   // [H, G*F]
  const float* w_out;  // [F, H]
  std::vector<float> w_in_copy, w_out_copy;

  ExpertWeights(const PeerBuffers& owner, const MoeDims& d, int64_t e) {
    const int64_t n_in = d.hidden * d.gate_ffn, n_out = d.ffn * d.hidden;
    if (d.w_type == ffi::DataType::F32) {
      w_in = static_cast<const float*>(owner.w_in) + e * n_in;
      w_out = static_cast<const float*>(owner.w_out) + e * n_out;
      return;
    }
    w_in_copy.resize(n_in);
    w_out_copy.resize(n_out);
    LoadFloats(owner.w_in, d.w_type, e * n_in, n_in, w_in_copy.data());
    LoadFloats(owner.w_out, d.w_type, e * n_out, n_out, w_out_copy.data());
    w_in = w_in_copy.data();
    w_out = w_out_copy.data();
  }
};

// a[i, j] = act(h[i, j]) (gated: act(h[i, j]) * h[i, F + j]); h [m, G*F] -> a [m, F].
void ActivationForward(const MoeDims& d, int64_t m, const float* h, float* a) {
  for (int64_t i = 0; i < m; ++i) {
    const float* hi = h + i * d.gate_ffn;
    float* ai = a + i * d.ffn;
    if (IsGated(d.activation)) {
      for (int64_t j = 0; j < d.ffn; ++j) ai[j] = ActForward(d.activation, hi[j]) * hi[d.ffn + j];
    } else {
      for (int64_t j = 0; j < d.ffn; ++j) ai[j] = ActForward(d.activation, hi[j]);
    }
  }
}

// dh = d a / d h applied to da; h [m, G*F], da [m, F] -> dh [m, G*F].
void ActivationBackward(const MoeDims& d, int64_t m, const float* h, const float* da, float* dh) {
  for (int64_t i = 0; i < m; ++i) {
    const float* hi = h + i * d.gate_ffn;
    const float* dai = da + i * d.ffn;
    float* dhi = dh + i * d.gate_ffn;
    if (IsGated(d.activation)) {
      for (int64_t j = 0; j < d.ffn; ++j) {
        const float g = hi[j], u = hi[d.ffn + j];
        dhi[j] = dai[j] * u * ActDerivative(d.activation, g);
        dhi[d.ffn + j] = dai[j] * ActForward(d.activation, g);
      }
    } else {
      for (int64_t j = 0; j < d.ffn; ++j) dhi[j] = dai[j] * ActDerivative(d.activation, hi[j]);
    }
  }
}

// out[i, :] = float(peer[rows[i].src].field[rows[i].token, :]) for a tile of rows.
void GatherRows(const std::vector<PeerBuffers>& peers, const void* PeerBuffers::*field,
                ffi::DataType type, const MoeDims& d, const WorkRow* rows, int64_t m, float* out) {
  for (int64_t i = 0; i < m; ++i)
    LoadFloats(peers[rows[i].src].*field, type, rows[i].token * d.hidden, d.hidden,
               out + i * d.hidden);
}

float RowWeight(const std::vector<PeerBuffers>& peers, const MoeDims& d, const WorkRow& r) {
  return LoadFloat(peers[r.src].weights, d.weights_type, r.token * d.k + r.k);
}

// staging[src][token, slot, :] += scale_i * rows_i, the combine write into the source device.
void AccumulateIntoSources(const std::vector<PeerBuffers>& peers, const MoeDims& d,
                           const WorkRow* rows, int64_t m, const float* values,
                           const float* scales) {
  for (int64_t i = 0; i < m; ++i) {
    float* dst = peers[rows[i].src].staging + (rows[i].token * d.slots + rows[i].slot) * d.hidden;
    const float* v = values + i * d.hidden;
    const float s = scales ? scales[i] : 1.0f;
    for (int64_t j = 0; j < d.hidden; ++j) dst[j] += s * v[j];
  }
}

// Forward compute of device `me`: every tile of its work list, results into the sources.
void ComputeForward(const Workers& workers, const std::vector<PeerBuffers>& peers, const MoeDims& d, int me,
                    const std::vector<WorkRow>& rows, const std::vector<int64_t>& offsets) {
  std::vector<float> x(kTileRows * d.hidden), h(kTileRows * d.gate_ffn), a(kTileRows * d.ffn),
      y(kTileRows * d.hidden), scale(kTileRows);
  for (int64_t e = 0; e < d.experts_local; ++e) {
    if (offsets[e] == offsets[e + 1]) continue;
    ExpertWeights w(peers[me], d, e);
    for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += kTileRows) {
      const int64_t m = std::min(kTileRows, offsets[e + 1] - r0);
      const WorkRow* tile = rows.data() + r0;
      GatherRows(peers, &PeerBuffers::x, d.x_type, d, tile, m, x.data());          // (m, H)
      Gemm(workers, false, false, m, d.gate_ffn, d.hidden, 1.0f, x.data(), d.hidden, w.w_in,
           d.gate_ffn, 0.0f, h.data(), d.gate_ffn);                                  // (m, G*F)
      ActivationForward(d, m, h.data(), a.data());                                   // (m, F)
      Gemm(workers, false, false, m, d.hidden, d.ffn, 1.0f, a.data(), d.ffn, w.w_out, d.hidden, 0.0f,
           y.data(), d.hidden);                                                      // (m, H)
      for (int64_t i = 0; i < m; ++i) scale[i] = RowWeight(peers, d, tile[i]);
      AccumulateIntoSources(peers, d, tile, m, y.data(), scale.data());
    }
  }
}

// Backward compute of device `me`: recomputes each tile's forward from re-gathered rows, writes
// d expert_weights and dx partial sums into the sources, and accumulates its experts' weight
// gradients in row order into dw_in_acc [E_local, H, G*F] / dw_out_acc [E_local, F, H].
void ComputeBackward(const Workers& workers, const std::vector<PeerBuffers>& peers, const MoeDims& d, int me,
                     const std::vector<WorkRow>& rows, const std::vector<int64_t>& offsets,
                     float* dw_in_acc, float* dw_out_acc) {
  std::vector<float> x(kTileRows * d.hidden), h(kTileRows * d.gate_ffn), a(kTileRows * d.ffn),
      y(kTileRows * d.hidden), g(kTileRows * d.hidden), da(kTileRows * d.ffn),
      dh(kTileRows * d.gate_ffn), dx(kTileRows * d.hidden);
  for (int64_t e = 0; e < d.experts_local; ++e) {
    float* dw_in = dw_in_acc + e * d.hidden * d.gate_ffn;
    float* dw_out = dw_out_acc + e * d.ffn * d.hidden;
    if (offsets[e] == offsets[e + 1]) continue;
    ExpertWeights w(peers[me], d, e);
    for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += kTileRows) {
      const int64_t m = std::min(kTileRows, offsets[e + 1] - r0);
      const WorkRow* tile = rows.data() + r0;
      GatherRows(peers, &PeerBuffers::x, d.x_type, d, tile, m, x.data());          // (m, H)
      GatherRows(peers, &PeerBuffers::dy, d.x_type, d, tile, m, g.data());         // (m, H)
      Gemm(workers, false, false, m, d.gate_ffn, d.hidden, 1.0f, x.data(), d.hidden, w.w_in,
           d.gate_ffn, 0.0f, h.data(), d.gate_ffn);                                  // (m, G*F)
      ActivationForward(d, m, h.data(), a.data());                                   // (m, F)
      Gemm(workers, false, false, m, d.hidden, d.ffn, 1.0f, a.data(), d.ffn, w.w_out, d.hidden, 0.0f,
           y.data(), d.hidden);                                                      // (m, H)
      for (int64_t i = 0; i < m; ++i) {
        const WorkRow& r = tile[i];
        float* gi = g.data() + i * d.hidden;
        const float* yi = y.data() + i * d.hidden;
        float dot = 0.0f;
        for (int64_t j = 0; j < d.hidden; ++j) dot += gi[j] * yi[j];
        StoreFloats(&dot, 1, peers[r.src].d_weights, d.weights_type, r.token * d.k + r.k);
        const float s = RowWeight(peers, d, r);
        for (int64_t j = 0; j < d.hidden; ++j) gi[j] *= s;  // g = w * dy
      }
      Gemm(workers, false, true, m, d.ffn, d.hidden, 1.0f, g.data(), d.hidden, w.w_out, d.hidden, 0.0f,
           da.data(), d.ffn);                                                        // (m, F)
      Gemm(workers, true, false, d.ffn, d.hidden, m, 1.0f, a.data(), d.ffn, g.data(), d.hidden, 1.0f,
           dw_out, d.hidden);                                                        // (F, H)
      ActivationBackward(d, m, h.data(), da.data(), dh.data());                     // (m, G*F)
      Gemm(workers, true, false, d.hidden, d.gate_ffn, m, 1.0f, x.data(), d.hidden, dh.data(),
           d.gate_ffn, 1.0f, dw_in, d.gate_ffn);                                     // (H, G*F)
      Gemm(workers, false, true, m, d.hidden, d.gate_ffn, 1.0f, dh.data(), d.gate_ffn, w.w_in,
           d.gate_ffn, 0.0f, dx.data(), d.hidden);                                   // (m, H)
      AccumulateIntoSources(peers, d, tile, m, dx.data(), nullptr);
    }
  }
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

// The devices this call runs for and their buffers. A real group has one device per handler
// call (`ranks` = {rank}); an emulated one runs all D in this call over stacked buffers.
struct Peers {
  std::vector<PeerBuffers> buffers;
  std::vector<int> ranks;
  std::shared_ptr<PeerGroup> group;  // null unless peers live in other handler calls
  std::chrono::milliseconds timeout{0};

  // Meets the peers at `phase`; "" on success.
  std::string Arrive(Phase phase) const {
    return group ? group->Arrive(ranks[0], phase, timeout) : std::string();
  }
};

struct CallAttrs {
  uint64_t site;
  int32_t num_devices, emulated, activation;
  int64_t timeout_ms;
};

// Builds the peer table: publishes `own` (this call's buffers, element offsets of device 0
// when emulated) and meets the peers, or lays out the emulated devices over the stacked blocks.
ffi::Error ConnectPeers(const CallAttrs& attrs, const MoeDims& d, int32_t rank, int32_t group,
                        const PeerBuffers& own, Peers* peers) {
  if (attrs.emulated || d.num_devices == 1) {
    for (int dev = 0; dev < d.num_devices; ++dev) {
      PeerBuffers b;
      b.x = Offset(own.x, d.x_type, dev * d.tokens * d.hidden);
      b.ids = own.ids + dev * d.tokens * d.k;
      b.weights = Offset(own.weights, d.weights_type, dev * d.tokens * d.k);
      b.w_in = Offset(own.w_in, d.w_type, dev * d.experts_local * d.hidden * d.gate_ffn);
      b.w_out = Offset(own.w_out, d.w_type, dev * d.experts_local * d.ffn * d.hidden);
      if (own.dy) b.dy = Offset(own.dy, d.x_type, dev * d.tokens * d.hidden);
      b.staging = own.staging + dev * d.tokens * d.slots * d.hidden;
      if (own.d_weights) b.d_weights = Offset(own.d_weights, d.weights_type, dev * d.tokens * d.k);
      peers->buffers.push_back(b);
      peers->ranks.push_back(dev);
    }
    return ffi::Error::Success();
  }
  if (rank < 0 || rank >= d.num_devices)
    return InvalidArgument("rank " + std::to_string(rank) + " outside the group of " +
                           std::to_string(d.num_devices) + " devices");
  peers->group = FindPeerGroup(attrs.site, group, d.num_devices);
  if (!peers->group)
    return InvalidArgument("call site " + std::to_string(attrs.site) +
                           " is already in use by a group of another size");
  peers->ranks = {rank};
  peers->timeout = std::chrono::milliseconds(attrs.timeout_ms);
  PeerBuffers published = own;
  published.signature = Signature(d);
  peers->group->Publish(rank, published);
  if (std::string err = peers->Arrive(Phase::kPublished); !err.empty())
    return ffi::Error::Internal(err);
  for (int dev = 0; dev < d.num_devices; ++dev) {
    peers->buffers.push_back(peers->group->peer(dev));
    if (peers->buffers.back().signature != published.signature)
      return ffi::Error::Internal(
          "jax_ccfuser: device " + std::to_string(dev) +
          " called this site with other shapes or dtypes than device " + std::to_string(rank));
  }
  return ffi::Error::Success();
}

// Plans and runs `compute(me, rows, offsets)` for each device of this call, then meets the
// peers after compute. A bad id is found identically by every device, which all still meet at
// the barrier (so nobody frees buffers a peer is reading) before returning the error.
template <typename Compute>
ffi::Error PlanAndCompute(const Peers& peers, const MoeDims& d, Compute compute) {
  std::string bad;
  std::vector<WorkRow> rows;
  std::vector<int64_t> offsets;
  for (int me : peers.ranks) {
    bad = BuildWorkList(peers.buffers, d, me, &rows, &offsets);
    if (!bad.empty()) break;
    compute(me, rows, offsets);
  }
  if (std::string err = peers.Arrive(Phase::kComputed); !err.empty())
    return ffi::Error::Internal(err);
  if (!bad.empty()) return InvalidArgument(bad);
  return ffi::Error::Success();
}

// This handler's share of XLA's pool: the devices of a real group run at once and split it.
Workers ShareOfPool(const Peers& peers, const MoeDims& d, ffi::ThreadPool& pool) {
  const int64_t concurrent = peers.group ? d.num_devices : 1;
  return Workers(&pool, static_cast<int>(pool.num_threads() / concurrent));
}

ffi::Error MoeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids,
                          ffi::AnyBuffer weights, ffi::AnyBuffer w_in, ffi::AnyBuffer w_out,
                          ScalarS32 rank, ScalarS32 group,
                          uint64_t site, int32_t num_devices, int32_t emulated,
                          int32_t activation, int64_t timeout_ms, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<Staging> staging) {
  MoeDims d;
  if (ffi::Error err = DecodeDims(x, ids, weights, w_in, w_out, num_devices, emulated,
                                  activation, &d);
      err.failure())
    return err;
  if (y->element_type() != d.x_type || y->element_count() != x.element_count() ||
      staging->element_count() != x.element_count() / d.hidden * d.slots * d.hidden)
    return InvalidArgument("outputs must be y [T, H] in x's dtype and staging [T, S, H] float32");
  // Peers accumulate into this device's staging as soon as the publish barrier passes.
  std::memset(staging->typed_data(), 0, staging->size_bytes());
  PeerBuffers own;
  own.x = x.untyped_data();
  own.ids = ids.typed_data();
  own.weights = weights.untyped_data();
  own.w_in = w_in.untyped_data();
  own.w_out = w_out.untyped_data();
  own.staging = staging->typed_data();
  Peers peers;
  const CallAttrs attrs{site, num_devices, emulated, activation, timeout_ms};
  if (ffi::Error err = ConnectPeers(attrs, d, rank.typed_data()[0], group.typed_data()[0], own,
                                    &peers);
      err.failure())
    return err;
  const Workers workers = ShareOfPool(peers, d, pool);
  if (ffi::Error err = PlanAndCompute(peers, d,
                                      [&](int me, const std::vector<WorkRow>& rows,
                                          const std::vector<int64_t>& offsets) {
                                        ComputeForward(workers, peers.buffers, d, me, rows, offsets);
                                      });
      err.failure())
    return err;
  for (int me : peers.ranks)
    SumSlots(d, peers.buffers[me].staging, y->untyped_data(),
             peers.group ? 0 : me * d.tokens * d.hidden);
  return ffi::Error::Success();
}

ffi::Error MoeBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids,
                           ffi::AnyBuffer weights, ffi::AnyBuffer w_in, ffi::AnyBuffer w_out,
                           ffi::AnyBuffer dy, ScalarS32 rank,
                           ScalarS32 group, uint64_t site, int32_t num_devices,
                           int32_t emulated, int32_t activation, int64_t timeout_ms,
                           ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> d_weights,
                           ffi::Result<ffi::AnyBuffer> dw_in, ffi::Result<ffi::AnyBuffer> dw_out,
                           ffi::Result<Staging> staging) {
  MoeDims d;
  if (ffi::Error err = DecodeDims(x, ids, weights, w_in, w_out, num_devices, emulated,
                                  activation, &d);
      err.failure())
    return err;
  if (dy.element_type() != d.x_type || dy.element_count() != x.element_count() ||
      dx->element_type() != d.x_type || d_weights->element_type() != d.weights_type ||
      dw_in->element_type() != d.w_type || dw_out->element_type() != d.w_type ||
      dw_in->element_count() != w_in.element_count() ||
      dw_out->element_count() != w_out.element_count() ||
      staging->element_count() != x.element_count() / d.hidden * d.slots * d.hidden)
    return InvalidArgument("backward operands and outputs do not match the forward's");
  std::memset(staging->typed_data(), 0, staging->size_bytes());
  // Every (token, k) of a valid call is written by exactly one device; zero it anyway so a
  // failed call leaves no uninitialised memory behind.
  std::memset(d_weights->untyped_data(), 0, d_weights->size_bytes());
  PeerBuffers own;
  own.x = x.untyped_data();
  own.ids = ids.typed_data();
  own.weights = weights.untyped_data();
  own.w_in = w_in.untyped_data();
  own.w_out = w_out.untyped_data();
  own.dy = dy.untyped_data();
  own.staging = staging->typed_data();
  own.d_weights = d_weights->untyped_data();
  Peers peers;
  const CallAttrs attrs{site, num_devices, emulated, activation, timeout_ms};
  if (ffi::Error err = ConnectPeers(attrs, d, rank.typed_data()[0], group.typed_data()[0], own,
                                    &peers);
      err.failure())
    return err;
  // Weight gradients accumulate in float32 here, then round once into the outputs.
  std::vector<float> dw_in_acc(w_in.element_count(), 0.0f), dw_out_acc(w_out.element_count(), 0.0f);
  const int64_t per_in = d.experts_local * d.hidden * d.gate_ffn;
  const int64_t per_out = d.experts_local * d.ffn * d.hidden;
  const Workers workers = ShareOfPool(peers, d, pool);
  if (ffi::Error err = PlanAndCompute(
          peers, d,
          [&](int me, const std::vector<WorkRow>& rows, const std::vector<int64_t>& offsets) {
            const int64_t block = peers.group ? 0 : me;
            ComputeBackward(workers, peers.buffers, d, me, rows, offsets,
                            dw_in_acc.data() + block * per_in, dw_out_acc.data() + block * per_out);
          });
      err.failure())
    return err;
  for (int me : peers.ranks)
    SumSlots(d, peers.buffers[me].staging, dx->untyped_data(),
             peers.group ? 0 : me * d.tokens * d.hidden);
  StoreFloats(dw_in_acc.data(), dw_in_acc.size(), dw_in->untyped_data(), d.w_type, 0);
  StoreFloats(dw_out_acc.data(), dw_out_acc.size(), dw_out->untyped_data(), d.w_type, 0);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ccf

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeForwardCpu, ccf::MoeForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [T, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // expert_ids [T, K]
                                  .Arg<ffi::AnyBuffer>()           // expert_weights [T, K]
                                  .Arg<ffi::AnyBuffer>()           // w_in [E_local, H, G*F]
                                  .Arg<ffi::AnyBuffer>()           // w_out [E_local, F, H]
                                  .Arg<ccf::ScalarS32>() // rank in the EP group
                                  .Arg<ccf::ScalarS32>() // which EP group
                                  .Attr<uint64_t>("site")          // unique per call site
                                  .Attr<int32_t>("num_devices")    // D
                                  .Attr<int32_t>("emulated")       // D devices in one call
                                  .Attr<int32_t>("activation")     // ccf::Activation
                                  .Attr<int64_t>("timeout_ms")     // barrier timeout
                                  .Ret<ffi::AnyBuffer>()           // y [T, H]
                                  .Ret<ccf::Staging>() // staging [T, S, H]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeBackwardCpu, ccf::MoeBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [T, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // expert_ids [T, K]
                                  .Arg<ffi::AnyBuffer>()           // expert_weights [T, K]
                                  .Arg<ffi::AnyBuffer>()           // w_in [E_local, H, G*F]
                                  .Arg<ffi::AnyBuffer>()           // w_out [E_local, F, H]
                                  .Arg<ffi::AnyBuffer>()           // dy [T, H]
                                  .Arg<ccf::ScalarS32>() // rank in the EP group
                                  .Arg<ccf::ScalarS32>() // which EP group
                                  .Attr<uint64_t>("site")          // unique per call site
                                  .Attr<int32_t>("num_devices")    // D
                                  .Attr<int32_t>("emulated")       // D devices in one call
                                  .Attr<int32_t>("activation")     // ccf::Activation
                                  .Attr<int64_t>("timeout_ms")     // barrier timeout
                                  .Ret<ffi::AnyBuffer>()           // dx [T, H]
                                  .Ret<ffi::AnyBuffer>()           // d expert_weights [T, K]
                                  .Ret<ffi::AnyBuffer>()           // dw_in [E_local, H, G*F]
                                  .Ret<ffi::AnyBuffer>()           // dw_out [E_local, F, H]
                                  .Ret<ccf::Staging>() // staging [T, S, H]
);
