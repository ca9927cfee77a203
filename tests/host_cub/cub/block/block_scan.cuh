// cub::BlockScan for device code run as host code (tests/warp_lanes.h, whose __syncthreads it
// waits at): the exclusive sums over a block that cuda/work_list.cuh takes from cub, in cub's
// blocked arrangement (thread t holds items t * kItems ... (t + 1) * kItems - 1) and through a
// TempStorage the kernel shares, so a kernel that reuses it without a barrier between two scans
// reads another scan's totals here too. tests/work_list.cu puts this folder before the toolkit's:
// cub's own builds its scans from PTX the host compiler does not take.
#pragma once

namespace cub {

template <class T, int kThreads>
class BlockScan {
 public:
  struct TempStorage {
    T totals[kThreads];
  };

  explicit BlockScan(TempStorage& temp) : temp_(temp) {}

  template <int kItems>
  void ExclusiveSum(const T (&input)[kItems], T (&output)[kItems], T& aggregate) {
    T mine{};
    for (int i = 0; i < kItems; ++i) mine += input[i];
    temp_.totals[threadIdx.x] = mine;
    __syncthreads();
    T running{};
    aggregate = T{};
    for (int t = 0; t < kThreads; ++t) {
      if (t == static_cast<int>(threadIdx.x)) running = aggregate;
      aggregate += temp_.totals[t];
    }
    for (int i = 0; i < kItems; ++i) {
      const T item = input[i];
      output[i] = running;
      running += item;
    }
  }

  void ExclusiveSum(T input, T& output, T& aggregate) {
    T in[1] = {input}, out[1];
    ExclusiveSum(in, out, aggregate);
    output = out[0];
  }

 private:
  TempStorage& temp_;
};

}  // namespace cub
