// One fused-MoE call's operands, for the CPU and CUDA handlers alike: decoding and checks,
// the stacked layout of emulated devices, and the signature peers compare.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/moe_dims.h"
#include "xla_ffi/peer_group.h"

namespace ccf {

// Spelled once: template commas cannot appear inside the binding macros.
using ScalarS32 = xla::ffi::Buffer<xla::ffi::S32, 0>;
using PlanArray = xla::ffi::Buffer<xla::ffi::S32, 2>;
// [T, S, H], or one unused element where the peers write the call's workspace region instead
// (InWorkspace).
using Staging = xla::ffi::Buffer<xla::ffi::F32, 3>;
// Rows of h = x @ w_in in float32 that a device keeps from its forward for its backward
// (residuals="hidden"): [C, G*F], stacked [D * C, G*F] when emulating; with C = 0 (the attribute
// kept_rows) one row that holds nothing.
using Hidden = xla::ffi::Buffer<xla::ffi::F32, 2>;

// The attributes of "ccf_moe_fwd" / "ccf_moe_bwd", X(type, name) each, SEP between them: the one
// list that CallAttrs, its decoding and the table Python builds its attribute dict from
// (`call_attributes()`) expand. workspace >= 0: peers live in other processes of the host and
// meet in this chunk of the devices' shared workspaces, at `workspace_offset`; `devices` names
// each group's devices by global id. -1: peers share this process's address space.
#define CCF_CALL_ATTRS(X, SEP)                                                            \
  X(uint64_t, site) SEP                         /* unique per call site */                \
  X(int32_t, num_devices) SEP                   /* D */                                   \
  X(int32_t, emulated) SEP                      /* D devices stacked in one call */       \
  X(int32_t, activation) SEP                    /* ccf::Activation */                     \
  X(int64_t, timeout_ms) SEP                    /* barrier timeout */                     \
  X(int64_t, num_experts) SEP                   /* valid ids: [0, num_experts) */         \
  X(int32_t, workspace) SEP                     /* shared chunk, or -1 */                 \
  X(int64_t, workspace_offset) SEP              /* this site's region */                  \
  X(xla::ffi::Span<const int32_t>, devices) SEP /* [G * D] device ids */                  \
  X(int64_t, scratch_budget) SEP                /* GPU scratch bytes (SizeChunks) */      \
  X(int32_t, fetch_sms) SEP                     /* SMs kept for the fetch; -1: SMs / 8 */ \
  X(int32_t, tf32) SEP                          /* float32 GEMMs may run as TF32 */       \
  X(int64_t, kept_rows) SEP                     /* C: h rows kept per device */           \
  X(int32_t, weight_grads)                      /* backward: dw_in, dw_out wanted */

struct CallAttrs {
#define CCF_CALL_ATTR_FIELD(type, name) type name;
  CCF_CALL_ATTRS(CCF_CALL_ATTR_FIELD, )
#undef CCF_CALL_ATTR_FIELD
};

xla::ffi::Error InvalidArgument(const std::string& msg);

template <typename Buffer>
std::string ShapeString(const Buffer& b) {
  std::string s = "[";
  auto dims = b.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// The dtype's name as jax spells it ("bfloat16").
std::string TypeName(xla::ffi::DataType type);

// A buffer's dtype and shape, as "bfloat16[8, 16]".
inline std::string TypedShape(const xla::ffi::AnyBuffer& b) {
  return TypeName(b.element_type()) + ShapeString(b);
}

// Decodes and checks the operands shared by the forward and backward handlers. With
// `emulated`, the leading dimension of every operand stacks the D devices' blocks.
xla::ffi::Error DecodeDims(const xla::ffi::AnyBuffer& x, const xla::ffi::Buffer<xla::ffi::S32>& ids,
                           const xla::ffi::AnyBuffer& weights, const xla::ffi::AnyBuffer& w_in,
                           const xla::ffi::AnyBuffer& w_out, const CallAttrs& attrs,
                           MoeDims* dims);

// InvalidArgument unless the plan's arrays are workers [E, S + 1] and bounds [E, S + 2] for the
// group's E experts and S >= 0 helpers.
xla::ffi::Error CheckPlanShape(const PlanArray& workers, const PlanArray& bounds,
                               const MoeDims& d);

// Whether the call meets its peers in other processes in its region of the shared workspaces,
// whose staging they write (its own staging result then holds nothing).
bool InWorkspace(const CallAttrs& attrs, const MoeDims& d);

// Checks the forward's results: y [T, H] in x's dtype, staging [T, S, H] float32 (one element
// InWorkspace).
xla::ffi::Error CheckForwardResults(const MoeDims& d, const CallAttrs& attrs,
                                    const xla::ffi::AnyBuffer& x, const xla::ffi::AnyBuffer& y,
                                    const Staging& staging);

// Checks the backward's extra operand dy and its results against the forward's operands.
xla::ffi::Error CheckBackwardBuffers(const MoeDims& d, const CallAttrs& attrs,
                                     const xla::ffi::AnyBuffer& x,
                                     const xla::ffi::AnyBuffer& w_in,
                                     const xla::ffi::AnyBuffer& w_out,
                                     const xla::ffi::AnyBuffer& dy, const xla::ffi::AnyBuffer& dx,
                                     const xla::ffi::AnyBuffer& d_weights,
                                     const xla::ffi::AnyBuffer& dw_in,
                                     const xla::ffi::AnyBuffer& dw_out, const Staging& staging);

// `hidden` against the rows of h each (emulated) device keeps, C (the attribute kept_rows).
xla::ffi::Error CheckHidden(const MoeDims& d, const CallAttrs& attrs, const Hidden& hidden);

// What peers must agree on: (T, H, K, F, E_local, E, x dtype, weights dtype, activation).
std::array<int64_t, 9> Signature(const MoeDims& d);

// Every device's signature (`theirs`, by rank) against device `rank`'s own, once they have
// published: an error naming the first device that traced the site differently, or success.
xla::ffi::Error CheckSignatures(int rank, const std::array<int64_t, 9>& mine,
                                const std::vector<std::array<int64_t, 9>>& theirs);

// This call's own buffers (forward operands; the backward adds dy and d_weights).
PeerBuffers OwnBuffers(const xla::ffi::AnyBuffer& x, const xla::ffi::Buffer<xla::ffi::S32>& ids,
                       const xla::ffi::AnyBuffer& weights, const xla::ffi::AnyBuffer& w_in,
                       const xla::ffi::AnyBuffer& w_out, Staging& staging);

// Emulated device `dev`'s buffers: block `dev` of each stacked operand of `own`.
PeerBuffers EmulatedPeer(const PeerBuffers& own, const MoeDims& d, int dev);

// The bound operands, attributes and results of "ccf_moe_fwd" / "ccf_moe_bwd", appended to a
// platform's context arguments: both platforms' handlers take exactly these.
template <typename Binding>
auto BindOperands(Binding&& binding) {
  return std::move(binding).template Arg<xla::ffi::AnyBuffer>()  // x [T, H]
      .template Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // expert_ids [T, K]
      .template Arg<xla::ffi::AnyBuffer>()                     // expert_weights [T, K]
      .template Arg<xla::ffi::AnyBuffer>()                     // w_in [E_local, H, G*F]
      .template Arg<xla::ffi::AnyBuffer>()                     // w_out [E_local, F, H]
      .template Arg<PlanArray>()                               // plan workers [E, S + 1]
      .template Arg<PlanArray>();                              // plan bounds [E, S + 2]
}

template <typename Binding>
auto BindPositionAndAttrs(Binding&& binding) {
  return std::move(binding).template Arg<ScalarS32>()          // rank in the EP group
      .template Arg<ScalarS32>()                               // which EP group
      .template Attrs<CallAttrs>();                            // CCF_CALL_ATTRS
}

template <typename Binding>
auto BindForward(Binding&& binding) {
  return BindPositionAndAttrs(BindOperands(std::move(binding)))
      .template Ret<xla::ffi::AnyBuffer>()                     // y [T, H]
      .template Ret<Staging>()                                 // staging [T, S, H]
      .template Ret<Hidden>();                                 // hidden [C, G*F] kept h rows
}

template <typename Binding>
auto BindBackward(Binding&& binding) {
  return BindPositionAndAttrs(BindOperands(std::move(binding))
                                  .template Arg<xla::ffi::AnyBuffer>()  // dy [T, H]
                                  .template Arg<Hidden>())  // hidden: the forward's kept h rows
      .template Ret<xla::ffi::AnyBuffer>()                     // dx [T, H]
      .template Ret<xla::ffi::AnyBuffer>()                     // d expert_weights [T, K]
      .template Ret<xla::ffi::AnyBuffer>()                     // dw_in [E_local, H, G*F]
      .template Ret<xla::ffi::AnyBuffer>()                     // dw_out [E_local, F, H]
      .template Ret<Staging>();                                // staging [T, S, H]
}

}  // namespace ccf

#define CCF_CALL_ATTR_MEMBER(type, name) ::xla::ffi::StructMember<type>(#name)
#define CCF_COMMA ,
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::ccf::CallAttrs,
                                      CCF_CALL_ATTRS(CCF_CALL_ATTR_MEMBER, CCF_COMMA));
#undef CCF_COMMA
#undef CCF_CALL_ATTR_MEMBER
