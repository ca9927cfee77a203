// A kernel's dynamic shared memory limit, raised once per device rather than at every launch:
// cudaFuncSetAttribute's setting stays with the device's context, and the launchers run several
// times per chunk.
#pragma once

#include <mutex>
#include <set>
#include <utility>

#include <cuda_runtime.h>

#include "cuda/exception.cuh"

namespace ccf::cuda {

// Lets `kernel` take `bytes` of dynamic shared memory on the current device (the one the
// attribute applies to), the first time it is asked there.
inline cudaError_t allow_shared_memory(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;  // (kernel, device)
  int device;
  CCF_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, device}) != 0) return cudaSuccess;
  CCF_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert({kernel, device});
  return cudaSuccess;
}

}  // namespace ccf::cuda
