// Error handling of the CUDA path: host-side launcher checks and device-side fault records.
//
// Launchers never throw (they run under an XLA FFI handler): a failed precondition or CUDA call
// returns a cudaError_t, which the handler turns into an ffi::Error. Data-dependent faults found
// on the device (bad expert ids, barrier timeouts) are not assertions: kernels record them in a
// DeviceError (api.cuh) and carry on without touching memory out of bounds.
#pragma once

#include <cstdio>

#include <cuda_runtime.h>

#include "cuda/api.cuh"

// Host: returns cudaErrorInvalidValue from the enclosing launcher when `cond` is false. The
// handler validates every call first, so this only fires on a programming error.
#define CCF_HOST_ASSERT(cond)                                                           \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "jax_ccfuser: launcher precondition failed at %s:%d: %s\n", \
                   __FILE__, __LINE__, #cond);                                          \
      return cudaErrorInvalidValue;                                                     \
    }                                                                                   \
  } while (0)

// Host: returns the error of a CUDA runtime call from the enclosing launcher.
#define CCF_CUDA_RETURN_IF_ERROR(expr)      \
  do {                                      \
    cudaError_t ccf_status_ = (expr);       \
    if (ccf_status_ != cudaSuccess) {       \
      return ccf_status_;                   \
    }                                       \
  } while (0)

#if defined(__CUDACC__)
namespace ccf::cuda {

// Device: records a data-dependent fault in `error`; the first fault wins, later ones are dropped.
__device__ __forceinline__ void record_device_error(DeviceError* error, int32_t code,
                                                    int32_t source, int32_t token, int32_t k,
                                                    int64_t value, int64_t limit) {
  if (atomicCAS(&error->code, kDeviceOk, code) == kDeviceOk) {
    error->source = source;
    error->token = token;
    error->k = k;
    error->value = value;
    error->limit = limit;
  }
}

}  // namespace ccf::cuda
#endif
