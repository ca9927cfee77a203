#include "xla_ffi/moe_call.h"

#include <algorithm>

namespace ccf {

namespace ffi = xla::ffi;

namespace {
bool IsFloatType(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

const void* Offset(const void* base, ffi::DataType t, int64_t elements) {
  return static_cast<const char*>(base) + elements * ffi::ByteWidth(t);
}
void* Offset(void* base, ffi::DataType t, int64_t elements) {
  return static_cast<char*>(base) + elements * ffi::ByteWidth(t);
}
}  // namespace

ffi::Error InvalidArgument(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_ccfuser: " + msg);
}

std::string TypeName(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    default: return "XLA dtype code " + std::to_string(static_cast<int>(type));
  }
}

// Decodes and checks the operands shared by the forward and backward handlers. With
// `emulated`, the leading dimension of every operand stacks the D devices' blocks.
ffi::Error DecodeDims(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::S32>& ids,
                      const ffi::AnyBuffer& weights, const ffi::AnyBuffer& w_in,
                      const ffi::AnyBuffer& w_out, const CallAttrs& attrs, MoeDims* dims) {
  const int32_t num_devices = attrs.num_devices, activation = attrs.activation;
  const bool emulated = attrs.emulated;
  if (num_devices < 1)
    return InvalidArgument("num_devices must be >= 1, got " + std::to_string(num_devices));
  if (!IsValidActivation(activation))
    return InvalidArgument("unknown activation code " + std::to_string(activation));
  if (x.dimensions().size() != 2 || ids.dimensions().size() != 2 ||
      weights.dimensions().size() != 2 || w_in.dimensions().size() != 3 ||
      w_out.dimensions().size() != 3)
    return InvalidArgument("expected x [T, H], expert_ids [T, K], expert_weights [T, K], "
                           "w_in [E_local, H, G*F], w_out [E_local, F, H]; got x " +
                           ShapeString(x) + ", w_in " + ShapeString(w_in) + ", w_out " +
                           ShapeString(w_out));
  const std::pair<const char*, const ffi::AnyBuffer*> floats[] = {
      {"x", &x}, {"expert_weights", &weights}, {"w_in", &w_in}, {"w_out", &w_out}};
  for (const auto& [name, b] : floats)
    if (!IsFloatType(b->element_type()))
      return InvalidArgument(std::string(name) + " must be float32, bfloat16 or float16, got " +
                             TypeName(b->element_type()));
  if (w_in.element_type() != x.element_type() || w_out.element_type() != x.element_type())
    return InvalidArgument("w_in and w_out must have x's dtype (" + TypeName(x.element_type()) +
                           "), got " + TypeName(w_in.element_type()) + " and " +
                           TypeName(w_out.element_type()));
  if (weights.element_type() != x.element_type() && weights.element_type() != ffi::DataType::F32)
    return InvalidArgument("expert_weights must be float32 or x's dtype (" +
                           TypeName(x.element_type()) + "), got " +
                           TypeName(weights.element_type()));
  const int64_t split = emulated ? num_devices : 1;
  MoeDims d;
  d.num_devices = num_devices;
  d.activation = static_cast<Activation>(activation);
  d.x_type = x.element_type();
  d.weights_type = weights.element_type();
  d.w_type = w_in.element_type();
  d.hidden = x.dimensions()[1];
  d.k = ids.dimensions()[1];
  d.experts_local = w_out.dimensions()[0] / split;
  d.ffn = w_out.dimensions()[1];
  d.gate_ffn = (IsGated(d.activation) ? 2 : 1) * d.ffn;
  d.tokens = x.dimensions()[0] / split;
  d.slots = static_cast<int>(std::min<int64_t>(d.k, num_devices));
  if (x.dimensions()[0] % split || w_out.dimensions()[0] % split)
    return InvalidArgument("emulating " + std::to_string(num_devices) +
                           " devices needs x and the weights stacked in equal blocks; got x " +
                           ShapeString(x) + " and w_out " + ShapeString(w_out));
  if (ids.dimensions()[0] != x.dimensions()[0] || weights.dimensions()[0] != x.dimensions()[0] ||
      weights.dimensions()[1] != d.k || d.k < 1)
    return InvalidArgument("expert_ids and expert_weights must be [T, K] with x's T; got " +
                           ShapeString(ids) + " and " + ShapeString(weights));
  if (w_in.dimensions()[0] != w_out.dimensions()[0] || w_in.dimensions()[1] != d.hidden ||
      w_in.dimensions()[2] != d.gate_ffn || w_out.dimensions()[2] != d.hidden)
    return InvalidArgument("w_in " + ShapeString(w_in) + " and w_out " + ShapeString(w_out) +
                           " do not fit H=" + std::to_string(d.hidden) + " and the activation");
  if (d.hidden < 1 || d.ffn < 1 || d.experts_local < 1)
    return InvalidArgument("x " + ShapeString(x) + " and w_out " + ShapeString(w_out) +
                           " must have H, F and E_local of at least 1");
  d.experts_total = attrs.num_experts;
  if (d.experts_total < d.group_experts())
    return InvalidArgument("num_experts " + std::to_string(d.experts_total) + " < the " +
                           std::to_string(d.group_experts()) + " experts of this group");
  *dims = d;
  return ffi::Error::Success();
}

ffi::Error CheckPlanShape(const PlanArray& workers, const PlanArray& bounds, const MoeDims& d) {
  const auto w = workers.dimensions(), b = bounds.dimensions();
  if (w[0] != d.group_experts() || b[0] != d.group_experts() || w[1] < 1 || b[1] != w[1] + 1)
    return InvalidArgument("plan arrays must be workers [E, S + 1] and bounds [E, S + 2] with "
                           "E = " + std::to_string(d.group_experts()) + "; got " +
                           ShapeString(workers) + " and " + ShapeString(bounds));
  return ffi::Error::Success();
}

bool InWorkspace(const CallAttrs& attrs, const MoeDims& d) {
  return attrs.workspace >= 0 && !attrs.emulated && d.num_devices > 1;
}

namespace {
bool StagingFits(const MoeDims& d, const CallAttrs& attrs, const ffi::AnyBuffer& x,
                 const Staging& staging) {
  const int64_t want =
      InWorkspace(attrs, d) ? 1 : x.dimensions()[0] * d.slots * d.hidden;
  return static_cast<int64_t>(staging.element_count()) == want;
}
}  // namespace

ffi::Error CheckForwardResults(const MoeDims& d, const CallAttrs& attrs, const ffi::AnyBuffer& x,
                               const ffi::AnyBuffer& y, const Staging& staging) {
  if (y.element_type() != d.x_type || y.element_count() != x.element_count() ||
      !StagingFits(d, attrs, x, staging))
    return InvalidArgument("outputs must be y [T, H] in x's dtype and staging [T, S, H] float32 "
                           "([1, 1, 1] with a shared workspace), S = min(K, D) = " +
                           std::to_string(d.slots) +
                           "; got y " + TypedShape(y) + " and staging " +
                           "float32" + ShapeString(staging) +
                           " for x " + TypedShape(x));
  return ffi::Error::Success();
}

ffi::Error CheckBackwardBuffers(const MoeDims& d, const CallAttrs& attrs, const ffi::AnyBuffer& x,
                                const ffi::AnyBuffer& w_in, const ffi::AnyBuffer& w_out,
                                const ffi::AnyBuffer& dy, const ffi::AnyBuffer& dx,
                                const ffi::AnyBuffer& d_weights, const ffi::AnyBuffer& dw_in,
                                const ffi::AnyBuffer& dw_out, const Staging& staging) {
  if (dy.element_type() != d.x_type || dy.element_count() != x.element_count() ||
      dx.element_type() != d.x_type || d_weights.element_type() != d.weights_type ||
      dw_in.element_type() != d.w_type || dw_out.element_type() != d.w_type ||
      dw_in.element_count() != w_in.element_count() ||
      dw_out.element_count() != w_out.element_count() || !StagingFits(d, attrs, x, staging))
    return InvalidArgument(
        "backward operands and outputs do not match the forward's: dy " + TypedShape(dy) +
        ", dx " + TypedShape(dx) + ", d_weights " + TypedShape(d_weights) + ", dw_in " +
        TypedShape(dw_in) + ", dw_out " + TypedShape(dw_out) + ", staging " +
        "float32" + ShapeString(staging) + " for x " + TypedShape(x) +
        ", w_in " + TypedShape(w_in) + ", w_out " + TypedShape(w_out) +
        " and expert_weights of " + TypeName(d.weights_type));
  return ffi::Error::Success();
}

ffi::Error CheckHidden(const MoeDims& d, const CallAttrs& attrs, const Hidden& hidden) {
  // One row that holds nothing where none are kept: XLA (jax 0.11) crashes compiling a zero-sized
  // custom-call operand under shard_map.
  const int64_t rows = std::max<int64_t>(attrs.kept_rows * (attrs.emulated ? d.num_devices : 1), 1);
  const auto dims = hidden.dimensions();
  if (attrs.kept_rows < 0 || dims[0] != rows || dims[1] != d.gate_ffn)
    return InvalidArgument("hidden must be [" + std::to_string(rows) + ", G*F=" +
                           std::to_string(d.gate_ffn) + "] float32 for " +
                           std::to_string(attrs.kept_rows) + " kept rows of x @ w_in per "
                           "device; got " + ShapeString(hidden));
  return ffi::Error::Success();
}

std::array<int64_t, 9> Signature(const MoeDims& d) {
  return {d.tokens, d.hidden, d.k, d.ffn, d.experts_local, d.experts_total,
          static_cast<int64_t>(d.x_type),
          static_cast<int64_t>(d.weights_type), static_cast<int64_t>(d.activation)};
}

ffi::Error CheckSignatures(int rank, const std::array<int64_t, 9>& mine,
                           const std::vector<std::array<int64_t, 9>>& theirs) {
  for (size_t dev = 0; dev < theirs.size(); ++dev)
    if (theirs[dev] != mine)
      return ffi::Error::Internal(
          "jax_ccfuser: device " + std::to_string(dev) +
          " called this site with other shapes or dtypes than device " + std::to_string(rank));
  return ffi::Error::Success();
}

PeerBuffers OwnBuffers(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::S32>& ids,
                       const ffi::AnyBuffer& weights, const ffi::AnyBuffer& w_in,
                       const ffi::AnyBuffer& w_out, Staging& staging) {
  PeerBuffers own;
  own.x = x.untyped_data();
  own.ids = ids.typed_data();
  own.weights = weights.untyped_data();
  own.w_in = w_in.untyped_data();
  own.w_out = w_out.untyped_data();
  own.staging = staging.typed_data();
  return own;
}

PeerBuffers EmulatedPeer(const PeerBuffers& own, const MoeDims& d, int dev) {
  PeerBuffers b;
  b.x = Offset(own.x, d.x_type, dev * d.tokens * d.hidden);
  b.ids = own.ids + dev * d.tokens * d.k;
  b.weights = Offset(own.weights, d.weights_type, dev * d.tokens * d.k);
  b.w_in = Offset(own.w_in, d.w_type, dev * d.experts_local * d.hidden * d.gate_ffn);
  b.w_out = Offset(own.w_out, d.w_type, dev * d.experts_local * d.ffn * d.hidden);
  if (own.dy) b.dy = Offset(own.dy, d.x_type, dev * d.tokens * d.hidden);
  b.staging = own.staging + dev * d.tokens * d.slots * d.hidden;
  if (own.d_weights) b.d_weights = Offset(own.d_weights, d.weights_type, dev * d.tokens * d.k);
  return b;
}

}  // namespace ccf
