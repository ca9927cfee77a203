// The work list's launches: the kernels are in work_list.cuh.
#include "cuda/work_list.cuh"

namespace ccf::cuda {

namespace {

size_t run_bytes(const Routing& r) {
  return sizeof(int32_t) * static_cast<size_t>(kListWarps) * r.num_experts_here;
}

}  // namespace

cudaError_t count_pairs(const Routing& routing, const WorkList& list, DeviceError* error,
                        cudaStream_t stream) {
  CCF_HOST_ASSERT(routing.num_experts_here > 0 && routing.num_experts_here <= kMaxExpertsHere);
  CCF_HOST_ASSERT(routing.num_sources > 0 && routing.num_sources <= kMaxPeers);
  CCF_HOST_ASSERT(routing.aborted != nullptr);
  const int num_chunks = work_list_chunks(static_cast<int64_t>(routing.num_sources) *
                                          routing.num_tokens * routing.top_k);
  count_pairs<<<chunk_blocks(num_chunks), kListThreads, run_bytes(routing), stream>>>(
      routing, list, num_chunks, error);
  return cudaGetLastError();
}

cudaError_t scan_counts(const Routing& routing, const WorkList& list, cudaStream_t stream) {
  const int num_chunks = work_list_chunks(static_cast<int64_t>(routing.num_sources) *
                                          routing.num_tokens * routing.top_k);
  scan_counts<<<routing.num_experts_here, kListThreads, 0, stream>>>(list, num_chunks);
  return cudaGetLastError();
}

cudaError_t fill_work_list(const Routing& routing, const WorkList& list, cudaStream_t stream) {
  CCF_HOST_ASSERT(list.tile_m > 0);
  CCF_HOST_ASSERT(routing.plan.workers != nullptr || list.num_groups == routing.num_experts_here);
  const int num_chunks = work_list_chunks(static_cast<int64_t>(routing.num_sources) *
                                          routing.num_tokens * routing.top_k);
  fill_work_list<<<chunk_blocks(num_chunks), kListThreads, run_bytes(routing), stream>>>(
      routing, list, num_chunks);
  return cudaGetLastError();
}

cudaError_t assign_plan(const Routing& routing, const WorkList& list, cudaStream_t stream) {
  CCF_HOST_ASSERT(routing.plan.workers != nullptr && routing.plan.slots > 0);
  CCF_HOST_ASSERT(list.num_groups == routing.num_experts_here * routing.plan.slots &&
                  list.num_groups <= kMaxExpertsHere && list.pair_device != nullptr);
  const int64_t tokens = static_cast<int64_t>(routing.num_sources) * routing.num_tokens;
  assign_plan_pairs<<<item_blocks(tokens), kListThreads, 0, stream>>>(routing, list);
  CCF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  assign_plan_groups<<<1, kListThreads, 0, stream>>>(routing, list);
  return cudaGetLastError();
}

cudaError_t place_rows(const Routing& routing, const WorkList& list, cudaStream_t stream) {
  const int64_t pairs =
      static_cast<int64_t>(routing.num_sources) * routing.num_tokens * routing.top_k;
  if (pairs == 0) return cudaSuccess;
  place_rows<<<item_blocks(pairs), kListThreads, 0, stream>>>(routing, list);
  return cudaGetLastError();
}

}  // namespace ccf::cuda
