// The device-side barrier between the GPUs of an expert-parallel group.
//
// Each member of a call site owns kMaxPeers uint64 flags for the site, one per writer rank. The
// value a device writes into a peer's flag is the number of barriers passed at the site; it only
// rises, so a flag left by an earlier barrier can never satisfy a later one, and a fast peer that
// already moved on has only raised it by one. The host never waits: the kernel spins (acquire)
// on the device.
//
// Peers in other processes (CUDA IPC workspaces) have no host-side count to share, so the count
// of barriers passed at the site lives in each member's region beside its flags, raised by this
// kernel: the regions start zeroed and every member passes the same barriers at a site.
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

__device__ __forceinline__ bool is_aborted(const DeviceError* error) {
  return *static_cast<const volatile int32_t*>(&error->aborted) != 0;
}

// Gives the call up: the later kernels of this device leave peer memory alone (they read
// `aborted`), and every member's next barrier with this device fails instead of passing.
__device__ void abort_group(const BarrierParams& p) {
  atomicExch(&p.error->aborted, 1);
  __threadfence_system();
  for (int32_t m = 0; m < p.num_members; ++m)
    store_release_system(p.signals[m] + p.rank, kAbortFlag);
}

}  // namespace

// One block; thread i signals member i and waits for member i's signal.
__global__ void __launch_bounds__(kMaxPeers) barrier(const BarrierParams p) {
  const int32_t i = threadIdx.x;
  __shared__ bool stop;
  if (i == 0) {
    // This call (or an earlier one) gave up: flags are per site, so this site's members learn
    // it here, at once, rather than after a timeout.
    stop = is_aborted(p.error);
    if (stop) abort_group(p);
    if (!stop && p.rank_value != nullptr) {
      if (*p.rank_value != p.rank) {
        record_device_error(p.error, kRankMismatch, p.rank, -1, -1, *p.rank_value, p.rank);
        stop = true;
      } else if (*p.group_value != p.expected_group) {
        record_device_error(p.error, kRankMismatch, p.rank, -1, -1, *p.group_value,
                            p.expected_group);
        stop = true;
      }
      if (stop) abort_group(p);
    }
    if (!stop && p.signatures[p.rank] != nullptr) *p.signatures[p.rank] = p.signature;
  }
  // Every thread reads the count before thread 0 raises it.
  const uint64_t epoch =
      p.passed != nullptr ? *p.passed + 1 : p.epoch;
  __syncthreads();
  if (stop) return;
  if (i == 0 && p.passed != nullptr) *p.passed = epoch;
  if (i >= p.num_members) return;

  // Everything this device wrote before (earlier kernels on the stream, peer memory included,
  // and its signature) becomes visible system-wide before the flag does.
  __threadfence_system();
  store_release_system(p.signals[i] + p.rank, epoch);
  // Every epoch is stored before any thread may store kAbortFlag over them (abort_group), so an
  // abort is never overwritten by an epoch.
  __syncwarp((1u << p.num_members) - 1u);

  const uint64_t* flag = p.signals[p.rank] + i;
  const uint64_t start = global_timer_ns();
  uint64_t seen;
  while ((seen = load_acquire_system(flag)) < epoch) {
    if (is_aborted(p.error)) return;  // another member's wait failed
    if (global_timer_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
      record_device_error(p.error, kBarrierTimeout, i, -1, -1, static_cast<int64_t>(seen),
                          static_cast<int64_t>(epoch));
      abort_group(p);
      return;
    }
    __nanosleep(128);
  }
  if (seen > epoch + 1) {  // kAbortFlag included
    record_device_error(p.error, kOutOfStep, i, -1, -1, static_cast<int64_t>(seen),
                        static_cast<int64_t>(epoch));
    abort_group(p);
    return;
  }
  if (p.signatures[i] != nullptr) {
    const uint64_t theirs = *static_cast<const volatile uint64_t*>(p.signatures[i]);
    if (theirs != p.signature) {
      record_device_error(p.error, kShapeMismatch, i, -1, -1, static_cast<int64_t>(theirs),
                          static_cast<int64_t>(p.signature));
      abort_group(p);
    }
  }
}

cudaError_t barrier(const BarrierParams& params, cudaStream_t stream) {
  CCF_HOST_ASSERT(params.num_members > 0 && params.num_members <= kMaxPeers);
  CCF_HOST_ASSERT(params.rank >= 0 && params.rank < params.num_members);
  barrier<<<1, kMaxPeers, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ccf::cuda
