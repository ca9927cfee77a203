// Limits of the CUDA path, in one place. The handler (xla_ffi/cuda/moe_cuda.cc) checks every call
// against them before launching anything, so kernels may rely on them.
#pragma once

#include <cstdint>

namespace ccf::cuda {

// Devices in one expert-parallel group (also the D of single-GPU emulation). It bounds the peer
// tables passed by value to the kernels and the slot field of a work-list pair code.
constexpr int kMaxPeers = 8;

// GPU ordinals the handler keeps state and peer access for.
constexpr int kMaxDevices = 64;

// Experts one work list covers: E_local, or D * E_local when emulating D devices.
constexpr int kMaxExpertsHere = 1024;

// Work-list construction: one warp per chunk of consecutive (source, token, k) pairs.
constexpr int kListWarps = 4;
constexpr int kListThreads = kListWarps * 32;
constexpr int kPairsPerChunk = 8 * 32;

// Threads of the per-token kernels (scatter, combine): one warp per token.
constexpr int kTokenWarps = 4;
constexpr int kTokenThreads = kTokenWarps * 32;

// Routing choices per token (K): the scatter keeps each of its warps' K scratch rows (int32) in
// shared memory, within the 48 KiB a launch takes without opting in.
constexpr int kMaxTopK = 3072;
static_assert(4 * kTokenWarps * kMaxTopK <= 48 * 1024);

// Bytes every workspace region is aligned to.
constexpr int64_t kWorkspaceAlignment = 256;

}  // namespace ccf::cuda
