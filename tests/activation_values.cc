// Checks common/activation.h's host arithmetic, built with UBSan trapping: every activation and
// its derivative at NaN, the infinities, values past Exp's clamp and a sweep of finite values,
// against the formulas in double. NaN must stay NaN, and no value may take a path the language
// leaves undefined (a NaN converted to an integer was one). Prints the number of errors.
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>

#include "common/activation.h"

namespace {

int errors = 0;

void expect(bool ok, const char* what, int activation, float h, float got, double want) {
  if (!ok && errors++ < 20)
    std::printf("  activation %d at %g: %s gave %g, want %g\n", activation, h, what, got, want);
}

// The formulas in double: act(h) and d act(h) / dh.
double Forward(ccf::Activation a, double h) {
  switch (a) {
    case ccf::Activation::kRelu: return h < 0 ? 0 : h;
    case ccf::Activation::kGelu:
    case ccf::Activation::kGeglu: return 0.5 * h * std::erfc(-h / std::sqrt(2.0));
    default: return h / (1 + std::exp(-h));
  }
}

double Derivative(ccf::Activation a, double h) {
  switch (a) {
    case ccf::Activation::kRelu: return h > 0 ? 1 : 0;
    case ccf::Activation::kGelu:
    case ccf::Activation::kGeglu:
      return 0.5 * std::erfc(-h / std::sqrt(2.0)) +
             h * std::exp(-0.5 * h * h) / std::sqrt(2 * M_PI);
    default: {
      const double s = 1 / (1 + std::exp(-h));
      return s * (1 + h * (1 - s));
    }
  }
}

// Within float rounding of the result, or of the terms of order 1 it came from, times h.
bool Close(float got, double want, float h) {
  return std::fabs(got - want) <= 2e-6 * std::fabs(want) + 1e-7 * std::fmax(1.0f, std::fabs(h));
}

// Where no terms cancel, float keeps its relative accuracy however small the value: the
// negative tails of gelu (1 + erf(h) cancelled: 4% off at h = -5, 0 below -5.5, an error
// within Close's absolute term) and of silu. The bound is that of h's rounding inside erfc
// and exp (their slopes grow with h).
bool RelativelyClose(float got, double want) {
  return std::fabs(got - want) <= 3e-5 * std::fabs(want);
}

}  // namespace

int main() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (int code = 0; code < ccf::kNumActivations; ++code) {
    const auto a = static_cast<ccf::Activation>(code);
    const int before = errors;
    const float forward = ccf::ActForward(a, nan), derivative = ccf::ActDerivative(a, nan);
    expect(std::isnan(forward), "forward", code, nan, forward, nan);
    // relu's derivative is a comparison, 0 at NaN as jax.nn.relu's gradient; the others carry it.
    if (a != ccf::Activation::kRelu)
      expect(std::isnan(derivative), "derivative", code, nan, derivative, nan);
    // The backward is dy * act'(h), except where relu is flat: 0 whatever dy is, NaN and the
    // infinities too, as jax.nn.relu's gradient selects (a NaN at h itself gives 0 as well).
    for (float h : {nan, -1.0f, 0.0f, 1e-3f, 2.0f, -90.0f})
      for (float dy : {nan, inf, -inf, -2.5f, 0.25f}) {
        const float got = ccf::ActBackward(a, h, dy);
        const float want = a == ccf::Activation::kRelu ? (h > 0.0f ? dy : 0.0f)
                                                       : dy * ccf::ActDerivative(a, h);
        expect((std::isnan(got) && std::isnan(want)) || got == want, "backward", code, h, got,
               want);
      }
    for (float h : {inf, -inf, 1e30f, -1e30f, 100.0f, -100.0f, 88.5f, -87.5f}) {
      ccf::ActForward(a, h);  // defined behaviour is all that is asked past float's reach
      ccf::ActDerivative(a, h);
    }
    for (int i = -4000; i <= 4000; ++i) {
      const float h = i * 0.0225f;  // [-90, 90]
      expect(Close(ccf::ActForward(a, h), Forward(a, h), h), "forward", code, h,
             ccf::ActForward(a, h), Forward(a, h));
      expect(Close(ccf::ActDerivative(a, h), Derivative(a, h), h), "derivative", code, h,
             ccf::ActDerivative(a, h), Derivative(a, h));
    }
    if (a != ccf::Activation::kRelu) {
      for (int i = 0; i <= 900; ++i) {
        const float h = -1.0f - i * 0.01f;  // [-10, -1]
        expect(RelativelyClose(ccf::ActForward(a, h), Forward(a, h)), "forward (tail)", code, h,
               ccf::ActForward(a, h), Forward(a, h));
        // Past gelu's derivative's root (about -0.75) and silu's (about -1.28).
        if (h <= -2.0f)
          expect(RelativelyClose(ccf::ActDerivative(a, h), Derivative(a, h)), "derivative (tail)",
                 code, h, ccf::ActDerivative(a, h), Derivative(a, h));
      }
    }
    if (errors == before) std::printf("activation %s: ok\n", ccf::kActivationNames[code]);
  }
  for (int i = -8700; i <= 8800; ++i) {
    const float x = i * 0.01f;
    const float got = ccf::act_detail::Exp(x);
    expect(std::fabs(got - std::exp(double(x))) <= 2.5e-7 * std::exp(double(x)), "Exp", -1, x,
           got, std::exp(double(x)));
  }
  expect(std::isnan(ccf::act_detail::Exp(nan)), "Exp", -1, nan, ccf::act_detail::Exp(nan), nan);
  std::printf("errors: %d\n", errors);
  return errors == 0 ? 0 : 1;
}
