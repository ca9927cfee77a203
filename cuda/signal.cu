// The device barrier's kernel: cuda/barrier.cuh's steps over system-scope loads and stores, so
// the flags order memory between GPUs, in this process or in others (CUDA IPC mappings).
#include "cuda/api.cuh"
#include "cuda/barrier.cuh"
#include "cuda/exception.cuh"

namespace ccf::cuda {
namespace {

struct SystemMemory {
  __device__ uint64_t load_acquire(const uint64_t* flag) const {
    uint64_t value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(flag) : "memory");
    return value;
  }
  __device__ void store_release(uint64_t* flag, uint64_t value) const {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
  }
  __device__ void fence() const { __threadfence_system(); }
  __device__ bool aborted(const DeviceError* error) const {
    return *static_cast<const volatile int32_t*>(&error->aborted) != 0;
  }
  __device__ void set_aborted(DeviceError* error) const { atomicExch(&error->aborted, 1); }
  __device__ void record(DeviceError* error, int32_t code, int32_t member, int64_t value,
                         int64_t limit) const {
    record_device_error(error, code, member, -1, -1, value, limit);
  }
  __device__ uint64_t now_ns() const {
    uint64_t ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    return ns;
  }
  __device__ void pause() const { __nanosleep(128); }
  __device__ void sync_block() const { __syncthreads(); }
  __device__ void sync_members(int32_t members) const { __syncwarp((1u << members) - 1u); }
};

__global__ void __launch_bounds__(kMaxPeers) barrier(const BarrierParams p) {
  __shared__ bool stop;
  SystemMemory memory;
  barrier_thread(p, static_cast<int32_t>(threadIdx.x), &stop, memory);
}

}  // namespace

cudaError_t barrier(const BarrierParams& params, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.num_members > 0 && params.num_members <= kMaxPeers);
  CCF_HOST_ASSERT(params.rank >= 0 && params.rank < params.num_members);
  barrier<<<1, kMaxPeers, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ccf::cuda
