// Checks, on the host, the CUDA handler above its launch sequence, which nothing else runs
// without a GPU: xla_ffi/cuda/moe_cuda.cc's MoeForwardImpl and MoeBackwardImpl (Prepare, Finish)
// with the device state and its fault record (cuda_device.cc), the peers (cuda_peers.cc: the real
// PeerGroup meetings, the regions across processes) and the launches (cuda_launch.cc), against
// stubs of the CUDA runtime, of the driver call it reaches, of the kernels' launchers and of
// XLA's scratch allocator (the XLA_FFI_Api table ScratchAllocator calls through). Every stubbed
// call can be made to fail; a device barrier records its epoch, whether it went out and whether
// the call's abort mark preceded it; copies and memsets move real bytes, so a fault travels from
// the kernels (a stubbed count_pairs or end barrier writes it into the record) to the handler as
// on a GPU. moe_cuda.cc's rule: once a device has taken its place in a group, every
// path either enqueues both its barriers or stops that GPU for good (MarkBroken). Checked, each
// call of a GPU's successful run failing in turn, on the GPUs' first call and on a later one:
//   - Groups of 2 and 4 GPUs in this process, each member's call on a thread of its own: the
//     failing call, then one more, on every member. The failing member's error names the
//     failure. Every member asks for both its barriers at the site's next two epochs, or none
//     does (cuda_peers.h); those after a failed launch carry the abort mark, no others. A member
//     whose launch failed (after its peers met; the fault record's copy after the launches is no
//     launch) is broken, no other; a broken member's next call fails with the first error in its
//     message, and so do its peers' (they cannot meet it); else every member's next call
//     succeeds at the next epochs. No call hangs (each runs under a bound of 50 peer timeouts).
//   - Emulated (D = 2) and one device: each failure returns its error, no barrier, and the GPU
//     is not broken: it takes the next call. A failed set-up of the GPU's state frees all it
//     made (the next call makes it afresh).
//   - Across processes (D = 2, rank 1 here, rank 0's region another process's): each failure
//     returns its error and either the call enqueued both barriers, counted in its region at the
//     next epochs, or the GPU is broken (a scratch failure too: Prepare's comment) and fails its
//     next call with the cause. A failure to read the fault record is reported as the record's
//     fault would be, and the call goes on.
//   - The fault record. A bad id is reported once, by the first call that reads the record's
//     copy, in its error whatever else stops that call ("; and before that: ", Prepare), or a
//     call later where that call's own poll or clear of the record failed; a group in this
//     process fails that call on every member, with no barrier; every call after it works.
//     Checked with each call of the reporting call failing in turn, and none. A barrier fault
//     breaks the GPU: its next calls fail with it, and so do its peers' in this process.
// Not modelled: the device barriers' protocol (tests/barrier_protocol.cu), stream order
// (tests/launch_order.cu), a copy of the fault record still in flight, and a member that starts
// its next call while its peers still wait in the last one. The driver's cuPointerGetAttribute
// is looked up once a process (a static no test can reset): that lookup never fails here.
// Prints each group of rounds, the counts and the number of errors; exits 1 on any.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <cuda.h>
#include <cuda_runtime.h>

#include "xla_ffi/cuda/cuda_device.cc"
#include "xla_ffi/cuda/cuda_launch.cc"
#include "xla_ffi/cuda/cuda_peers.cc"
#include "xla_ffi/moe_call.cc"
#include "xla_ffi/cuda/moe_cuda.cc"
#include "xla_ffi/peer_group.cc"
#include "xla_ffi/region_layout.cc"
#include "xla_ffi/shared_memory.cc"

// The XLA FFI's error, opaque to handlers: the allocator's.
struct XLA_FFI_Error {
  const char* message;
};

namespace {

using ccf::cuda::DeviceError;

constexpr cudaError_t kInjected = cudaErrorLaunchOutOfResources;
constexpr const char* kInjectedName = "cudaErrorLaunchOutOfResources";
constexpr const char* kNoScratch = "XLA's allocator gave no";
constexpr const char* kBroken = "cannot take part in fused_moe calls any more";
constexpr const char* kBadId = "expert_ids[1, 1] = 7 on device";  // the one planted
constexpr int64_t kTimeoutMs = 100;  // the peer timeout, which bounds each host meeting
constexpr int kSms = 16;
// Rounds at once, each on its own GPUs (kMaxPeers ordinals a lane) and group index: most of a
// round's time is a peer waiting out the timeout.
constexpr int kLanes = 8;
constexpr int64_t kTokens = 4, kHidden = 8, kFfn = 8, kTopK = 2;  // one expert a device

std::mutex report_mu;
int errors = 0;

void Fail(const std::string& where, const std::string& what) {
  std::lock_guard<std::mutex> lock(report_mu);
  if (errors++ < 40) std::printf("  %s: %s\n", where.c_str(), what.c_str());
}

// A device barrier the call asked for.
struct Asked {
  uint64_t epoch;
  bool end, enqueued, marked;  // marked: the call's abort mark went out before it
};

// One GPU this process runs: its operands and results, and what the stubs saw of its call under
// way.
struct Gpu {
  int ordinal = 0, rank = 0;
  XLA_FFI_Buffer *x, *ids, *weights, *w_in, *w_out, *workers, *bounds, *rank_op, *group_op;
  XLA_FFI_Buffer *dy, *hidden, *y, *staging, *dx, *d_weights, *dw_in, *dw_out;
  uint64_t* passed = nullptr;  // across processes: the count in its region
  std::deque<std::vector<char>> bytes;
  std::deque<std::vector<int64_t>> dims;
  std::deque<XLA_FFI_Buffer> buffers;

  int calls = 0, fail_at = -1;
  std::string cause;           // what the failing call's error says; empty: none failed
  bool scratch_asked = false;  // the call has asked XLA for its scratch
  bool early = false;          // the failing call came before that (the device, its record)
  bool copy_failed = false;    // the failing call was the fault record's copy
  size_t failed_after = 0;     // barriers asked for before the failure
  std::vector<Asked> barriers;
  uint64_t epochs = 0;  // the site's barriers asked for in earlier calls
  bool broken = false;  // as the checks found it after the last call
  int64_t held = 0;     // allocations, events and streams made and not yet freed or destroyed
  DeviceError plant{};  // a fault its kernels find in its next call

  // Zeros of 4-byte elements; a scalar holds `value`.
  XLA_FFI_Buffer* Take(XLA_FFI_DataType dtype, std::vector<int64_t> shape, int32_t value = 0) {
    int64_t count = 1;
    for (int64_t n : shape) count *= n;
    std::vector<char>& b = bytes.emplace_back(4 * count);
    std::memcpy(b.data(), &value, 4);
    std::vector<int64_t>& d = dims.emplace_back(std::move(shape));
    return &buffers.emplace_back(XLA_FFI_Buffer{sizeof(XLA_FFI_Buffer), nullptr, dtype, b.data(),
                                                static_cast<int64_t>(d.size()), d.data()});
  }
};

thread_local Gpu* self;  // the GPU whose handler this thread runs

// Whether this call of the handler's is the one made to fail; `cause` is what its error says.
bool Fails(const char* cause, bool copy = false) {
  if (self->calls++ != self->fail_at) return false;
  self->cause = cause;
  self->early = !self->scratch_asked;
  self->copy_failed = copy;
  self->failed_after = self->barriers.size();
  return true;
}

cudaError_t Runtime(bool copy = false) {
  return Fails(kInjectedName, copy) ? kInjected : cudaSuccess;
}

// GPU `ordinal`'s state, or null before a call made it.
ccf::DeviceState* StateOf(int ordinal) {
  std::lock_guard<std::mutex> lock(ccf::states_mu);
  auto it = ccf::States().find(ordinal);
  return it == ccf::States().end() ? nullptr : it->second.get();
}

bool IsBroken(const Gpu& g) {
  ccf::DeviceState* s = StateOf(g.ordinal);
  return s != nullptr && ccf::Broken(*s).failure();
}

CUresult PointerGetAttribute(void* data, CUpointer_attribute, CUdeviceptr) {
  if (Fails("cannot query device")) return CUDA_ERROR_INVALID_VALUE;
  *static_cast<int*>(data) = 1;  // memory from cuMemAlloc
  return CUDA_SUCCESS;
}

std::atomic<uintptr_t> handles{0x10000};  // events and streams

// A fresh event or stream, or null where the call is the one made to fail, as the runtime's.
template <typename Handle>
cudaError_t Create(Handle* made) {
  const cudaError_t st = Runtime();
  *made = st == cudaSuccess ? reinterpret_cast<Handle>(handles++) : nullptr;
  self->held += st == cudaSuccess;
  return st;
}

// XLA's scratch allocator.
XLA_FFI_Error out_of_memory{"out of memory"};

XLA_FFI_Error* Allocate(XLA_FFI_DeviceMemory_Allocate_Args* args) {
  self->scratch_asked = true;
  if (Fails(kNoScratch)) return &out_of_memory;
  args->data = std::malloc(args->size);
  return nullptr;
}

XLA_FFI_Error* Free(XLA_FFI_DeviceMemory_Free_Args* args) {
  std::free(args->data);
  return nullptr;
}

void ErrorMessage(XLA_FFI_Error_GetMessage_Args* args) { args->message = args->error->message; }
void DestroyError(XLA_FFI_Error_Destroy_Args*) {}

const XLA_FFI_Api* Api() {
  static const XLA_FFI_Api api = [] {
    XLA_FFI_Api a{};
    a.struct_size = sizeof(a);
    a.XLA_FFI_Error_GetMessage = ErrorMessage;
    a.XLA_FFI_Error_Destroy = DestroyError;
    a.XLA_FFI_DeviceMemory_Allocate = Allocate;
    a.XLA_FFI_DeviceMemory_Free = Free;
    return a;
  }();
  return &api;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The CUDA runtime calls the handler makes. Handles are distinct non-null values.

extern "C" {

cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return kInjectedName; }
const char* cudaGetErrorString(cudaError_t) { return "injected by the test"; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = kSms;
  return Runtime();
}

// What a failed call makes is null, as the runtime's is.
cudaError_t cudaMalloc(void** at, size_t bytes) {
  const cudaError_t st = Runtime();
  *at = st == cudaSuccess ? std::calloc(1, bytes) : nullptr;
  self->held += st == cudaSuccess;
  return st;
}

cudaError_t cudaHostAlloc(void** at, size_t bytes, unsigned int) { return cudaMalloc(at, bytes); }

cudaError_t cudaFree(void* at) {
  std::free(at);
  --self->held;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* at) { return cudaFree(at); }

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) { return Create(event); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) { return Create(stream); }

cudaError_t cudaEventDestroy(cudaEvent_t) {
  --self->held;
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t) {
  --self->held;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  return Runtime(event == StateOf(self->ordinal)->error_copied);
}

// Every copy has landed by the time anyone asks.
cudaError_t cudaEventQuery(cudaEvent_t) { return Runtime(); }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return Runtime(); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return Runtime(); }

cudaError_t cudaMemsetAsync(void* at, int value, size_t bytes, cudaStream_t) {
  if (Fails(kInjectedName)) return kInjected;
  std::memset(at, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, cudaMemcpyKind,
                            cudaStream_t) {
  if (Fails(kInjectedName, to == StateOf(self->ordinal)->error_host)) return kInjected;
  std::memcpy(to, from, bytes);
  return cudaSuccess;
}

cudaError_t cudaDeviceCanAccessPeer(int* can, int, int) {
  *can = 1;
  return Runtime();
}

cudaError_t cudaDeviceEnablePeerAccess(int, unsigned int) { return Runtime(); }

// Only a GPU's own workspace is asked about (ConnectIpc).
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* where, const void*) {
  where->device = self->ordinal;
  return Runtime();
}

cudaError_t cudaGetDriverEntryPointByVersion(const char*, void** fn, unsigned int,
                                             unsigned long long,
                                             cudaDriverEntryPointQueryResult* found) {
  *fn = reinterpret_cast<void*>(&PointerGetAttribute);
  *found = cudaDriverEntryPointSuccess;
  return cudaSuccess;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// The kernels' launchers: each a call that can fail. count_pairs records a planted bad id and the
// end barrier a planted barrier fault, as the kernels do (cuda/api.cuh's DeviceError).

namespace ccf::cuda {

bool grouped_gemms_available() { return false; }
int expert_gemm_tile_m(DType) { return 64; }
int expert_gemm_tile_n(DType) { return 64; }
int64_t grouped_gemm_workspace_bytes(int32_t, int) { return 4096; }

// A planted fault of `code`, written into the (clear) record as the kernel that finds it would.
void Record(DeviceError* error, int32_t code) {
  if (self->plant.code == code) *error = std::exchange(self->plant, {});
}

cudaError_t count_pairs(const Routing&, const WorkList&, DeviceError* error, cudaStream_t) {
  if (Fails(kInjectedName)) return kInjected;
  Record(error, kBadExpertId);
  return cudaSuccess;
}

cudaError_t barrier(const BarrierParams& b, cudaStream_t) {
  const uint64_t epoch = b.passed != nullptr ? *b.passed + 1 : b.epoch;
  const bool failed = Fails(kInjectedName);
  self->barriers.push_back({epoch, b.end != 0, !failed, b.error->aborted != 0});
  if (failed) return kInjected;
  if (b.passed != nullptr) *b.passed = epoch;
  if (b.end) Record(b.error, kBarrierTimeout);
  return cudaSuccess;
}

cudaError_t scan_counts(const Routing&, const WorkList&, cudaStream_t) { return Runtime(); }
cudaError_t fill_work_list(const Routing&, const WorkList&, cudaStream_t) { return Runtime(); }
cudaError_t assign_plan(const Routing&, const WorkList&, cudaStream_t) { return Runtime(); }
cudaError_t place_rows(const Routing&, const WorkList&, cudaStream_t) { return Runtime(); }
cudaError_t fetch_rows(const FetchParams&, cudaStream_t) { return Runtime(); }
cudaError_t expert_gemm(DType, Major, Major, const GemmParams&, int, cudaStream_t) {
  return Runtime();
}
cudaError_t grouped_gemm(DType, Major, const GemmParams&, void*, int, int, cudaStream_t) {
  return Runtime();
}
cudaError_t activation_pass(DType, const RowPass&, int, cudaStream_t) { return Runtime(); }
cudaError_t scatter_slots(DType, const ScatterParams&, cudaStream_t) { return Runtime(); }
cudaError_t combine_slots(DType, const CombineParams&, cudaStream_t) { return Runtime(); }
cudaError_t sum_partials(DType, const PartialSumParams&, cudaStream_t) { return Runtime(); }

}  // namespace ccf::cuda

// ---------------------------------------------------------------------------------------------
// The scenarios.

namespace {

enum class Mode { kOneDevice, kEmulated, kInProcess, kAcrossProcesses };

struct Group {
  const char* name;
  Mode mode;
  int devices;  // D
  bool barriers() const { return mode == Mode::kInProcess || mode == Mode::kAcrossProcesses; }
};

const Group kGroups[] = {
    {"one device", Mode::kOneDevice, 1},
    {"D=2 emulated", Mode::kEmulated, 2},
    {"D=2 in one process", Mode::kInProcess, 2},
    {"D=4 in one process", Mode::kInProcess, 4},
    {"D=2 across processes", Mode::kAcrossProcesses, 2},
};

using Errors = std::vector<xla::ffi::Error>;

bool Says(const xla::ffi::Error& e, const std::string& what) {
  return e.failure() && e.message().find(what) != std::string::npos;
}

std::atomic<uint64_t> next_site{1};

// Fresh GPUs on a lane, at a fresh call site (and across processes a fresh workspace chunk),
// with one call's operands each, as XLA hands them over.
class Scenario {
 public:
  Scenario(const Group& g, bool backward, int lane, std::string where);
  Gpu& gpu(size_t i) { return *gpus_[i]; }
  size_t size() const { return gpus_.size(); }
  // One call on every GPU, each on a thread of its own.
  Errors CallAll();
  // The checks of a call (file comment); `faulted`: the call a failure was injected into.
  void CheckCall(const Errors& errs, bool faulted);
  // After the faulted call: the next, held to what the faulted one left.
  void CheckNext(const Errors& faulted, const Errors& next);
  void Expect(bool ok, const std::string& what) {
    if (!ok) Fail(where_, what);
  }

 private:
  xla::ffi::Error Call(Gpu& g);

  const Group& g_;
  const bool backward_;
  const std::string where_;
  std::vector<std::unique_ptr<Gpu>> gpus_;
  std::vector<int32_t> devices_;
  std::vector<std::vector<char>> regions_;
  ccf::CallAttrs attrs_{};
};

Scenario::Scenario(const Group& g, bool backward, int lane, std::string where)
    : g_(g), backward_(backward), where_(std::move(where)) {
  const int first = lane * ccf::cuda::kMaxPeers;
  {
    std::lock_guard<std::mutex> lock(ccf::states_mu);
    for (int ordinal = first; ordinal < first + ccf::cuda::kMaxPeers; ++ordinal)
      ccf::States().erase(ordinal);
  }
  const uint64_t site = next_site++;
  const bool across = g.mode == Mode::kAcrossProcesses, emulated = g.mode == Mode::kEmulated;
  const int64_t d = g.devices, stack = emulated ? d : 1, slots = std::min<int64_t>(kTopK, d);
  for (int r = 0; r < d; ++r) devices_.push_back(first + r);
  const int32_t workspace = across ? static_cast<int32_t>(site) : -1;
  const auto relu = static_cast<int32_t>(ccf::Activation::kRelu);
  attrs_ = {site, g.devices, emulated, relu, kTimeoutMs, d, workspace, 0,
            xla::ffi::Span<const int32_t>(devices_), int64_t{1} << 30, -1, 0, 0};
  const int members = g.mode == Mode::kInProcess ? g.devices : 1;
  for (int m = 0; m < members; ++m) {
    Gpu& u = *gpus_.emplace_back(std::make_unique<Gpu>());
    u.rank = across ? 1 : m;
    u.ordinal = first + u.rank;
    const int64_t t = stack * kTokens;
    const XLA_FFI_DataType f32 = XLA_FFI_DataType_F32, s32 = XLA_FFI_DataType_S32;
    u.x = u.Take(f32, {t, kHidden});
    u.ids = u.Take(s32, {t, kTopK});
    u.weights = u.Take(f32, {t, kTopK});
    u.w_in = u.Take(f32, {stack, kHidden, kFfn});
    u.w_out = u.Take(f32, {stack, kFfn, kHidden});
    u.workers = u.Take(s32, {d, 1});
    u.bounds = u.Take(s32, {d, 2});
    // In this process the group index keeps the lanes' liveness apart (peer_group.cc).
    u.rank_op = u.Take(s32, {}, u.rank);
    u.group_op = u.Take(s32, {}, g.mode == Mode::kInProcess ? lane : 0);
    u.dy = u.Take(f32, {t, kHidden});
    u.hidden = u.Take(f32, {1, kFfn});
    u.y = u.Take(f32, {t, kHidden});
    u.staging = across ? u.Take(f32, {1, 1, 1}) : u.Take(f32, {t, slots, kHidden});
    u.dx = u.Take(f32, {t, kHidden});
    u.d_weights = u.Take(f32, {t, kTopK});
    u.dw_in = u.Take(f32, {stack, kHidden, kFfn});
    u.dw_out = u.Take(f32, {stack, kFfn, kHidden});
  }
  if (!across) return;
  // Both members' regions of the site: rank 1's in this process, rank 0's opened from another's.
  const ccf::IpcRegionLayout at =
      ccf::LayoutIpcRegion(kTokens, kHidden, kTopK, slots, 4, 4, backward);
  for (int r = 0; r < d; ++r) {
    std::vector<char>& region = regions_.emplace_back(at.bytes + ccf::cuda::kWorkspaceAlignment);
    char* base = region.data() + (-reinterpret_cast<uintptr_t>(region.data()) %
                                  ccf::cuda::kWorkspaceAlignment);
    const std::string err = ccf::RegisterSegment(devices_[r], attrs_.workspace,
                                                 {base, at.bytes, r == gpu(0).rank, nullptr});
    Expect(err.empty(), err);
    if (r == gpu(0).rank) gpu(0).passed = reinterpret_cast<uint64_t*>(base + at.passed);
  }
}

xla::ffi::Error Scenario::Call(Gpu& u) {
  namespace ffi = xla::ffi;
  using ffi::AnyBuffer;
  using Out = ffi::Result<AnyBuffer>;
  self = &u;
  u.calls = 0;
  u.cause.clear();
  u.scratch_asked = u.copy_failed = false;
  u.barriers.clear();
  ffi::DiagnosticEngine diagnostic;
  std::optional<ffi::ScratchAllocator> scratch =
      ffi::CtxDecoding<ffi::ScratchAllocator>::Decode(Api(), nullptr, diagnostic);
  const auto stream = reinterpret_cast<cudaStream_t>(uintptr_t{0x1000} + u.ordinal);
  const AnyBuffer x(u.x), weights(u.weights), w_in(u.w_in), w_out(u.w_out);
  const ffi::Buffer<ffi::S32> ids(u.ids);
  const ccf::PlanArray workers(u.workers), bounds(u.bounds);
  const ccf::ScalarS32 rank(u.rank_op), group(u.group_op);
  const ffi::Result<ccf::Staging> staging{ccf::Staging(u.staging)};
  ffi::Error err;
  if (backward_)
    err = ccf::MoeBackwardImpl(stream, u.ordinal, std::move(*scratch), x, ids, weights, w_in,
                               w_out, workers, bounds, AnyBuffer(u.dy), ccf::Hidden(u.hidden),
                               rank, group, attrs_, Out(AnyBuffer(u.dx)),
                               Out(AnyBuffer(u.d_weights)), Out(AnyBuffer(u.dw_in)),
                               Out(AnyBuffer(u.dw_out)), staging);
  else
    err = ccf::MoeForwardImpl(stream, u.ordinal, std::move(*scratch), x, ids, weights, w_in, w_out,
                              workers, bounds, rank, group, attrs_, Out(AnyBuffer(u.y)), staging,
                              ffi::Result<ccf::Hidden>(ccf::Hidden(u.hidden)));
  u.fail_at = -1;
  return err;
}

Errors Scenario::CallAll() {
  Errors errs(size());
  std::mutex mu;
  std::condition_variable cv;
  size_t done = 0;
  std::vector<std::thread> threads;
  for (size_t i = 0; i < size(); ++i)
    threads.emplace_back([&, i] {
      xla::ffi::Error err = Call(gpu(i));
      std::lock_guard<std::mutex> lock(mu);
      errs[i] = std::move(err);
      ++done;
      cv.notify_all();
    });
  {
    // Two host meetings at most, each bounded by the peer timeout; the rest takes microseconds.
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::milliseconds(50 * kTimeoutMs),
                     [&] { return done == size(); })) {
      Fail(where_, "a call still runs after 50 peer timeouts: it hangs");
      std::fflush(stdout);
      std::_Exit(1);
    }
  }
  for (std::thread& t : threads) t.join();
  return errs;
}

void Scenario::CheckCall(const Errors& errs, bool faulted) {
  const bool across = g_.mode == Mode::kAcrossProcesses;
  for (size_t i = 0; i < size(); ++i) {
    Gpu& u = gpu(i);
    const std::string who = "GPU " + std::to_string(u.ordinal) + " ";
    const bool failed = !u.cause.empty();
    // Where a bad id an earlier call found stops the call, it takes the failure's place
    // (ConnectPeers, Finish).
    if (failed)
      Expect(Says(errs[i], u.cause) || Says(errs[i], kBadId),
             who + "does not return its " + u.cause + " failure: " + errs[i].message());
    const std::vector<Asked>& b = u.barriers;
    // A failure once the call got past its peers (a launch, but for the fault record's copy,
    // after them), not one of the device's or its record's, which the call goes on past.
    const bool launch = failed && !b.empty() && !u.early && !u.copy_failed;
    if (!g_.barriers()) Expect(b.empty(), who + "asks for device barriers without peers");
    else if (!b.empty() || errs[i].success())
      Expect(b.size() == 2 && !b[0].end && b[1].end,
             who + "asks for " + std::to_string(b.size()) + " barriers, not a start and an end");
    if (g_.mode == Mode::kInProcess)
      Expect(b.size() == gpu(0).barriers.size(),
             who + "asks for " + std::to_string(b.size()) + " barriers, GPU " +
                 std::to_string(gpu(0).ordinal) + " for " +
                 std::to_string(gpu(0).barriers.size()) + ": every member or none (cuda_peers.h)");
    // The site's count goes on from the last call's; across processes it is the region's, which
    // only an enqueued barrier raises.
    uint64_t epoch = u.epochs;
    for (size_t n = 0; n < b.size(); ++n) {
      const bool after = launch && n >= u.failed_after;
      Expect(b[n].epoch == epoch + 1, who + "asks for a barrier at epoch " +
                                          std::to_string(b[n].epoch) + ", not the site's next (" +
                                          std::to_string(epoch + 1) + ")");
      epoch += !across || b[n].enqueued;
      Expect(b[n].enqueued || after, who + "leaves out a barrier without a failed launch");
      if (b[n].enqueued)
        Expect(b[n].marked == after, who + (after ? "enqueues a barrier after its failure "
                                                    "without the abort mark"
                                                  : "marks a barrier aborted without a failure"));
    }
    u.epochs = epoch;
    // A set-up that failed and left no state (the next call tries again) frees what it made.
    if (StateOf(u.ordinal) == nullptr)
      Expect(u.held == 0, who + "has no state after its failed set-up but holds " +
                              std::to_string(u.held) + " of its allocations, events and streams");
    // Broken: a real group's GPU whose launch failed (Finish), and across processes one that
    // left out its barriers.
    const bool broken =
        u.broken || (faulted && g_.barriers() && (launch || (across && failed && b.empty())));
    u.broken = IsBroken(u);
    if (broken == u.broken) continue;
    const char* why = !broken    ? "is broken"
                      : b.empty() ? "asked for no barrier and is not broken: its peers in other "
                                    "processes pair its next call with this one"
                                  : "is not broken after its failed launch";
    Fail(where_, who + why + " (" + errs[i].message() + ")");
  }
}

void Scenario::CheckNext(const Errors& faulted, const Errors& next) {
  bool any = false;
  for (size_t i = 0; i < size(); ++i) any |= IsBroken(gpu(i));
  for (size_t i = 0; i < size(); ++i) {
    Gpu& u = gpu(i);
    const std::string who = "GPU " + std::to_string(u.ordinal) + " ";
    if (IsBroken(u)) {
      Expect(Says(next[i], kBroken) && Says(next[i], faulted[i].message()),
             who + "is broken but its next call does not fail with the cause: " +
                 next[i].message());
      Expect(u.barriers.empty(), who + "is broken but asks for barriers");
    } else if (any) {
      Expect(next[i].failure() && u.barriers.empty(),
             who + "goes on past a broken peer: " + next[i].message());
    } else {
      Expect(next[i].success(), who + "fails the call after: " + next[i].message());
    }
  }
}

// Each member's calls in a successful run of (`g`, `backward`) on fresh GPUs: the first call
// with `warm` false, else the second.
std::vector<int> CleanCalls(const Group& g, bool backward, bool warm, const std::string& where) {
  Scenario s(g, backward, 0, where + ", no failure");
  for (int call = 0; call <= warm; ++call) {
    const Errors errs = s.CallAll();
    s.CheckCall(errs, false);
    for (size_t i = 0; i < s.size(); ++i) s.Expect(errs[i].success(), errs[i].message());
  }
  std::vector<int> calls;
  for (size_t i = 0; i < s.size(); ++i) calls.push_back(s.gpu(i).calls);
  return calls;
}

// Runs `rounds`, kLanes at a time.
void RunRounds(const std::vector<std::function<void(int)>>& rounds) {
  std::atomic<size_t> next{0};
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < kLanes; ++lane)
    lanes.emplace_back([&, lane] {
      for (size_t i; (i = next++) < rounds.size();) rounds[i](lane);
    });
  for (std::thread& t : lanes) t.join();
}

// Each call of each member's run failing in turn: that call, then one more.
int64_t EachFailure(const Group& g, bool backward, bool warm, const std::string& where) {
  const std::vector<int> calls = CleanCalls(g, backward, warm, where);
  std::vector<std::function<void(int)>> rounds;
  for (size_t m = 0; m < calls.size(); ++m)
    for (int n = 0; n < calls[m]; ++n)
      rounds.push_back([&, m, n](int lane) {
        Scenario s(g, backward, lane, where + "; GPU " + std::to_string(m) + "'s call " +
                                          std::to_string(n) + " fails");
        if (warm) s.CheckCall(s.CallAll(), false);
        s.gpu(m).fail_at = n;
        const Errors faulted = s.CallAll();
        s.CheckCall(faulted, true);
        const Errors next = s.CallAll();
        s.CheckCall(next, false);
        s.CheckNext(faulted, next);
      });
  RunRounds(rounds);
  return static_cast<int64_t>(rounds.size());
}

// The fault record: a bad id, then each call of the call that reads it failing in turn (and
// none); a barrier fault.
int64_t FaultRecord(const Group& g, bool backward, const std::string& where) {
  // Returns the reporting call's calls on the GPU that found it (fail_at -1: none fails).
  const auto bad_id = [&](int fail_at, int lane) {
    const std::string then =
        fail_at < 0 ? "no failure" : "call " + std::to_string(fail_at) + " failing";
    Scenario s(g, backward, lane, where + ", a bad id, then " + then);
    s.gpu(0).plant = {ccf::cuda::kBadExpertId, s.gpu(0).rank, 1, 1, 0, 0, 7, 4};
    s.CheckCall(s.CallAll(), false);
    s.gpu(0).fail_at = fail_at;
    const Errors reporting = s.CallAll();
    const int calls = s.gpu(0).calls;
    // No barrier: a group in this process fails it at its host meeting.
    if (g.mode == Mode::kInProcess)
      for (size_t i = 0; i < s.size(); ++i)
        s.Expect(s.gpu(i).barriers.empty(), "a member asks for barriers past a bad id");
    s.CheckCall(reporting, fail_at >= 0);
    if (fail_at < 0 && g.mode == Mode::kInProcess)
      for (size_t i = 0; i < s.size(); ++i)
        s.Expect(Says(reporting[i], kBadId), "a member does not fail with the bad id");
    if (s.gpu(0).cause == kNoScratch)
      s.Expect(Says(reporting[0], kNoScratch) && Says(reporting[0], kBadId),
               "the scratch's failure does not carry the bad id: " + reporting[0].message());
    // A failure may keep it back a call (its record's poll or clear failing), not more.
    int reported = Says(reporting[0], kBadId);
    for (int call = 0; call < 3; ++call) {
      const bool after = reported > 0;
      const Errors later = s.CallAll();
      reported += Says(later[0], kBadId);
      if (after && !IsBroken(s.gpu(0)))
        for (size_t i = 0; i < s.size(); ++i)
          s.Expect(later[i].success(), "fails after the bad id's report: " + later[i].message());
    }
    s.Expect(reported == 1, "the bad id is reported " + std::to_string(reported) +
                                " times, not once (the reporting call: " +
                                reporting[0].message() + ")");
    return calls;
  };
  const int calls = bad_id(-1, 0);
  std::vector<std::function<void(int)>> rounds;
  for (int n = 0; n < calls; ++n) rounds.push_back([&, n](int lane) { bad_id(n, lane); });
  RunRounds(rounds);
  if (g.barriers()) {
    Scenario s(g, backward, 0, where + ", a barrier fault");
    s.gpu(0).plant = {ccf::cuda::kBarrierTimeout, 0, 0, 0, /*aborted=*/1, 0, 5, 6};
    s.CheckCall(s.CallAll(), false);
    const std::string cause = "a device-side barrier timed out";
    for (int call = 0; call < 2; ++call) {
      const Errors errs = s.CallAll();
      s.Expect(Says(errs[0], cause) && IsBroken(s.gpu(0)),
               "a barrier fault does not break the GPU: " + errs[0].message());
      for (size_t i = 0; i < s.size(); ++i)
        s.Expect(errs[i].failure() && s.gpu(i).barriers.empty(), "goes on past a barrier fault");
    }
  }
  return calls;
}

}  // namespace

int main() {
  unsetenv("JAX_CCFUSER_SOURCE_PHASES");  // the shape decides: one phase
  int64_t total = 0;
  const auto verdict = [&](const std::string& where, const std::function<int64_t()>& run) {
    const int before = errors;
    const int64_t injected = run();
    total += injected;
    if (errors == before)
      std::printf("%s: %lld failures injected: ok\n", where.c_str(),
                  static_cast<long long>(injected));
  };
  for (const Group& g : kGroups)
    for (bool backward : {false, true}) {
      const std::string name = std::string(g.name) + (backward ? ", backward" : ", forward");
      for (bool warm : {false, true}) {
        const std::string where = name + (warm ? ", a later call" : ", the first call");
        verdict(where, [&] { return EachFailure(g, backward, warm, where); });
      }
      verdict(name + ", the fault record", [&] { return FaultRecord(g, backward, name); });
    }
  std::printf("failures injected: %lld\n", static_cast<long long>(total));
  std::printf("errors: %d\n", errors);
  return errors == 0 ? 0 : 1;
}
