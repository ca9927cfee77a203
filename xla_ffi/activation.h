// The expert activations, forward and backward, for host and device code alike.
//
// Gated activations (swiglu, geglu) read a gate `g` and an up-projection `u` (the two halves of
// `x @ w_in`, gate first) and produce `act(g) * u`; plain ones produce `act(h)`.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CCF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CCF_HOST_DEVICE inline
#endif

namespace ccf {

// The values of the `activation` FFI attribute; jax_ccfuser/_fused.py spells the same table.
enum class Activation : int32_t { kSwiglu = 0, kGeglu = 1, kGelu = 2, kRelu = 3, kSilu = 4 };

constexpr bool IsGated(Activation a) {
  return a == Activation::kSwiglu || a == Activation::kGeglu;
}

constexpr bool IsValidActivation(int32_t a) { return a >= 0 && a <= 4; }

namespace act_detail {
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

CCF_HOST_DEVICE float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
}  // namespace act_detail

// act(h) for the non-gated activations and the gate of the gated ones.
CCF_HOST_DEVICE float ActForward(Activation a, float h) {
  using namespace act_detail;
  switch (a) {
    case Activation::kRelu: return h > 0.0f ? h : 0.0f;
    case Activation::kGelu:
    case Activation::kGeglu: return 0.5f * h * (1.0f + erff(h * kInvSqrt2));
    default: return h * Sigmoid(h);  // silu, swiglu
  }
}

// d act(h) / dh.
CCF_HOST_DEVICE float ActDerivative(Activation a, float h) {
  using namespace act_detail;
  switch (a) {
    case Activation::kRelu: return h > 0.0f ? 1.0f : 0.0f;
    case Activation::kGelu:
    case Activation::kGeglu:
      return 0.5f * (1.0f + erff(h * kInvSqrt2)) + h * kInvSqrt2Pi * expf(-0.5f * h * h);
    default: {
      float s = Sigmoid(h);
      return s * (1.0f + h * (1.0f - s));
    }
  }
}

}  // namespace ccf
