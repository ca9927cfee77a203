// The expert activations, forward and backward, for host and device code alike.
//
// Gated activations (swiglu, geglu) read a gate `g` and an up-projection `u` (the two halves of
// `x @ w_in`, gate first) and produce `act(g) * u`; plain ones produce `act(h)`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CCF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CCF_HOST_DEVICE inline
#endif

namespace ccf {

// The values of the `activation` FFI attribute.
enum class Activation : int32_t { kSwiglu = 0, kGeglu = 1, kGelu = 2, kRelu = 3, kSilu = 4 };

// Python's names, indexed by code: the native modules hand Python this table
// (`activation_codes()`), so the codes are spelled only here.
inline constexpr const char* kActivationNames[] = {"swiglu", "geglu", "gelu", "relu", "silu"};
inline constexpr int32_t kNumActivations = sizeof(kActivationNames) / sizeof(kActivationNames[0]);
static_assert(static_cast<int32_t>(Activation::kSilu) + 1 == kNumActivations);

constexpr bool IsGated(Activation a) {
  return a == Activation::kSwiglu || a == Activation::kGeglu;
}

constexpr bool IsValidActivation(int32_t a) { return a >= 0 && a < kNumActivations; }

namespace act_detail {
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// exp(x) to about 1 ulp. On the host it is straight-line arithmetic (Cody-Waite reduction and a
// Cephes polynomial) so the compiler vectorises the activation loops; libm's expf is a call.
CCF_HOST_DEVICE float Exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // NaN falls through both tests
  const float rounded = floorf(x * 1.44269504088896341f + 0.5f);
  // NaN carries on through r; converting it to an integer below would be undefined behaviour.
  const float n = rounded == rounded ? rounded : 0.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

CCF_HOST_DEVICE float Sigmoid(float x) { return 1.0f / (1.0f + Exp(-x)); }
}  // namespace act_detail

// act(h) for the non-gated activations and the gate of the gated ones.
CCF_HOST_DEVICE float ActForward(Activation a, float h) {
  using namespace act_detail;
  switch (a) {
    case Activation::kRelu: return h < 0.0f ? 0.0f : h;  // NaN stays NaN, as in jax.nn.relu
    case Activation::kGelu:
    // erfc, as jax.nn.gelu: 1 + erf(h) cancels for negative h (4% off at h = -5, and 0 below
    // about -5.5).
    case Activation::kGeglu: return 0.5f * h * erfcf(-h * kInvSqrt2);
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
      return 0.5f * erfcf(-h * kInvSqrt2) + h * kInvSqrt2Pi * Exp(-0.5f * h * h);
    default: {
      float s = Sigmoid(h);
      return s * (1.0f + h * (1.0f - s));
    }
  }
}

// dy * act'(h), the gradient through act. Where relu is flat it is 0 whatever dy is, NaN and
// infinities included, as jax.nn.relu's gradient selects it (0 * NaN would spread a token's
// NaN combine weight over every unit of its experts' weight gradients).
CCF_HOST_DEVICE float ActBackward(Activation a, float h, float dy) {
  if (a == Activation::kRelu) return h > 0.0f ? dy : 0.0f;
  return dy * ActDerivative(a, h);
}

}  // namespace ccf
