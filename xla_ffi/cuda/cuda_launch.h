// The launch sequence of one CUDA call on raw pointers, once its peers are connected
// (cuda_peers.h): the scratch it carves, and the kernels it enqueues on XLA's stream (cuda/api.cuh
// describes them). The host never waits for the device here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "cuda/api.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/cuda/cuda_device.h"
#include "xla_ffi/cuda/cuda_peers.h"
#include "xla_ffi/moe_call.h"

namespace ccf {

// Records the first failing launch; later launches are skipped, except the device barriers,
// which always go out once the peers have met, so that no peer waits for a barrier this GPU
// never enqueues and the members' barrier counts stay in step.
class Launcher {
 public:
  template <typename F>
  void Run(const char* what, F launch) {
    if (status_ == cudaSuccess) Record(what, launch());
  }
  template <typename F>
  void Always(const char* what, F launch) {
    Record(what, launch());
  }
  bool failed() const { return status_ != cudaSuccess; }
  xla::ffi::Error Result() const {
    return status_ == cudaSuccess ? xla::ffi::Error::Success()
                                  : CudaFailure(std::string("launching ") + what_, status_);
  }

 private:
  void Record(const char* what, cudaError_t st) {
    if (st != cudaSuccess && status_ == cudaSuccess) {
      status_ = st;
      what_ = what;
    }
  }
  cudaError_t status_ = cudaSuccess;
  const char* what_ = "";
};

// Scratch layout. A carve runs twice: without a base to size the scratch, then over it.
struct Arena {
  char* base;
  size_t used = 0;

  template <typename T>
  T* Take(int64_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    const size_t bytes = sizeof(T) * static_cast<size_t>(count);
    used += (bytes + cuda::kWorkspaceAlignment - 1) / cuda::kWorkspaceAlignment *
            cuda::kWorkspaceAlignment;
    return p;
  }
};

// The work list covers every pair of the group (D * T * K); the rows hold one chunk of it,
// Call::chunk_tiles M-tiles (cuda::Chunk), since how many pairs land here is known only once the
// list is built on the device, after the scratch is taken.
struct ForwardScratch {
  cuda::WorkList list;
  void* x;      // [rows, H] the pairs' x rows, fetched from their sources
  void* a;      // [rows, F] act(x @ w_in), x's dtype
  float* rows;  // [rows, H] a @ w_out
  // Grouped GEMMs (Call::grouped_gemms): [rows, G*F] x @ w_in, which the activation pass reads,
  // and their workspace; else null.
  float* h = nullptr;
  void* gemm_workspace = nullptr;
};
ForwardScratch CarveForward(const Call& c, Arena& arena);

struct BackwardScratch {
  cuda::WorkList list;
  void* x;              // [rows, H] the pairs' x rows, fetched from their sources
  void* dy;             // [rows, H] and their dy rows
  float* h;             // [rows, G*F] x @ w_in, recomputed where not kept
  void* aw = nullptr;   // [rows, F] w * act(h), x's dtype, where weight gradients are wanted
  void* dh;             // [rows, G*F] x's dtype
  float* dot_partial;   // [rows, F tiles]
  float* rows;          // [rows, H] dh @ w_in^T
  int32_t num_partials;
  // Grouped GEMMs: [rows, F] dy @ w_out^T, which the activation pass reads, and their
  // workspace; else null.
  float* u = nullptr;
  void* gemm_workspace = nullptr;
  // With several chunks and weight gradients wanted: [H*G*F + F*H] float32, the sums of the
  // group that a chunk ends in the middle of (cuda::GemmParams::carry); else null.
  float* carry = nullptr;
  // With a plan and weight gradients wanted: [own experts, S, H*G*F + F*H] float32, where the
  // device computing plan slot s of an expert writes its weight-gradient partial (helpers
  // through peer memory); else null.
  float* partials = nullptr;
};
BackwardScratch CarveBackward(const Call& c, Arena& arena);

// Sets c->chunk_tiles: every row in one chunk where the scratch then fits in `budget` bytes,
// else as many M-tiles as fit beside what the chunks share (at least one); returns the bytes of
// the forward's or backward's scratch.
int64_t SizeChunks(Call* c, int64_t budget, bool backward);

// The rows an expert gets from each source on average (T*K/E) from which the GEMMs run in source
// phases (cuda_launch.cc, SourcePhasesPay, says why). bench/model.py states the same threshold
// (Node.phase_rows); a test holds the two together.
inline constexpr int64_t kPhaseRows = 512;

// Stages, starts (barrier), computes, scatters, ends (barrier) and combines one forward call.
void RunForward(const Call& c, DeviceState& me, const ForwardScratch& s, const ScalarS32& rank,
                const ScalarS32& group, void* y, cudaStream_t stream, Launcher& launcher);

// The same for the backward: recomputes h where the forward kept none, forms dh and
// d expert_weights, the weight gradients of this device's experts and the dx rows it sends back.
void RunBackward(const Call& c, DeviceState& me, const BackwardScratch& s, const ScalarS32& rank,
                 const ScalarS32& group, void* dx, void* d_weights, void* dw_in, void* dw_out,
                 cudaStream_t stream, Launcher& launcher);

}  // namespace ccf
