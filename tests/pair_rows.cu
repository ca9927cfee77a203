// Checks, on the host, the row functions of cuda/pair_rows.cuh that the activation passes run at
// four columns a lane: for every activation, gated or not, with some pairs keeping their h and
// a last slice shorter than the others, each output must hold the same bytes as at one column a
// lane (the SM80 epilogue's, which runs the GEMMs' tests on a GPU) and as the formula evaluated
// element by element; the kept rows must hold h; each slice's dot must match a float64 sum;
// without w * a (frozen experts), dh and the dots are the same bytes and nothing else is written.
// Lanes run one after another. Prints each case and the number of errors; exits 1 on any.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_runtime.h>

// warp_sum's shuffle, which the header declares a use of: the host sums the lanes itself.
inline float __shfl_xor_sync(unsigned, float value, int) { return value; }

#include "cuda/pair_rows.cuh"

using namespace ccf;
using namespace ccf::cuda;
using T = cutlass::bfloat16_t;

namespace {

constexpr int kRows = 5, kKeptRows = 2, kTopK = 3, kColumns = 128;
int errors = 0;

void expect(bool ok, const char* what, int activation, int f) {
  if (!ok && errors++ < 20) std::printf("  activation %d, F %d: %s\n", activation, f, what);
}

template <class V>
bool same_bytes(const std::vector<V>& a, const std::vector<V>& b) {
  return std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0;
}

struct Case {
  int activation, f, gf;
  bool gated;
  std::vector<float> c, u, h, kept_h, weights;
  std::vector<WorkItem> items;
  std::vector<int32_t> group_begin{0};

  Case(int activation, int f, std::mt19937& rng) : activation(activation), f(f) {
    gated = IsGated(static_cast<Activation>(activation));
    gf = gated ? 2 * f : f;
    std::normal_distribution<float> normal;
    for (auto* v : {&c, &h, &kept_h}) v->resize(kRows * gf);
    u.resize(kRows * f);
    weights.resize(kRows * kTopK);
    for (auto* v : {&c, &u, &h, &kept_h, &weights})
      for (float& x : *v) x = normal(rng);
    for (int r = 0; r < kRows; ++r) items.push_back({0, r, r % kTopK});
  }

  GemmParams params(Epilogue epilogue) {
    GemmParams p{};
    p.epilogue = epilogue;
    p.activation = activation;
    p.gated = gated;
    p.n = f;
    p.n_split = gated && epilogue == Epilogue::kActivation ? f : 0;
    p.items = items.data();
    p.top_k = kTopK;
    p.weights[0] = weights.data();
    p.weights_f32 = true;
    p.kept_rows = kKeptRows;
    p.experts_per_device = 1;
    p.group_begin = group_begin.data();
    return p;
  }
  float w(int row) const { return weights[row * kTopK + row % kTopK]; }
};

struct Forward {
  std::vector<T> out;
  std::vector<float> keep;
};

template <int kVector>
Forward forward(Case& k) {
  Forward r{std::vector<T>(kRows * k.f), std::vector<float>(kKeptRows * k.gf, -7.0f)};
  GemmParams p = k.params(Epilogue::kActivation);
  p.out = r.out.data();
  p.out_ld = k.f;
  p.kept = r.keep.data();
  for (int row = 0; row < kRows; ++row) {
    const float* c = k.c.data() + row * k.gf;
    for (int begin = 0; begin < k.f; begin += kColumns)
      for (int lane = 0; lane < 32; ++lane)
        activate_row<T, kVector>(p, 0, row, row, begin, std::min(begin + kColumns, k.f), lane,
                                 [&](int32_t j) { return Floats<kVector>::load(c + j); });
  }
  return r;
}

struct Backward {
  std::vector<T> dh, aw;
  std::vector<float> dots;  // [rows, slices]
};

// Without `aw` (frozen experts: no dW_out reads w * a), r.aw stays empty.
template <int kVector>
Backward backward(Case& k, bool aw = true) {
  const int slices = (k.f + kColumns - 1) / kColumns;
  Backward r{std::vector<T>(kRows * k.gf), std::vector<T>(aw ? kRows * k.f : 0),
             std::vector<float>(kRows * slices, 0.0f)};
  GemmParams p = k.params(Epilogue::kActivationBackward);
  p.h = k.h.data();
  p.kept = k.kept_h.data();
  p.dh = r.dh.data();
  p.aw = aw ? r.aw.data() : nullptr;
  for (int row = 0; row < kRows; ++row) {
    const float* u = k.u.data() + row * k.f;
    for (int s = 0; s < slices; ++s)
      for (int lane = 0; lane < 32; ++lane)
        r.dots[row * slices + s] += activation_backward_row<T, kVector>(
            p, 0, row, row, s * kColumns, std::min((s + 1) * kColumns, k.f), lane,
            [&](int32_t j) { return Floats<kVector>::load(u + j); });
  }
  return r;
}

void check(int activation, int f, std::mt19937& rng) {
  Case k(activation, f, rng);
  const Activation act = static_cast<Activation>(activation);
  const int slices = (f + kColumns - 1) / kColumns;

  const Forward one = forward<1>(k), four = forward<4>(k);
  expect(same_bytes(one.out, four.out), "forward output differs between 1 and 4 columns a lane",
         activation, f);
  expect(same_bytes(one.keep, four.keep), "kept h differs between 1 and 4 columns", activation, f);
  expect(std::memcmp(four.keep.data(), k.c.data(), four.keep.size() * sizeof(float)) == 0,
         "the kept rows do not hold h", activation, f);
  Forward formula{std::vector<T>(kRows * f), {}};
  for (int row = 0; row < kRows; ++row)
    for (int j = 0; j < f; ++j) {
      const float gate = k.c[row * k.gf + j];
      formula.out[row * f + j] =
          T(k.gated ? ActForward(act, gate) * k.c[row * k.gf + f + j] : ActForward(act, gate));
    }
  expect(same_bytes(four.out, formula.out), "forward output is not act(gate) * up", activation, f);

  const Backward b1 = backward<1>(k), b4 = backward<4>(k);
  expect(same_bytes(b1.dh, b4.dh), "dh differs between 1 and 4 columns a lane", activation, f);
  expect(same_bytes(b1.aw, b4.aw), "w * a differs between 1 and 4 columns a lane", activation, f);
  const Backward frozen = backward<4>(k, /*aw=*/false);
  expect(same_bytes(frozen.dh, b4.dh) && same_bytes(frozen.dots, b4.dots),
         "dh or dot(a, u) differs without w * a", activation, f);
  Backward ref{std::vector<T>(kRows * k.gf), std::vector<T>(kRows * f), {}};
  for (int row = 0; row < kRows; ++row) {
    const float* h = (row < kKeptRows ? k.kept_h.data() : k.h.data()) + row * k.gf;
    const float w = k.w(row);
    std::vector<double> dots(slices, 0.0);
    for (int j = 0; j < f; ++j) {
      const float u = k.u[row * f + j], da = w * u;
      float a;
      if (k.gated) {
        const float act_gate = ActForward(act, h[j]);
        a = act_gate * h[f + j];
        ref.dh[row * k.gf + j] = T(ActBackward(act, h[j], da * h[f + j]));
        ref.dh[row * k.gf + f + j] = T(da * act_gate);
      } else {
        a = ActForward(act, h[j]);
        ref.dh[row * k.gf + j] = T(ActBackward(act, h[j], da));
      }
      const float rounded = static_cast<float>(T(a));
      ref.aw[row * f + j] = T(w * rounded);
      dots[j / kColumns] += double(rounded) * u;
    }
    for (int s = 0; s < slices; ++s) {
      const double got = b4.dots[row * slices + s];
      expect(std::abs(got - dots[s]) <= 1e-5 * (1.0 + std::abs(dots[s])),
             "a slice's dot(a, u) is off its float64 sum", activation, f);
    }
  }
  expect(same_bytes(b4.dh, ref.dh), "dh is not the formula's", activation, f);
  expect(same_bytes(b4.aw, ref.aw), "w * a is not the formula's", activation, f);
  std::printf("activation %d F %d: ok\n", activation, f);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  // 768 is Qwen3-30B-A3B's F; 200 and 1032 end in a slice shorter than kColumns.
  for (int activation = 0; activation < kNumActivations; ++activation)
    for (int f : {768, 200, 1032}) check(activation, f, rng);
  std::printf("errors: %d\n", errors);
  return errors == 0 ? 0 : 1;
}
