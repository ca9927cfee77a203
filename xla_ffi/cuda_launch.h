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
#include "xla_ffi/cuda_device.h"
#include "xla_ffi/cuda_peers.h"
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

// Rows are sized for every pair of the group landing on this device (D * T * K): the work list
// that says how many do is built on the device, after the scratch is taken.
struct ForwardScratch {
  cuda::WorkList list;
  void* x;      // [pairs, H] the pairs' x rows, fetched from their sources
  void* a;      // [pairs, F] act(x @ w_in), x's dtype
  float* rows;  // [pairs, H] a @ w_out
};
ForwardScratch CarveForward(const Call& c, Arena& arena);

struct BackwardScratch {
  cuda::WorkList list;
  void* x;              // [pairs, H] the pairs' x rows, fetched from their sources
  void* dy;             // [pairs, H] and their dy rows
  float* h;             // [pairs, G*F] x @ w_in, recomputed where not kept
  void* aw;             // [pairs, F] w * act(h), x's dtype
  void* dh;             // [pairs, G*F] x's dtype
  float* dot_partial;   // [pairs, F tiles]
  float* rows;          // [pairs, H] dh @ w_in^T
  int32_t num_partials;
  // With a plan: [own experts, S, H*G*F + F*H] float32, where the device computing plan slot s
  // of an expert writes its weight-gradient partial (helpers through peer memory); else null.
  float* partials = nullptr;
};
BackwardScratch CarveBackward(const Call& c, Arena& arena);

// Stages, starts (barrier), computes, scatters, ends (barrier) and combines one forward call.
void RunForward(const Call& c, DeviceState& me, const ForwardScratch& s, const ScalarS32& rank,
                const ScalarS32& group, void* y, cudaStream_t stream, Launcher& launcher);

// The same for the backward: recomputes h where the forward kept none, forms dh and
// d expert_weights, the weight gradients of this device's experts and the dx rows it sends back.
void RunBackward(const Call& c, DeviceState& me, const BackwardScratch& s, const ScalarS32& rank,
                 const ScalarS32& group, void* dx, void* d_weights, void* dw_in, void* dw_out,
                 cudaStream_t stream, Launcher& launcher);

}  // namespace ccf
