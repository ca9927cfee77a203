// One expert's FFN over its routed rows on the host, tile by tile: the gather from the peers'
// buffers is the dispatch and the accumulation into the sources' staging rows is the combine.
#pragma once

#include <cstdint>
#include <vector>

#include "xla_ffi/cpu/cpu_gemm.h"
#include "xla_ffi/moe_dims.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/cpu/work_list.h"

namespace ccf {

// An expert's weights as float32 row-major panels, read from its owner's buffers (a helper
// device reads them from the owner's memory): the buffers themselves for float32, a converted
// copy otherwise.
class ExpertWeights {
 public:
  ExpertWeights(const PeerBuffers& owner, const MoeDims& d, int64_t local_expert);
  const float* w_in() const { return w_in_; }    // [H, G*F]
  const float* w_out() const { return w_out_; }  // [F, H]

 private:
  const float* w_in_;
  const float* w_out_;
  std::vector<float> w_in_copy_, w_out_copy_;
};

// The rows of h = x @ w_in a device keeps from its forward for its backward (residuals="hidden"),
// float32, by position in its work list (expert by expert, each expert's rows in order): the
// rows of every GEMM tile that lies within the first `capacity` positions. The backward reads a
// tile's h from here when the forward kept it and recomputes it otherwise, with the same GEMM
// on the same rows as the forward: the results are the same bitwise either way.
struct KeptHidden {
  float* rows = nullptr;  // [capacity, G*F]
  int64_t capacity = 0;   // 0: nothing kept, every tile is recomputed

  // The rows of the tile at positions [position, position + m), or null unless all are kept.
  float* Tile(const MoeDims& d, int64_t position, int64_t m) const {
    return position + m <= capacity ? rows + position * d.gate_ffn : nullptr;
  }
};

// The dispatch: out [U, H] = float(peers[src].*field[token, :]) for the list's distinct
// (source, token) rows, one read from the source each.
void FetchTokens(const std::vector<PeerBuffers>& peers, const void* PeerBuffers::*field,
                 const MoeDims& d, const HostWorkList& work, float* out);

// Forward: staging[src][token, slot] += weight[src][token, k] * FFN(x) per row, with x the
// row's fetched token (`x_rows` [U, H] from FetchTokens). The expert's rows start at work-list
// position `position`; the tiles `kept` holds keep their h there.
void ExpertForward(const Workers& workers, const std::vector<PeerBuffers>& peers,
                   const MoeDims& d, const ExpertWork& work, const ExpertWeights& w,
                   const float* x_rows, const KeptHidden& kept, int64_t position);

// Backward: takes each row's hidden activation from `kept` or recomputes it from the fetched x;
// writes d_weights[src][token, k]; accumulates dx partial sums into staging[src][token, slot]
// and, where `weight_grads` (a frozen expert's are not wanted: two of its five GEMMs), the weight
// gradients, in row order, into dw_in [H, G*F] and dw_out [F, H].
void ExpertBackward(const Workers& workers, const std::vector<PeerBuffers>& peers,
                    const MoeDims& d, const ExpertWork& work, const ExpertWeights& w,
                    const float* x_rows, const float* dy_rows, const KeptHidden& kept,
                    int64_t position, bool weight_grads, float* dw_in, float* dw_out);

}  // namespace ccf
