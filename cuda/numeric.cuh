// Device-side loads and stores of values whose dtype is chosen at run time: float32, or the
// kernel's 16-bit element type T (expert_weights and their gradients may be either).
#pragma once

#include <cstdint>

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

}  // namespace ccf::cuda
