// Device-side loads and stores of values whose dtype is chosen at run time: float32, or the
// kernel's 16-bit element type T (expert_weights and their gradients may be either); and the
// float vectors the row passes move a lane's consecutive columns in.
#pragma once

#include <cstdint>

#include <cute/config.hpp>
#include <cutlass/array.h>

namespace ccf::cuda {

template <class T>
__device__ __forceinline__ float load_float(const void* base, int64_t index, bool is_f32) {
  return is_f32 ? static_cast<const float*>(base)[index]
                : static_cast<float>(static_cast<const T*>(base)[index]);
}

template <class T>
__device__ __forceinline__ void store_float(void* base, int64_t index, float value, bool is_f32) {
  if (is_f32) {
    static_cast<float*>(base)[index] = value;
  } else {
    static_cast<T*>(base)[index] = T(value);
  }
}

// kVector consecutive floats, moved as one access (16 bytes for 4): the caller's pointers are
// aligned to that, which each kernel's launch checks before it picks kVector > 1.
template <int kVector>
struct alignas(4 * kVector) Floats {
  float v[kVector] = {};
  __device__ __forceinline__ static Floats load(const float* from) {
    return *reinterpret_cast<const Floats*>(from);
  }
  __device__ __forceinline__ void store(float* to) const { *reinterpret_cast<Floats*>(to) = *this; }
  // Each value rounded to T, the kVector of them stored as one access (8 bytes for 4 16-bit).
  template <class T>
  __device__ __forceinline__ void store_as(T* to) const {
    cutlass::AlignedArray<T, kVector> cast;
    CUTE_UNROLL
    for (int i = 0; i < kVector; ++i) cast[i] = T(v[i]);
    *reinterpret_cast<cutlass::AlignedArray<T, kVector>*>(to) = cast;
  }
};

}  // namespace ccf::cuda
