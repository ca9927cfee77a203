// One expert's FFN over its routed rows on the host, tile by tile: the gather from the peers'
// buffers is the dispatch and the accumulation into the sources' staging rows is the combine.
#pragma once

#include <vector>

#include "xla_ffi/cpu_gemm.h"
#include "xla_ffi/moe_dims.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/work_list.h"

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

// The dispatch: out [U, H] = float(peers[src].*field[token, :]) for the list's distinct
// (source, token) rows, one read from the source each.
void FetchTokens(const std::vector<PeerBuffers>& peers, const void* PeerBuffers::*field,
                 const MoeDims& d, const HostWorkList& work, float* out);

// Forward: staging[src][token, slot] += weight[src][token, k] * FFN(x) per row, with x the
// row's fetched token (`x_rows` [U, H] from FetchTokens).
void ExpertForward(const Workers& workers, const std::vector<PeerBuffers>& peers,
                   const MoeDims& d, const ExpertWork& work, const ExpertWeights& w,
                   const float* x_rows);

// Backward: recomputes each row's hidden activation from the fetched x; writes
// d_weights[src][token, k]; accumulates dx partial sums into staging[src][token, slot] and the
// weight gradients, in row order, into dw_in [H, G*F] and dw_out [F, H].
void ExpertBackward(const Workers& workers, const std::vector<PeerBuffers>& peers,
                    const MoeDims& d, const ExpertWork& work, const ExpertWeights& w,
                    const float* x_rows, const float* dy_rows, float* dw_in, float* dw_out);

}  // namespace ccf
