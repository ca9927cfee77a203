// Row loads and stores between the FFI's element types and float32, on the host.
// bfloat16 and float16 round to nearest even, as XLA's converts do.
#pragma once

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ccf {

namespace dtype_detail {

inline float Bf16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { mant <<= 1; ++e; } while (!(mant & 0x400u));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else {
    bits = sign | (exp + 112u) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;      // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;     // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                           // result is subnormal (or zero)
    if (abs < 0x33000000u) return sign;              // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(exp);   // 14 - (exp - 127) + 13 - 1 ... = 126 - exp
    uint32_t half = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t r = abs - 0x38000000u;                    // rebias 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

}  // namespace dtype_detail

// out[i] = float(in[offset + i]) for i < n.
inline void LoadFloats(const void* in, xla::ffi::DataType t, int64_t offset, int64_t n, float* out) {
  using xla::ffi::DataType;
  if (t == DataType::F32) {
    std::memcpy(out, static_cast<const float*>(in) + offset, n * sizeof(float));
  } else if (t == DataType::BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(in) + offset;
    for (int64_t i = 0; i < n; ++i) out[i] = dtype_detail::Bf16ToFloat(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(in) + offset;
    for (int64_t i = 0; i < n; ++i) out[i] = dtype_detail::F16ToFloat(p[i]);
  }
}

inline float LoadFloat(const void* in, xla::ffi::DataType t, int64_t offset) {
  float v;
  LoadFloats(in, t, offset, 1, &v);
  return v;
}

// out[offset + i] = in[i], rounded to `t`.
inline void StoreFloats(const float* in, int64_t n, void* out, xla::ffi::DataType t, int64_t offset) {
  using xla::ffi::DataType;
  if (t == DataType::F32) {
    std::memcpy(static_cast<float*>(out) + offset, in, n * sizeof(float));
  } else if (t == DataType::BF16) {
    uint16_t* p = static_cast<uint16_t*>(out) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = dtype_detail::FloatToBf16(in[i]);
  } else {
    uint16_t* p = static_cast<uint16_t*>(out) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = dtype_detail::FloatToF16(in[i]);
  }
}

}  // namespace ccf
