// The fused MoE on NVIDIA GPUs: XLA FFI handlers "ccf_moe_fwd" / "ccf_moe_bwd" for platform
// CUDA, with the same operands and attributes as the CPU handlers (moe_cpu.cc).
//
// A call on each GPU of the expert-parallel group, top to bottom:
//   decode   the operands and check them against the contract and the kernels' limits;
//   device   this GPU's state, and a fault an earlier call recorded (cuda_device.h);
//   scratch  from XLA's allocator, stream-ordered, before anything is published;
//   connect  to the peers: emulated, in this process (two host meetings) or in other processes
//            (the IPC regions), which fills the peer table (cuda_peers.h);
//   launch   on XLA's stream: a device barrier (the peers' inputs are ready),
//            the work list built on the device from every peer's expert_ids (and split by a
//            reassignment plan, cuda/api.cuh), the fetch of each needed row straight out
//            of its source's memory (once), the grouped GEMMs, the scatter of partial sums
//            into the sources' staging, a second device barrier, the sum of its own slots
//            (cuda_launch.h; the kernels are described in cuda/api.cuh). With residuals="hidden"
//            GEMM1 also keeps the float32 h of this device's first C pairs in its `hidden`
//            result, and the backward reads it there instead of recomputing it.
// The host never waits for the device on this path. Once a device has taken its place in a
// group, every path either enqueues both its barriers or stops that GPU for good (MarkBroken),
// so the members' barrier counts never fall out of step silently.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <cuda_runtime.h>

#include "cuda/api.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/cuda/cuda_device.h"
#include "xla_ffi/cuda/cuda_launch.h"
#include "xla_ffi/cuda/cuda_peers.h"
#include "xla_ffi/moe_call.h"
#include "xla_ffi/moe_dims.h"

namespace ffi = xla::ffi;

namespace ccf {
namespace {

using NamedOperands = std::initializer_list<std::pair<const char*, const void*>>;

// The first operand that does not start on 16 bytes, as the tiles' 16-byte vectors need, or
// null.
const char* Misaligned(NamedOperands operands) {
  for (const auto& [name, data] : operands)
    if (!cuda::aligned_to(data, 16)) return name;
  return nullptr;
}

// What the CUDA kernels support beyond the contract's checks.
ffi::Error CheckCudaLimits(const MoeDims& d, const CallAttrs& attrs, const PlanArray& workers,
                           const PlanArray& bounds, NamedOperands vectors) {
  if (ffi::Error err = CheckPlanShape(workers, bounds, d); err.failure()) return err;
  const auto w = workers.dimensions();
  // The plan lives on the device: its helper slots are what the host can see of its helpers.
  const bool planned = w[1] > 1;
  if (planned && InWorkspace(attrs, d))
    return Unimplemented("reassignment plans with helper slots (workers " + ShapeString(workers) +
                         ") across processes are not implemented on GPU; call fused_moe with "
                         "plan=None there");
  if (d.num_devices > cuda::kMaxPeers)
    return Unimplemented("expert-parallel groups of up to " + std::to_string(cuda::kMaxPeers) +
                         " devices; got " + std::to_string(d.num_devices));
  const int64_t here = ExpertsHere(attrs, d, planned);
  if (here * w[1] > cuda::kMaxExpertsHere)
    return Unimplemented(std::to_string(here) + " experts in one work list (with " +
                         std::to_string(w[1]) + " plan slots each); at most " +
                         std::to_string(cuda::kMaxExpertsHere) + " (experts x slots)");
  // The work-list kernels index pairs in int32 chunk by chunk (the last chunk must not wrap),
  // and scratch rows (each group padded to whole M-tiles of at most 128 rows) in int32 too.
  const int64_t pairs = d.num_devices * d.tokens * d.k;
  constexpr int64_t kMaxPairs = INT32_MAX - cuda::kPairsPerChunk - cuda::kMaxExpertsHere * 128;
  if (d.k > cuda::kMaxTopK)
    return Unimplemented("K = " + std::to_string(d.k) + " routing choices per token; at most " +
                         std::to_string(cuda::kMaxTopK) + " on GPU");
  if (pairs > kMaxPairs || d.hidden > INT32_MAX || d.gate_ffn > INT32_MAX)
    return Unimplemented("D * T * K = " + std::to_string(pairs) + " pairs (at most " +
                         std::to_string(kMaxPairs) + "); H and G*F must fit int32");
  // bf16/f16 tiles move 16-byte vectors along H and F.
  if (d.x_type != ffi::DataType::F32) {
    if (d.hidden % 8 || d.ffn % 8)
      return Unimplemented("bfloat16/float16 need H and F to be multiples of 8; got H=" +
                           std::to_string(d.hidden) + ", F=" + std::to_string(d.ffn));
    if (const char* name = Misaligned(vectors))
      return InvalidArgument(std::string(name) + "'s buffer must start on 16 bytes for "
                             "bfloat16/float16 tiles");
  }
  return ffi::Error::Success();
}

// Whether the call's float32 GEMMs run as TF32: it opted in (jax.default_matmul_precision), and
// TF32's vectors of 4 floats fit the rows its GEMMs read (H and F multiples of 4, the weights on
// 16 bytes; the other operands are the fetched rows in scratch); else they stay exact float32.
// The forward and backward of a layer decide alike.
bool Tf32(const MoeDims& d, const CallAttrs& attrs, const void* w_in, const void* w_out) {
  return attrs.tf32 != 0 && d.x_type == ffi::DataType::F32 && d.hidden % 4 == 0 &&
         d.ffn % 4 == 0 && !Misaligned({{"w_in", w_in}, {"w_out", w_out}});
}

// Takes the call's scratch from XLA's allocator: stream-ordered, so the kernels enqueued here may
// use it after the handler returns, and counted in XLA's pool rather than beside it.
template <typename Scratch, Scratch (*kCarve)(const Call&, Arena&)>
ffi::Error TakeScratch(ffi::ScratchAllocator& allocator, int64_t budget, Call* call,
                       Scratch* scratch) {
  const int64_t bytes = SizeChunks(call, budget, std::is_same_v<Scratch, BackwardScratch>);
  // XLA aligns scratch to at most 16 bytes when asked: take the slack to align the base to the
  // sections' alignment here.
  constexpr size_t kAsked = 16, kSlack = cuda::kWorkspaceAlignment - kAsked;
  std::optional<void*> base = allocator.Allocate(static_cast<size_t>(bytes) + kSlack, kAsked);
  if (!base.has_value() || *base == nullptr)
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "jax_ccfuser: XLA's allocator gave no " + std::to_string(bytes) +
                          " bytes of scratch for this fused_moe call (a smaller "
                          "jax_ccfuser.scratch_budget takes fewer, in more chunks)");
  const uintptr_t at = reinterpret_cast<uintptr_t>(*base);
  const uintptr_t aligned = (at + cuda::kWorkspaceAlignment - 1) /
                            cuda::kWorkspaceAlignment * cuda::kWorkspaceAlignment;
  Arena arena{reinterpret_cast<char*>(aligned)};
  *scratch = kCarve(*call, arena);
  return ffi::Error::Success();
}

float* Partials(const ForwardScratch&) { return nullptr; }
float* Partials(const BackwardScratch& s) { return s.partials; }

// Where the forward keeps h rows for the backward (`hidden`, checked against the kept_rows
// attribute), and the plan's arrays once it has helper slots (S > 0 helpers); a one-slot plan is
// every expert on its owner, the same as none. With a plan no h rows are kept: a device's pairs are
// no longer one slice of the list, and the backward recomputes them all.
ffi::Error TakeKeptRowsAndPlan(const CallAttrs& attrs, const Hidden& hidden,
                               const PlanArray& workers, const PlanArray& bounds, Call* call) {
  if (ffi::Error err = CheckHidden(call->d, attrs, hidden); err.failure()) return err;
  const int64_t slots = workers.dimensions()[1];
  if (slots > 1) {
    call->plan = {workers.typed_data(), bounds.typed_data(), static_cast<int32_t>(slots)};
    return ffi::Error::Success();
  }
  call->kept_rows = attrs.kept_rows;
  if (call->kept_rows > 0) call->kept = hidden.typed_data();
  return ffi::Error::Success();
}

// `err`, carrying the message of a fault an earlier call recorded: taking it cleared the
// device's record, so this error is its only report.
ffi::Error WithEarlier(ffi::Error err, const ffi::Error& earlier) {
  if (!earlier.failure() || err.message() == earlier.message()) return err;
  return ffi::Error(*err.errc(), err.message() + "; and before that: " + earlier.message());
}

// The steps every handler takes before its launches: the GPU's state (a broken GPU stops here,
// before it meets anyone), a fault an earlier call recorded, the scratch, the peers. A bad id an
// earlier call found fails the host meeting of a group in this process for every member; else
// it comes back in `earlier`, to be reported only once this call has met its peers and enqueued
// its barriers, so that no peer waits for a GPU that bailed out. Taking it cleared the device's
// record, so whatever else stops this call carries its message too.
template <typename Scratch, Scratch (*kCarve)(const Call&, Arena&)>
ffi::Error Prepare(const CallAttrs& attrs, int32_t ordinal, cudaStream_t stream,
                   ffi::ScratchAllocator& allocator, const ScalarS32& rank,
                   const ScalarS32& group, const PeerBuffers& own, DeviceState** state,
                   ffi::Error* earlier, Scratch* scratch, Call* call) {
  cudaGetLastError();  // a stale error of someone else's on this thread is not ours
  if (ffi::Error err = GetDeviceState(ordinal, stream, InWorkspace(attrs, call->d), state);
      err.failure())
    return err;
  if (ffi::Error err = Broken(**state); err.failure()) return err;
  *earlier = TakeDeviceError(**state, stream);
  auto reported = [earlier](ffi::Error err) { return WithEarlier(std::move(err), *earlier); };
  if (ffi::Error err = Broken(**state); err.failure()) return reported(std::move(err));
  call->experts_here = ExpertsHere(attrs, call->d, call->plan.workers != nullptr);
  call->own_experts = OwnExperts(attrs, call->d);
  call->grouped_gemms = (*state)->grouped_gemms && call->d.x_type != ffi::DataType::F32;
  call->num_sms = (*state)->num_sms;
  // fetch_sms < 0: the default, one SM in eight. Python refuses counts >= the GPU's SMs when it
  // traces the call; the GEMMs keep one anyway.
  const int fetch_sms = attrs.fetch_sms < 0 ? call->num_sms / 8 : attrs.fetch_sms;
  call->fetching_sms = std::max(1, call->num_sms - fetch_sms);
  if (ffi::Error err = TakeScratch<Scratch, kCarve>(allocator, attrs.scratch_budget, call, scratch);
      err.failure()) {
    // Peers in other processes do not meet this device on the host: they count its barriers
    // whether it comes or not, so one skipped call would pair its later calls with the wrong
    // ones. It stops for good instead (its peers' barriers time out and break the group).
    if (InWorkspace(attrs, call->d))
      MarkBroken(**state, "a call gave up before meeting its peers in other processes: " +
                              err.message());
    return reported(std::move(err));
  }
  PeerBuffers mine = own;
  mine.partials = Partials(*scratch);  // where helpers write, published with the rest
  return reported(ConnectPeers(attrs, **state, rank, group, mine, stream, earlier, call));
}

// What a handler returns once its launches are enqueued: the first failure among them (with
// this GPU's earlier device fault), the earlier fault, or success. The fault record's copy is
// scheduled either way. A failed launch after real peers met breaks the GPU: its peers passed
// barriers with a call that computed nothing (CloseCall has marked it aborted, so they learn it
// at their next barrier). Without peers (one device, or emulated ones) there are no barriers to
// keep in step, and the GPU takes later calls.
ffi::Error Finish(const Call& call, DeviceState& state, const Launcher& launcher,
                  ffi::Error earlier, cudaStream_t stream) {
  ffi::Error copied = ScheduleErrorCopy(state, stream);
  if (ffi::Error err = launcher.Result(); err.failure()) {
    if (call.place != nullptr) MarkBroken(state, err.message());
    return WithEarlier(std::move(err), earlier);
  }
  if (earlier.failure()) return earlier;
  return copied;
}

ffi::Error MoeForwardImpl(cudaStream_t stream, int32_t ordinal, ffi::ScratchAllocator allocator,
                          ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids, ffi::AnyBuffer weights,
                          ffi::AnyBuffer w_in, ffi::AnyBuffer w_out, PlanArray plan_workers,
                          PlanArray plan_bounds, ScalarS32 rank, ScalarS32 group, CallAttrs attrs,
                          ffi::Result<ffi::AnyBuffer> y, ffi::Result<Staging> staging,
                          ffi::Result<Hidden> hidden) {
  Call call;
  if (ffi::Error err = DecodeDims(x, ids, weights, w_in, w_out, attrs, &call.d); err.failure())
    return err;
  if (ffi::Error err = CheckCudaLimits(call.d, attrs, plan_workers, plan_bounds,
                                       {{"x", x.untyped_data()},
                                        {"w_in", w_in.untyped_data()},
                                        {"w_out", w_out.untyped_data()}});
      err.failure())
    return err;
  call.tf32 = Tf32(call.d, attrs, w_in.untyped_data(), w_out.untyped_data());
  if (ffi::Error err = CheckForwardResults(call.d, attrs, x, *y, *staging); err.failure()) return err;
  if (ffi::Error err = TakeKeptRowsAndPlan(attrs, *hidden, plan_workers, plan_bounds, &call);
      err.failure())
    return err;
  // The h rows no kernel writes (the placeholder row where none are kept, those past this
  // device's pairs, all of them with a plan) read as zeros, not as whatever the memory held:
  // jax_debug_nans reads them.
  const auto zero_hidden = [&] {
    return cudaMemsetAsync(hidden->untyped_data(), 0, hidden->size_bytes(), stream);
  };
  if (x.element_count() == 0) {  // no device of the group has tokens: none meets its peers
    const cudaError_t st = zero_hidden();
    return st == cudaSuccess ? ffi::Error::Success() : CudaFailure("zeroing the h rows", st);
  }

  DeviceState* state;
  ffi::Error earlier;
  ForwardScratch scratch;
  if (ffi::Error err = Prepare<ForwardScratch, CarveForward>(
          attrs, ordinal, stream, allocator, rank, group,
          OwnBuffers(x, ids, weights, w_in, w_out, *staging), &state, &earlier, &scratch, &call);
      err.failure())
    return err;
  std::lock_guard<std::mutex> enqueueing(state->pipeline_mu);
  Launcher launcher;
  launcher.Run("zeroing the h rows no kernel writes", zero_hidden);
  RunForward(call, *state, scratch, rank, group, y->untyped_data(), stream, launcher);
  return Finish(call, *state, launcher, std::move(earlier), stream);
}

ffi::Error MoeBackwardImpl(cudaStream_t stream, int32_t ordinal, ffi::ScratchAllocator allocator,
                           ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids, ffi::AnyBuffer weights,
                           ffi::AnyBuffer w_in, ffi::AnyBuffer w_out, PlanArray plan_workers,
                           PlanArray plan_bounds, ffi::AnyBuffer dy, Hidden hidden,
                           ScalarS32 rank, ScalarS32 group, CallAttrs attrs,
                           ffi::Result<ffi::AnyBuffer> dx,
                           ffi::Result<ffi::AnyBuffer> d_weights, ffi::Result<ffi::AnyBuffer> dw_in,
                           ffi::Result<ffi::AnyBuffer> dw_out, ffi::Result<Staging> staging) {
  Call call;
  if (ffi::Error err = DecodeDims(x, ids, weights, w_in, w_out, attrs, &call.d); err.failure())
    return err;
  const MoeDims& d = call.d;
  if (ffi::Error err = CheckCudaLimits(d, attrs, plan_workers, plan_bounds,
                                       {{"x", x.untyped_data()},
                                        {"dy", dy.untyped_data()},
                                        {"w_in", w_in.untyped_data()},
                                        {"w_out", w_out.untyped_data()}});
      err.failure())
    return err;
  call.tf32 = Tf32(d, attrs, w_in.untyped_data(), w_out.untyped_data());
  call.weight_grads = attrs.weight_grads != 0;
  if (ffi::Error err = CheckBackwardBuffers(d, attrs, x, w_in, w_out, dy, *dx, *d_weights, *dw_in,
                                            *dw_out, *staging);
      err.failure())
    return err;
  if (ffi::Error err = TakeKeptRowsAndPlan(attrs, hidden, plan_workers, plan_bounds, &call);
      err.failure())
    return err;
  if (x.element_count() == 0) return ffi::Error::Success();

  PeerBuffers own = OwnBuffers(x, ids, weights, w_in, w_out, *staging);
  own.dy = dy.untyped_data();
  own.d_weights = d_weights->untyped_data();
  DeviceState* state;
  ffi::Error earlier;
  BackwardScratch scratch;
  if (ffi::Error err = Prepare<BackwardScratch, CarveBackward>(attrs, ordinal, stream, allocator,
                                                               rank, group, own, &state, &earlier,
                                                               &scratch, &call);
      err.failure())
    return err;
  std::lock_guard<std::mutex> enqueueing(state->pipeline_mu);
  Launcher launcher;
  RunBackward(call, *state, scratch, rank, group, dx->untyped_data(), d_weights->untyped_data(),
              dw_in->untyped_data(), dw_out->untyped_data(), stream, launcher);
  return Finish(call, *state, launcher, std::move(earlier), stream);
}

}  // namespace
}  // namespace ccf

// ---------------------------------------------------------------------------------------------
// The bindings.

// XLA's stream, this GPU's ordinal and XLA's scratch allocator, then the operands both platforms
// take.
#define CCF_CUDA_CONTEXT                                                                      \
  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>().Ctx< \
      ffi::ScratchAllocator>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeForwardCuda, ccf::MoeForwardImpl,
                              ccf::BindForward(CCF_CUDA_CONTEXT));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcfMoeBackwardCuda, ccf::MoeBackwardImpl,
                              ccf::BindBackward(CCF_CUDA_CONTEXT));
