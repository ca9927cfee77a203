#include "xla_ffi/cuda/cuda_device.h"

#include <cuda.h>  // CUpointer_attribute: the driver call is reached through the runtime

#include <cstddef>
#include <cstdlib>
#include <string>
#include <utility>

namespace ffi = xla::ffi;

namespace ccf {

ffi::Error Unimplemented(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "jax_ccfuser (CUDA): " + msg);
}

ffi::Error CudaFailure(const std::string& what, cudaError_t status) {
  return ffi::Error::Internal("jax_ccfuser: " + what + " failed: " + cudaGetErrorName(status) +
                              " (" + cudaGetErrorString(status) + ")");
}

namespace {

std::mutex states_mu;
std::map<int, std::unique_ptr<DeviceState>>& States() {
  static auto* states = new std::map<int, std::unique_ptr<DeviceState>>;
  return *states;
}

// Makes the state of GPU `ordinal` into `*out`; where that fails, `*out` holds what was made.
ffi::Error CreateDeviceState(int ordinal, cudaStream_t stream, std::unique_ptr<DeviceState>* out) {
  if (ordinal < 0 || ordinal >= cuda::kMaxDevices)
    return Unimplemented("device ordinal " + std::to_string(ordinal) + " is beyond the " +
                         std::to_string(cuda::kMaxDevices) + " GPUs this process keeps state for");
  *out = std::make_unique<DeviceState>();
  DeviceState* s = out->get();
  s->ordinal = ordinal;
  cudaError_t st = cudaDeviceGetAttribute(&s->num_sms, cudaDevAttrMultiProcessorCount, ordinal);
  if (st == cudaSuccess) st = cudaMalloc(&s->error, sizeof(cuda::DeviceError));
  if (st == cudaSuccess)
    st = cudaHostAlloc(&s->error_host, sizeof(cuda::DeviceError), cudaHostAllocDefault);
  if (st == cudaSuccess) st = cudaEventCreateWithFlags(&s->error_copied, cudaEventDisableTiming);
  if (st == cudaSuccess) st = cudaStreamCreateWithFlags(&s->side, cudaStreamNonBlocking);
  for (cudaEvent_t& event : s->fetched)
    if (st == cudaSuccess) st = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
  // The record must read clear before this GPU's first kernel: stream order sees to that.
  if (st == cudaSuccess) st = cudaMemsetAsync(s->error, 0, sizeof(cuda::DeviceError), stream);
  if (st != cudaSuccess) return CudaFailure("setting up GPU " + std::to_string(ordinal), st);
  s->grouped_gemms = GroupedGemms();
  *s->error_host = {};
  return ffi::Error::Success();
}

// Frees what a failed set-up made, so that the next call's set-up, which starts afresh, leaks
// nothing; nothing of it is in flight (the set-up's one enqueued step is its last).
void ReleaseDeviceState(DeviceState& s) {
  if (s.error) cudaFree(s.error);
  if (s.error_host) cudaFreeHost(s.error_host);
  if (s.error_copied) cudaEventDestroy(s.error_copied);
  if (s.side) cudaStreamDestroy(s.side);
  for (cudaEvent_t event : s.fetched)
    if (event) cudaEventDestroy(event);
  cudaGetLastError();  // the set-up's failure is reported; a failed release adds nothing to it
}

}  // namespace

bool GroupedGemms() {
  const char* env = std::getenv("JAX_CCFUSER_GROUPED_GEMMS");
  return cuda::grouped_gemms_available() && !(env != nullptr && std::string(env) == "0");
}

namespace {

std::string DescribeDeviceError(const cuda::DeviceError& e, int ordinal) {
  const std::string where = " (found on GPU " + std::to_string(ordinal) +
                            " by an earlier fused_moe call: the CUDA path reports faults found on "
                            "the device from a later call on that GPU, once the faulty call's "
                            "work has finished)";
  const std::string peer = "rank " + std::to_string(e.source);
  switch (e.code) {
    case cuda::kBadExpertId:
      return "expert_ids[" + std::to_string(e.token) + ", " + std::to_string(e.k) + "] = " +
             std::to_string(e.value) + " on device " + std::to_string(e.source) +
             " is outside [0, " + std::to_string(e.limit) + ")" + where +
             "; that call's outputs for the token are NaN";
    case cuda::kBarrierTimeout:
      return "a device-side barrier timed out waiting for " + peer + " (its flag " +
             std::to_string(e.value) + " never reached " + std::to_string(e.limit) + ")" + where;
    case cuda::kRankMismatch:
      return "the rank/group operand changed to " + std::to_string(e.value) + " but was " +
             std::to_string(e.limit) + " when this call site first ran" + where;
    case cuda::kOutOfStep:
      return "a device-side barrier found " + peer + " out of step (its flag " +
             (e.value == static_cast<int64_t>(cuda::kAbortFlag)
                  ? std::string("says it gave up an earlier call")
                  : std::to_string(e.value) + " is more than one barrier past " +
                        std::to_string(e.limit)) +
             ")" + where;
    case cuda::kShapeMismatch:
      return peer + " traced this call site with other shapes or dtypes (signature " +
             std::to_string(e.value) + " against " + std::to_string(e.limit) + ")" + where;
    default:
      return "unknown device fault code " + std::to_string(e.code) + where;
  }
}

}  // namespace

ffi::Error GetDeviceState(int ordinal, cudaStream_t stream, bool broken_if_failed,
                          DeviceState** out) {
  // The registry lock is not held while the device is set up (XLA runs one GPU's calls one after
  // another, so only one thread makes it).
  {
    std::lock_guard<std::mutex> lock(states_mu);
    auto it = States().find(ordinal);
    if (it != States().end()) {
      *out = it->second.get();
      return ffi::Error::Success();
    }
  }
  std::unique_ptr<DeviceState> made;
  ffi::Error err = CreateDeviceState(ordinal, stream, &made);
  if (err.failure()) {
    if (!made) return err;
    if (!broken_if_failed) {
      ReleaseDeviceState(*made);
      return err;
    }
    made->broken = err.message();
  }
  std::lock_guard<std::mutex> lock(states_mu);
  std::unique_ptr<DeviceState>& slot = States()[ordinal];
  if (!slot) slot = std::move(made);
  *out = slot.get();
  return err;
}

ffi::Error Broken(DeviceState& s) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.broken.empty()) return ffi::Error::Success();
  return ffi::Error::Internal("jax_ccfuser: GPU " + std::to_string(s.ordinal) +
                              " cannot take part in fused_moe calls any more: " + s.broken +
                              ". The device barriers of its expert-parallel group cannot be "
                              "brought back in step; restart the process");
}

void MarkBroken(DeviceState& s, const std::string& why) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.broken.empty()) s.broken = why;
}

ffi::Error TakeDeviceError(DeviceState& s, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.error_copy_pending) return ffi::Error::Success();
  const cudaError_t st = cudaEventQuery(s.error_copied);
  if (st == cudaErrorNotReady) {
    cudaGetLastError();  // not a failure
    return ffi::Error::Success();
  }
  if (st != cudaSuccess) return CudaFailure("polling the device fault record", st);
  s.error_copy_pending = false;
  const cuda::DeviceError e = *s.error_host;
  if (e.code == cuda::kDeviceOk && !e.aborted) return ffi::Error::Success();
  const std::string msg = DescribeDeviceError(e, s.ordinal);
  if (e.aborted) {
    // The record stays set on the device: no kernel of this GPU runs again. A barrier records
    // its fault only where the record held none: after a bad id it keeps that one, and after
    // the bad id's clear (which leaves `aborted`) none at all.
    s.broken = e.code == cuda::kBadExpertId
                   ? "a device barrier gave a call up (the first fault recorded: " + msg + ")"
               : e.code == cuda::kDeviceOk
                   ? "a device barrier gave a call up (its cause was not recorded: the record "
                     "held a bad expert id when it failed)"
                   : msg;
    return ffi::Error::Internal("jax_ccfuser: " + s.broken);
  }
  *s.error_host = {};
  // Clears the bad id only: a barrier of a call enqueued since may have set `aborted`, which
  // must survive until it is reported.
  if (cudaError_t clear = cudaMemsetAsync(s.error, 0, offsetof(cuda::DeviceError, aborted),
                                          stream);
      clear != cudaSuccess)
    return CudaFailure("clearing the device fault record", clear);
  return InvalidArgument(msg);
}

ffi::Error ScheduleErrorCopy(DeviceState& s, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.error_copy_pending) return ffi::Error::Success();
  cudaError_t st = cudaMemcpyAsync(s.error_host, s.error, sizeof(cuda::DeviceError),
                                   cudaMemcpyDeviceToHost, stream);
  if (st == cudaSuccess) st = cudaEventRecord(s.error_copied, stream);
  if (st != cudaSuccess) return CudaFailure("copying the device fault record", st);
  s.error_copy_pending = true;
  return ffi::Error::Success();
}

ffi::Error Place(DeviceState& s, uint64_t site, const ScalarS32& rank, const ScalarS32& group,
                 int num_devices, bool own_signals, cudaStream_t stream, SitePlace** out) {
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.sites.find(site);
    if (it != s.sites.end()) {
      *out = &it->second;
      return ffi::Error::Success();
    }
  }
  SitePlace place;
  int32_t values[2];
  cudaError_t st = cudaMemcpyAsync(&values[0], rank.typed_data(), sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream);
  if (st == cudaSuccess)
    st = cudaMemcpyAsync(&values[1], group.typed_data(), sizeof(int32_t), cudaMemcpyDeviceToHost,
                         stream);
  const size_t flag_bytes = sizeof(uint64_t) * cuda::kMaxPeers;
  if (own_signals) {
    if (st == cudaSuccess) st = cudaMalloc(&place.signals, flag_bytes);
    if (st == cudaSuccess) st = cudaMemsetAsync(place.signals, 0, flag_bytes, stream);
  }
  // Peers write the flags as soon as this GPU has published them: zeroed before that.
  if (st == cudaSuccess) st = cudaStreamSynchronize(stream);
  if (st != cudaSuccess) {
    if (place.signals) cudaFree(place.signals);
    return CudaFailure("reading the rank and group operands", st);
  }
  if (values[0] < 0 || values[0] >= num_devices) {
    if (place.signals) cudaFree(place.signals);
    return InvalidArgument("rank " + std::to_string(values[0]) + " outside the group of " +
                           std::to_string(num_devices) + " devices");
  }
  place.rank = values[0];
  place.group = values[1];
  std::lock_guard<std::mutex> lock(s.mu);
  *out = &s.sites.emplace(site, place).first->second;
  return ffi::Error::Success();
}

uint64_t NextBarrier(DeviceState& s, SitePlace& place) {
  std::lock_guard<std::mutex> lock(s.mu);
  return ++place.barriers;
}

ffi::Error EnablePeerAccess(DeviceState& me, int peer) {
  if (peer < 0 || peer >= cuda::kMaxDevices)
    return Unimplemented("GPU " + std::to_string(peer) + " is beyond the " +
                         std::to_string(cuda::kMaxDevices) + " GPUs peer access is tracked for");
  std::lock_guard<std::mutex> lock(me.mu);
  if (peer == me.ordinal || me.peer_access[peer]) return ffi::Error::Success();
  int can = 0;
  cudaError_t st = cudaDeviceCanAccessPeer(&can, me.ordinal, peer);
  if (st != cudaSuccess) return CudaFailure("querying peer access", st);
  if (!can)
    return Unimplemented("GPU " + std::to_string(me.ordinal) + " cannot access GPU " +
                         std::to_string(peer) + "'s memory (no peer-to-peer path)");
  // XLA runs the handler with this GPU current, which is the device the call enables access from.
  st = cudaDeviceEnablePeerAccess(peer, 0);
  if (st == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // XLA enabled it already
  } else if (st != cudaSuccess) {
    return CudaFailure("enabling peer access to GPU " + std::to_string(peer), st);
  }
  me.peer_access[peer] = true;
  return ffi::Error::Success();
}

ffi::Error CheckPeerMemory(const void* ptr, int dev, const char* what) {
  using GetAttribute = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);
  static const GetAttribute get_attribute = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<GetAttribute>(fn);
  }();
  if (get_attribute == nullptr)
    return ffi::Error::Internal("jax_ccfuser: the CUDA driver has no cuPointerGetAttribute");
  int legacy = 0;
  if (get_attribute(&legacy, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                    reinterpret_cast<CUdeviceptr>(ptr)) != CUDA_SUCCESS)
    return ffi::Error::Internal(std::string("jax_ccfuser: cannot query device ") +
                                std::to_string(dev) + "'s " + what + " buffer");
  if (!legacy)
    return Unimplemented(std::string("device ") + std::to_string(dev) + "'s " + what +
                         " buffer comes from a memory pool or the virtual memory API, which "
                         "peer GPUs cannot read through peer access; run with XLA's default "
                         "allocator (unset XLA_PYTHON_CLIENT_ALLOCATOR, or set it to "
                         "'default' or 'platform')");
  return ffi::Error::Success();
}

}  // namespace ccf
