#include "xla_ffi/cuda/ipc_memory.h"

#include <functional>
#include <thread>

#include "xla_ffi/shared_memory.h"

namespace ccf {

namespace {

std::string Failed(const std::string& what, cudaError_t status) {
  return "jax_ccfuser: " + what + " failed: " + cudaGetErrorName(status) + " (" +
         cudaGetErrorString(status) + ")";
}

// Runs `work` with GPU `ordinal` current, on a thread of its own. These are called from a Python
// thread, whose current GPU is someone else's choice; setting it back afterwards would make a
// context on that GPU if it had none (cudaSetDevice initialises the device's primary context), a
// few hundred MB on a GPU another process may own.
std::string OnGpu(int ordinal, const std::function<std::string()>& work) {
  std::string result;
  std::thread([&] {
    if (cudaError_t st = cudaSetDevice(ordinal); st != cudaSuccess)
      result = Failed("selecting GPU " + std::to_string(ordinal), st);
    else
      result = work();
  }).join();
  return result;
}

}  // namespace

std::string IpcAllocate(int ordinal, int64_t bytes, int32_t device, int32_t chunk,
                        cudaIpcMemHandle_t* handle) {
  return OnGpu(ordinal, [&]() -> std::string {
    void* base = nullptr;
    if (cudaError_t st = cudaMalloc(&base, bytes); st != cudaSuccess)
      return Failed("allocating a " + std::to_string(bytes) + "-byte workspace chunk on GPU " +
                        std::to_string(ordinal),
                    st);
    // The barrier flags and counts in the chunk's regions start at zero. Zeroed on a stream of
    // its own, so nothing XLA has enqueued on the GPU is waited for.
    cudaStream_t stream = nullptr;
    cudaError_t st = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (st == cudaSuccess) st = cudaMemsetAsync(base, 0, bytes, stream);
    if (st == cudaSuccess) st = cudaStreamSynchronize(stream);
    if (stream != nullptr) cudaStreamDestroy(stream);
    if (st == cudaSuccess) st = cudaIpcGetMemHandle(handle, base);
    std::string err =
        st == cudaSuccess
            ? RegisterSegment(device, chunk, Segment{static_cast<char*>(base), bytes, true})
            : Failed("zeroing and exporting a workspace chunk on GPU " + std::to_string(ordinal),
                     st);
    if (!err.empty()) cudaFree(base);
    return err;
  });
}

std::string IpcOpen(int ordinal, const cudaIpcMemHandle_t& handle, int64_t bytes, int32_t device,
                    int32_t chunk) {
  return OnGpu(ordinal, [&]() -> std::string {
    void* base = nullptr;
    // The chunk lives on another GPU (or on this one, emulating): its kernels read it peer to
    // peer.
    if (cudaError_t st = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
        st != cudaSuccess)
      return Failed("opening workspace chunk " + std::to_string(chunk) + " of device " +
                        std::to_string(device) + " on GPU " + std::to_string(ordinal),
                    st);
    std::string err =
        RegisterSegment(device, chunk, Segment{static_cast<char*>(base), bytes, false});
    if (!err.empty()) cudaIpcCloseMemHandle(base);  // reopening a handle only took a reference
    return err;
  });
}

}  // namespace ccf
