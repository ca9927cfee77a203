// Staging slots: which row of a source token's staging a computing device writes. The expert
// side (work_list.cu, with or without a plan) and the source side (combine.cu) must count the
// same devices, so both count them here.
#pragma once

#include <cstdint>

namespace ccf::cuda {

// The device of a group of `group_experts` experts, `experts_per_device` each, that owns expert
// `id`, or -1: another group's expert or a bad id.
__device__ __forceinline__ int32_t owning_device(int32_t id, int32_t group_experts,
                                                 int32_t experts_per_device) {
  return id >= 0 && id < group_experts ? id / experts_per_device : -1;
}

// How many distinct devices below `device` compute a token's K pairs, device_of(j) being pair
// j's (-1: none): the slot `device` writes. With device = INT32_MAX, the slots the token uses.
template <class DeviceOf>
__device__ __forceinline__ int32_t devices_below(int32_t device, int32_t top_k,
                                                 DeviceOf device_of) {
  int32_t count = 0;
  for (int32_t j = 0; j < top_k; ++j) {
    const int32_t dj = device_of(j);
    if (dj < 0 || dj >= device) continue;
    bool first = true;  // count each device once: at its first occurrence in the row
    for (int32_t j2 = 0; j2 < j && first; ++j2) first = device_of(j2) != dj;
    count += first;
  }
  return count;
}

}  // namespace ccf::cuda
