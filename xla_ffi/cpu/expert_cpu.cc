#include "xla_ffi/cpu/expert_cpu.h"

#include <algorithm>

#include "common/activation.h"
#include "xla_ffi/cpu/host_dtype.h"

namespace ccf {
namespace {

// Rows per GEMM panel: large enough for OpenBLAS to run near full rate, small enough that the
// panel's activations stay in cache between the two GEMMs.
constexpr int64_t kTileRows = 128;

// The rows a panel's buffers hold for an expert's `n` rows: an expert with a few rows (a small
// batch spread over many experts) zeroes and touches no more than those.
int64_t TileBufferRows(int64_t n) { return std::min(kTileRows, n); }

// a[i, j] = act(h[i, j]) (gated: act(h[i, j]) * h[i, F + j]); h [m, G*F] -> a [m, F].
// The activation is a template argument so each inner loop is branch-free and vectorises.
template <Activation A>
void ActivationForwardT(const MoeDims& d, int64_t m, const float* h, float* a) {
  for (int64_t i = 0; i < m; ++i) {
    const float* hi = h + i * d.gate_ffn;
    float* ai = a + i * d.ffn;
    if constexpr (IsGated(A)) {
      for (int64_t j = 0; j < d.ffn; ++j) ai[j] = ActForward(A, hi[j]) * hi[d.ffn + j];
    } else {
      for (int64_t j = 0; j < d.ffn; ++j) ai[j] = ActForward(A, hi[j]);
    }
  }
}

// dh = (d a / d h)^T da; h [m, G*F], da [m, F] -> dh [m, G*F].
template <Activation A>
void ActivationBackwardT(const MoeDims& d, int64_t m, const float* h, const float* da,
                         float* dh) {
  for (int64_t i = 0; i < m; ++i) {
    const float* hi = h + i * d.gate_ffn;
    const float* dai = da + i * d.ffn;
    float* dhi = dh + i * d.gate_ffn;
    if constexpr (IsGated(A)) {
      for (int64_t j = 0; j < d.ffn; ++j) {
        const float g = hi[j], u = hi[d.ffn + j];
        dhi[j] = ActBackward(A, g, dai[j] * u);
        dhi[d.ffn + j] = dai[j] * ActForward(A, g);
      }
    } else {
      for (int64_t j = 0; j < d.ffn; ++j) dhi[j] = ActBackward(A, hi[j], dai[j]);
    }
  }
}

// Calls `fn.template operator()<A>()` with the call's activation as a compile-time constant.
template <typename Fn>
void WithActivation(Activation a, Fn fn) {
  switch (a) {
    case Activation::kSwiglu: return fn.template operator()<Activation::kSwiglu>();
    case Activation::kGeglu: return fn.template operator()<Activation::kGeglu>();
    case Activation::kGelu: return fn.template operator()<Activation::kGelu>();
    case Activation::kRelu: return fn.template operator()<Activation::kRelu>();
    case Activation::kSilu: return fn.template operator()<Activation::kSilu>();
  }
}

void ActivationForward(const MoeDims& d, int64_t m, const float* h, float* a) {
  WithActivation(d.activation, [&]<Activation A>() { ActivationForwardT<A>(d, m, h, a); });
}

void ActivationBackward(const MoeDims& d, int64_t m, const float* h, const float* da, float* dh) {
  WithActivation(d.activation, [&]<Activation A>() { ActivationBackwardT<A>(d, m, h, da, dh); });
}

// out[i, :] = fetched[rows[i].fetched, :] for a tile of rows: a local copy into the panel.
void GatherRows(const float* fetched, const MoeDims& d, const WorkRow* rows, int64_t m,
                float* out) {
  for (int64_t i = 0; i < m; ++i)
    std::copy_n(fetched + rows[i].fetched * d.hidden, d.hidden, out + i * d.hidden);
}

float RowWeight(const std::vector<PeerBuffers>& peers, const MoeDims& d, const WorkRow& r) {
  return LoadFloat(peers[r.src].weights, d.weights_type, r.token * d.k + r.k);
}

// staging[src][token, slot, :] += scale_i * values[i, :]: the combine write into the source.
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

// The first half of a tile's forward: x (m, H) gathered -> h (m, G*F) -> a (m, F), with h
// computed or, in a backward, the forward's kept rows.
struct TileHidden {
  std::vector<float> x, h_computed, a;
  const float* h = nullptr;  // (m, G*F): h_computed, or the kept rows
  TileHidden(const MoeDims& d, int64_t rows)
      : x(rows * d.hidden), h_computed(rows * d.gate_ffn), a(rows * d.ffn) {}

  void Run(const Workers& workers, const MoeDims& d, const ExpertWeights& w,
           const float* x_rows, const WorkRow* tile, int64_t m, const float* kept_h) {
    GatherRows(x_rows, d, tile, m, x.data());                                    // (m, H)
    h = kept_h;
    if (h == nullptr) {
      Gemm(workers, false, false, m, d.gate_ffn, d.hidden, 1.0f, x.data(), d.hidden, w.w_in(),
           d.gate_ffn, 0.0f, h_computed.data(), d.gate_ffn);                     // (m, G*F)
      h = h_computed.data();
    }
    ActivationForward(d, m, h, a.data());                                        // (m, F)
  }
};

}  // namespace

ExpertWeights::ExpertWeights(const PeerBuffers& owner, const MoeDims& d, int64_t local_expert) {
  const int64_t n_in = d.hidden * d.gate_ffn, n_out = d.ffn * d.hidden;
  if (d.w_type == xla::ffi::DataType::F32) {
    w_in_ = static_cast<const float*>(owner.w_in) + local_expert * n_in;
    w_out_ = static_cast<const float*>(owner.w_out) + local_expert * n_out;
    return;
  }
  w_in_copy_.resize(n_in);
  w_out_copy_.resize(n_out);
  LoadFloats(owner.w_in, d.w_type, local_expert * n_in, n_in, w_in_copy_.data());
  LoadFloats(owner.w_out, d.w_type, local_expert * n_out, n_out, w_out_copy_.data());
  w_in_ = w_in_copy_.data();
  w_out_ = w_out_copy_.data();
}

void FetchTokens(const std::vector<PeerBuffers>& peers, const void* PeerBuffers::*field,
                 const MoeDims& d, const HostWorkList& work, float* out) {
  for (size_t i = 0; i < work.tokens.size(); ++i)
    LoadFloats(peers[work.tokens[i].src].*field, d.x_type, work.tokens[i].token * d.hidden,
               d.hidden, out + i * d.hidden);
}

void ExpertForward(const Workers& workers, const std::vector<PeerBuffers>& peers,
                   const MoeDims& d, const ExpertWork& work, const ExpertWeights& w,
                   const float* x_rows, const KeptHidden& kept, int64_t position) {
  const int64_t n = static_cast<int64_t>(work.rows.size());
  const int64_t rows = TileBufferRows(n);
  TileHidden hid(d, rows);
  std::vector<float> y(rows * d.hidden), scale(rows);
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t m = std::min(kTileRows, n - r0);
    const WorkRow* tile = work.rows.data() + r0;
    hid.Run(workers, d, w, x_rows, tile, m, nullptr);
    if (float* keep = kept.Tile(d, position + r0, m)) std::copy_n(hid.h, m * d.gate_ffn, keep);
    Gemm(workers, false, false, m, d.hidden, d.ffn, 1.0f, hid.a.data(), d.ffn, w.w_out(),
         d.hidden, 0.0f, y.data(), d.hidden);                                    // (m, H)
    for (int64_t i = 0; i < m; ++i) scale[i] = RowWeight(peers, d, tile[i]);
    AccumulateIntoSources(peers, d, tile, m, y.data(), scale.data());
  }
}

void ExpertBackward(const Workers& workers, const std::vector<PeerBuffers>& peers,
                    const MoeDims& d, const ExpertWork& work, const ExpertWeights& w,
                    const float* x_rows, const float* dy_rows, const KeptHidden& kept,
                    int64_t position, bool weight_grads, float* dw_in, float* dw_out) {
  const int64_t n = static_cast<int64_t>(work.rows.size());
  const int64_t rows = TileBufferRows(n);
  TileHidden hid(d, rows);
  std::vector<float> g(rows * d.hidden), da(rows * d.ffn), dh(rows * d.gate_ffn),
      dx(rows * d.hidden);
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t m = std::min(kTileRows, n - r0);
    const WorkRow* tile = work.rows.data() + r0;
    hid.Run(workers, d, w, x_rows, tile, m, kept.Tile(d, position + r0, m));
    GatherRows(dy_rows, d, tile, m, g.data());                                   // (m, H)
    // d a = (w * dy) @ w_out^T; with da_raw = dy @ w_out^T first, d weight = <dy, a @ w_out>
    // = <da_raw, a> needs no recomputed expert output.
    Gemm(workers, false, true, m, d.ffn, d.hidden, 1.0f, g.data(), d.hidden, w.w_out(),
         d.hidden, 0.0f, da.data(), d.ffn);                                      // (m, F)
    for (int64_t i = 0; i < m; ++i) {
      const WorkRow& r = tile[i];
      float* dai = da.data() + i * d.ffn;
      const float* ai = hid.a.data() + i * d.ffn;
      float dot = 0.0f;
      for (int64_t j = 0; j < d.ffn; ++j) dot += dai[j] * ai[j];
      StoreFloats(&dot, 1, peers[r.src].d_weights, d.weights_type, r.token * d.k + r.k);
      const float s = RowWeight(peers, d, r);
      for (int64_t j = 0; j < d.ffn; ++j) dai[j] *= s;                        // da
      float* gi = g.data() + i * d.hidden;
      for (int64_t j = 0; j < d.hidden; ++j) gi[j] *= s;                      // g = w * dy
    }
    if (weight_grads)
      Gemm(workers, true, false, d.ffn, d.hidden, m, 1.0f, hid.a.data(), d.ffn, g.data(),
           d.hidden, 1.0f, dw_out, d.hidden);                                    // (F, H)
    ActivationBackward(d, m, hid.h, da.data(), dh.data());               // (m, G*F)
    if (weight_grads)
      Gemm(workers, true, false, d.hidden, d.gate_ffn, m, 1.0f, hid.x.data(), d.hidden,
           dh.data(), d.gate_ffn, 1.0f, dw_in, d.gate_ffn);                      // (H, G*F)
    Gemm(workers, false, true, m, d.hidden, d.gate_ffn, 1.0f, dh.data(), d.gate_ffn, w.w_in(),
         d.gate_ffn, 0.0f, dx.data(), d.hidden);                                 // (m, H)
    AccumulateIntoSources(peers, d, tile, m, dx.data(), nullptr);
  }
}

}  // namespace ccf
