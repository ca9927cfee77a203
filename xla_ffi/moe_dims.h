// Static sizes of one fused-MoE call, per (possibly emulated) device.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "common/activation.h"

namespace ccf {

struct MoeDims {
  int64_t tokens, hidden, k, ffn, experts_local;
  // Valid ids are [0, experts_total) (the `num_experts` attribute); those from group_experts() on
  // belong to experts another group computes (the hosts of a hierarchical call), so this group
  // skips them.
  int64_t experts_total;
  int64_t gate_ffn;  // G * F: the width of x @ w_in (G = 2 for gated activations)
  int num_devices;
  int slots;         // staging rows per token: one per distinct computing device, min(K, D)
  Activation activation;
  xla::ffi::DataType x_type, weights_type, w_type;

  // The experts of this group's devices: E_local * D.
  int64_t group_experts() const { return experts_local * num_devices; }
  int owner(int64_t expert) const { return static_cast<int>(expert / experts_local); }
  // Elements of one expert's weights: w_in [H, G*F] then w_out [F, H].
  int64_t expert_elements() const { return hidden * gate_ffn + ffn * hidden; }
};

}  // namespace ccf
