// How a kernel sits on a device, settled once per (kernel, device) rather than at every launch:
// cudaFuncSetAttribute's shared-memory limit stays with the device's context, a kernel's
// occupancy at its one block size never changes, and the launchers run several times per chunk.
#pragma once

#include <map>
#include <mutex>
#include <utility>

#include <cuda_runtime.h>

#include "cuda/exception.cuh"

namespace ccf::cuda {

// Readies `kernel` for launches of `threads`-thread blocks taking `bytes` of dynamic shared
// memory on the current device: raises its shared-memory limit to `bytes` there and sets
// *blocks_per_sm to how many such blocks an SM holds at once (0: the kernel does not fit). The
// first call per (kernel, device) asks CUDA; later ones read the answer.
inline cudaError_t ready_kernel(const void* kernel, int threads, int bytes, int* blocks_per_sm) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> settled;  // (kernel, device) -> blocks/SM
  int device;
  CCF_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  const auto found = settled.find({kernel, device});
  if (found != settled.end()) {
    *blocks_per_sm = found->second;
    return cudaSuccess;
  }
  CCF_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  CCF_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel, threads, bytes));
  settled[{kernel, device}] = *blocks_per_sm;
  return cudaSuccess;
}

}  // namespace ccf::cuda
