// The device-side barrier between the GPUs of an expert-parallel group.
//
// Each GPU owns a signal buffer of kMaxDevices uint64 flags, one per possible writer (indexed by
// the writer's device ordinal, so groups that share a GPU never share a flag). The value a
// device writes into a peer's flag is the number of barriers the two have passed together; it
// only rises, so a flag left by an earlier barrier can never satisfy a later one, and a fast
// peer that already moved on has only raised it further. The host never waits: the kernel spins
// (acquire) on the device.
//
// Peers in other processes (CUDA IPC workspaces) have no common ordinals and no host-side count
// to share, so their flags live in each member's region of the call site, one per rank, and the
// count of barriers passed at the site lives there too, raised by this kernel: the regions start
// zeroed and every member passes the same barriers at a site.
#include "cuda/api.cuh"
#include "cuda/exception.cuh"

namespace ccf::cuda {
namespace {

__device__ __forceinline__ void store_release_system(uint64_t* flag, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_system(const uint64_t* flag) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(flag) : "memory");
  return value;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

}  // namespace

// One block; thread i signals member i and waits for member i's signal.
__global__ void __launch_bounds__(kMaxPeers) barrier(const BarrierParams p) {
  const int32_t i = threadIdx.x;
  if (i == 0 && p.rank_value != nullptr) {
    if (*p.rank_value != p.rank) {
      record_device_error(p.error, kRankMismatch, p.rank, -1, -1, *p.rank_value, p.rank);
    } else if (*p.group_value != p.expected_group) {
      record_device_error(p.error, kRankMismatch, p.rank, -1, -1, *p.group_value, p.expected_group);
    }
  }
  // Every thread reads the count before thread 0 raises it.
  const uint64_t epoch =
      p.passed != nullptr ? *p.passed + 1 : (i < p.num_members ? p.epochs[i] : 0);
  __syncthreads();
  if (i == 0 && p.passed != nullptr) *p.passed = epoch;
  if (i >= p.num_members) return;

  // Everything this device wrote before (earlier kernels on the stream, peer memory included)
  // becomes visible system-wide before the flag does.
  __threadfence_system();
  store_release_system(p.signals[i] + p.slots[p.rank], epoch);

  const uint64_t* flag = p.signals[p.rank] + p.slots[i];
  const uint64_t start = global_timer_ns();
  uint64_t seen;
  while ((seen = load_acquire_system(flag)) < epoch) {
    if (global_timer_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
      record_device_error(p.error, kBarrierTimeout, i, -1, -1, static_cast<int64_t>(seen),
                          static_cast<int64_t>(epoch));
      return;
    }
    __nanosleep(128);
  }
}

cudaError_t barrier(const BarrierParams& params, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.num_members > 0 && params.num_members <= kMaxPeers);
  CCF_HOST_ASSERT(params.rank >= 0 && params.rank < params.num_members);
  barrier<<<1, kMaxPeers, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ccf::cuda
