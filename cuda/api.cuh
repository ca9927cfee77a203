// Launchers of the CUDA kernels of jax_ccfuser's fused MoE, and the plain structs they take.
//
// This header is included by host C++ (xla_ffi/cuda/moe_cuda.cc, compiled without nvcc): it
// declares no device code. A kernel and its launcher share a name; each stage lives in one .cu
// file.
//
// Pipeline of one forward call on one device (the handler enqueues it on XLA's stream; the host
// never waits for the device):
//
//   0. With real peers the handler runs `barrier` (signal.cu): each device's inputs are ready
//      before any peer touches them. The staging is not zeroed: scatter_slots writes each slot
//      in use whole and combine_slots reads no other. Peers
//      in other processes of the host read no XLA buffer: each device first copies x, expert_ids,
//      expert_weights (and dy) into its region of the call site in the CUDA IPC workspaces
//      (xla_ffi/cuda/ipc_memory.h), where its staging, d_expert_weights and barrier flags live too.
//   1. work_list.cu builds the device's work list from every source's expert_ids (read straight
//      out of peer memory): `count_pairs` classifies each (source, token, k) pair (local expert?
//      which staging slot? id in range?) and counts pairs per (expert, chunk of pairs);
//      `scan_counts` turns the counts into per-chunk offsets; `fill_work_list` places every local
//      pair at its position in the fixed order (expert, source, token, k) and derives the GEMM
//      M-tile table. No host round trip, no atomics on positions: the order is fixed.
//   2. dispatch.cu `fetch_rows` reads each (source, token) row of x with pairs here once out of
//      its source's memory (this IS the dispatch) and writes it to each of its pairs' scratch
//      rows of a local [rows, H] buffer, so no GEMM tile reads a peer's row, and a row routed to
//      several experts of a device crosses the link once. It runs source by source on a side
//      stream, the device's own rows first and then its peers' in ring order (emulated: from
//      source 0), while the GEMMs of step 3 run in the same phases on XLA's stream, each
//      waiting only for its source's rows (GemmParams::only_source; the tiles that span two
//      sources last): the link and the tensor cores work at once (xla_ffi/cuda/cuda_launch.cc,
//      SourcePhases).
//   3. expert_gemm.cu runs the grouped GEMMs over that list (CuTe; persistent CTAs walk the tiles):
//      GEMM1 multiplies the fetched rows by w_in[e] and applies the activation in its epilogue
//      (gated: gate and up halves of one tile), writing `a` [pairs, F]; GEMM2 multiplies `a` by
//      w_out[e] into float32 rows [pairs, H]. On Hopper (the build's sm_90a code running), the
//      GEMMs over pair rows are CUTLASS's grouped GEMMs instead (grouped_gemm_sm90.cu: TMA,
//      wgmma, one problem per group): GEMM1 writes float32 h and activation.cu's pass forms `a`
//      (the backward's u GEMM likewise), and the backward's weight gradients are grouped GEMMs
//      too unless a plan asks for partials: in one piece where a group's rows lie in one chunk,
//      else a chunk at a time into a float32 carry.
//   4. combine.cu `scatter_slots` sums, for every source token with pairs here, its rows in
//      scratch-row order times expert_weights and writes the sum into the SOURCE's
//      staging[t, slot] (one remote row write per (token, destination device) and chunk: the
//      send-once-per-device idea).
//   5. `barrier` again, then `combine_slots` sums this device's staging slots in slot order into y.
//
// The backward call fetches x and dy the same way and recomputes on the expert's device (no
// dispatched rows are stored): h = x @ w_in (float32), unless the forward kept it
// (residuals="hidden": GEMM1's epilogue also stores the float32 pre-activation of the first
// `kept_rows` pairs of each device's part of the list, in the device's own buffer; the backward's h
// GEMM skips the tiles whose pairs are all kept and reads their h from there); u = dy @ w_out^T
// with an epilogue that forms a = act(h), da = w * u, dh = act'(h) * da (gated: d gate, d up),
// w * a for dW_out and per-tile partial dot(a, u) for d_expert_weights; dW_out[e] = (w a)^T dy and
// dW_in[e] = x^T dh as grouped GEMMs whose reduction runs over the fetched rows in work-list order;
// dx rows = dh @ w_in^T; `scatter_slots` sends the dx rows to the sources' dx staging and
// d_expert_weights straight into the sources' output; `barrier`; `combine_slots` sums the dx slots.
//
// Single-GPU emulation of D devices uses the very same kernels with a peer table of D pointers
// into stacked buffers and one work list over all D * E_local experts; stream order replaces the
// barriers.
//
// Determinism: every output element is produced by one thread in a fixed order (no float
// atomics); integer counts only decide positions.
//
// Reassignment plans (workers [E, S + 1], bounds [E, S + 2] with S > 0 helpers, on the device):
// every device builds the list over all E experts of the group, and `assign_plan` gives each pair
// the device the plan names for its position in its expert's (source, token, k) order, and its
// staging slot among the token's computing devices. The GEMMs walk groups, one per (expert, plan
// slot) this device computes: a contiguous slice of the list. A helper reads the owner's weights
// through the peer table and writes its float32 weight-gradient partial of the slot straight into
// the owner's scratch [E_local, S, H*G*F + F*H]; after the end barrier the owner's `sum_partials`
// adds its slots in slot order and rounds once. Emulated devices run the same groups and sums, so
// they match real devices bitwise. With a plan, no h rows are kept (residuals="hidden" recomputes
// them), and peers in other processes refuse plans.
//
// Scratch: the rows ([rows, F] and [rows, H] forward, more backward) come from XLA's allocator,
// at most as many as the call's scratch budget holds (jax_ccfuser.scratch_budget), a whole
// number of M-tiles (Chunk). Steps 2-4 then run once per chunk of the work list's tiles, as many
// chunks as the worst case (every pair of the group on this device, D * T * K) needs; the
// weight gradients carry each group's float32 sum from chunk to chunk (GemmParams::carry) and
// the scatter adds each chunk's rows to the staging slots, so the results are bitwise those of
// one chunk. One exception, on Hopper in 16-bit dtypes: a group's weight gradients are a
// grouped GEMM (wgmma) in one piece where its rows lie in one chunk, and where they cross a
// chunk edge a grouped GEMM per chunk added to the float32 sum so far in its epilogue, summed in
// another order (still deterministic for each budget). Chunks past the list's end find no work
// (a few empty launches each).
// Limits of this version: the scatter starts after the chunk's last GEMM (its writes over the
// link do not overlap compute).
//
// Failure: a device barrier that times out, finds a peer out of step (more than one barrier
// ahead, or one that gave up) or, across processes, with other shapes aborts the call on that
// GPU: the later kernels read and write no peer memory (the work list comes out empty), the
// outputs are NaN, and kAbortFlag in every member's flag breaks the group for good, so each
// member's next barrier fails too instead of pairing with the wrong call. A failed launch marks
// the call aborted before its barriers go out, so the peers learn it the same way.
// Not covered: in one process every member that met on the host enqueues both barriers, so a
// device barrier there times out only behind a peer slower than the timeout, which then still
// reads the buffers of the device that gave up (XLA may have reused them); the scatter skips a
// source whose flag already reads kAbortFlag, which narrows this but does not close it.
//
// What has run on a GPU, and what each part still needs checked there: docs/gpu_checklist.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/config.cuh"

namespace ccf::cuda {

enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ---------------------------------------------------------------------------------------------
// Faults found on the device. The first one wins (atomicCAS on `code`); the handler copies the
// record back asynchronously and reports it from a later call (see xla_ffi/cuda/moe_cuda.cc).

enum DeviceErrorCode : int32_t {
  kDeviceOk = 0,
  kBadExpertId = 1,     // source, token, k, value = the id, limit = the number of valid ids
  kBarrierTimeout = 2,  // source = the peer's rank, value = its last flag, limit = the epoch
  kRankMismatch = 3,    // value = the rank or group on the device, limit = the cached one
  kOutOfStep = 4,       // source = the peer's rank, value = its flag, limit = the epoch
  kShapeMismatch = 5,   // source = the peer's rank, value / limit = its / this signature
};

// `aborted` is set when a barrier of the device timed out, found a peer out of step or with
// other shapes: every later kernel of the call then leaves peer memory alone, since the peers'
// buffers may be unwritten or freed. It is never cleared: once the handler has reported it, the
// GPU is broken and runs no kernel of the library again (TakeDeviceError).
struct DeviceError {
  int32_t code;
  int32_t source;
  int32_t token;
  int32_t k;
  int32_t aborted;
  // Whether the device's last start barrier stored its epoch at the members (so they may pass
  // it and write into this device's buffers): the end barrier's drain reads it
  // (cuda/barrier.cuh). The barriers keep it; the handler never clears it.
  int32_t signalled;
  int64_t value;
  int64_t limit;
};

// A flag value no barrier count reaches: a device that aborts stores it into its flags at every
// member, so each member's next barrier with it sees the group broken (kOutOfStep) instead of
// passing, and the group stays broken.
constexpr uint64_t kAbortFlag = ~uint64_t{0};

// Whether `p` starts on a multiple of `bytes`: what the kernels' vector loads and TMA need of a
// buffer (host).
inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// ---------------------------------------------------------------------------------------------
// work_list.cu

// A reassignment plan on the device (Python's jax_ccfuser.Plan): slot s of expert e is computed
// by device workers[e * slots + s] (-1: unused, and so is every later slot; slot 0 is the owner)
// and covers positions [bounds[e * (slots + 1) + s], bounds[... + s + 1]) of e's rows in
// (source, token, k) order; the last slot in use is open-ended.
struct PlanView {
  const int32_t* workers;  // null: no plan, every expert's rows on its owner
  const int32_t* bounds;
  int32_t slots;           // S
};

// The routed pairs, seen from the device that builds the work list.
struct Routing {
  const int32_t* ids[kMaxPeers];  // each source's expert_ids [num_tokens, top_k]
  int32_t num_sources;            // D
  int32_t num_tokens;             // T, per source
  int32_t top_k;                  // K
  int32_t experts_per_device;     // E_local: device d owns experts d*E_local ... (d+1)*E_local-1
  int32_t first_expert;           // the first expert this work list covers
  int32_t num_experts_here;       // how many: E_local, D * E_local when emulating, or with a
                                  // plan the group's D * E_local on every device
  // Valid ids are [0, experts_total); those from D * E_local on belong to experts another group
  // computes (a hierarchical call): their pairs get no work and no staging slot here.
  int64_t experts_total;
  // DeviceError::aborted: once set, the list is empty, so no kernel of the call reads or writes
  // peer memory through it.
  const int32_t* aborted;
  // With a plan the list covers the whole group's experts (first_expert 0) and `me` is the
  // device whose groups the GEMMs walk, or -1 for every device's (emulated).
  PlanView plan;
  int32_t me;
  // The source whose out-of-range ids go into the fault record; -1: every source's. Every
  // device sees every source's ids, so in a group that shares faults on the host each records
  // its own source's only, and each bad id is reported once.
  int32_t recorded_source;
};

// One pair of the work list.
struct WorkItem {
  int32_t source;
  int32_t token;
  int32_t k;
};

// The work list and its scratch, in the device's workspace. P = D * T * K pairs.
struct WorkList {
  int32_t* pair_code;      // [P] local expert * kMaxPeers + staging slot, or -1 (not here/bad)
  int32_t* pair_pos;       // [P] position in `items` (local pairs only)
  int32_t* pair_row;       // [P] scratch row (place_rows), local pairs only
  int32_t* chunk_counts;   // [E_here, num_chunks] counts, then exclusive offsets within expert
  int32_t* expert_count;   // [E_here]
  int32_t* expert_offset;  // [E_here + 1] first position of each expert's pairs (plans only)
  WorkItem* items;         // [P] in (expert, source, token, k) order
  int32_t tile_m;          // the M tile of the GEMMs that walk it (expert_gemm_tile_m)
  // What the GEMMs walk: groups of consecutive positions [group_begin[g], group_end[g]) of
  // expert group_expert[g] (global id; -1: not computed here). Without a plan group g is the
  // list's expert g; with one, g = e * S + s is expert e's plan slot s.
  int32_t num_groups;      // E_here, or E * S with a plan
  int32_t* group_begin;    // [num_groups]
  int32_t* group_end;      // [num_groups]
  int32_t* group_expert;   // [num_groups]
  int32_t* tile_offset;    // [num_groups + 1] first GEMM M-tile of each group
  // A pair's scratch row: its group's first tile * tile_m + its index in the group. The rows of
  // M-tiles [t, t + n) are then rows [t * tile_m, (t + n) * tile_m), whatever groups of other
  // devices lie between theirs in the list, so a chunk of n tiles fits n * tile_m rows (Chunk).
  // With a plan: the device that computes each pair (-1: another group's expert or a bad id),
  // for every pair of the group; null without a plan (the owner computes every pair).
  int32_t* pair_device;    // [P]
};

// Chunks of pairs the work-list kernels split P pairs into.
inline int work_list_chunks(int64_t num_pairs) {
  return static_cast<int>((num_pairs + kPairsPerChunk - 1) / kPairsPerChunk);
}

cudaError_t count_pairs(const Routing& routing, const WorkList& list, DeviceError* error,
                        cudaStream_t stream);
cudaError_t scan_counts(const Routing& routing, const WorkList& list, cudaStream_t stream);
cudaError_t fill_work_list(const Routing& routing, const WorkList& list, cudaStream_t stream);
// With a plan, after fill_work_list: every pair's computing device and slot (pair_device,
// pair_code: -1 for pairs another device computes) and this device's groups.
cudaError_t assign_plan(const Routing& routing, const WorkList& list, cudaStream_t stream);
// Last, once the groups are final: every local pair's pair_row.
cudaError_t place_rows(const Routing& routing, const WorkList& list, cudaStream_t stream);

// The scratch holds the rows of `tiles` M-tiles at a time: chunk `index` is M-tiles
// [index * tiles, (index + 1) * tiles), scratch rows [index * tiles * tile_m, ...) of the
// WorkList, stored from scratch row 0 on. The handler loops over the chunks that the worst case
// needs; chunks past the list's tiles find no work.
struct Chunk {
  int32_t tiles;  // M-tiles per chunk
  int32_t index;
  __host__ __device__ int64_t first_tile() const { return static_cast<int64_t>(index) * tiles; }
  __host__ __device__ int64_t end_tile() const { return first_tile() + tiles; }
  // Its scratch rows, [first_row, end_row), `rows` of them, at `tile_m` rows per M-tile.
  __host__ __device__ int64_t first_row(int32_t tile_m) const { return first_tile() * tile_m; }
  __host__ __device__ int64_t end_row(int32_t tile_m) const { return end_tile() * tile_m; }
  __host__ __device__ int64_t rows(int32_t tile_m) const { return int64_t{tiles} * tile_m; }
};

// ---------------------------------------------------------------------------------------------
// dispatch.cu

// A work list's pairs seen from their (source, token): what the per-token kernels walk.
struct TokenPairs {
  const int32_t* pair_code;  // WorkList::pair_code: < 0 for pairs not computed here
  const int32_t* pair_row;   // WorkList::pair_row
  int32_t num_sources, num_tokens, top_k;
  // The scratch rows of the chunk in memory: [row_begin, row_end), from `rows` on.
  int64_t row_begin, row_end;
};

struct FetchParams {
  TokenPairs pairs;
  int32_t first_source, end_source;  // the sources whose rows this launch fetches
  int64_t row_bytes;                // H * the element size; a multiple of 4
  const void* sources[kMaxPeers];   // each source's [num_tokens, H] rows (x, or dy)
  void* rows;                       // [chunk rows, H] by scratch row
  // > 0: the launch holds at most this many SMs, a block each for the whole fetch, and leaves
  // the others to the GEMMs running beside it (Call::fetching_sms); 0: a warp per token.
  int32_t max_sms;
};

// rows[row - row_begin] = the source's row of the pair at scratch row `row`, for every pair
// computed here whose row is in the chunk and whose source is in [first_source, end_source);
// each (source, token) row is read once, however many of its pairs are here.
cudaError_t fetch_rows(const FetchParams& params, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// expert_gemm.cu: grouped GEMMs, one group per expert of the work list.

// Which dimension runs over the expert's pairs.
enum class GemmShape : int32_t {
  kPairRows = 0,       // C[pair, n] = sum_k A[pair, k] B[k, n]      (M = the expert's pairs)
  kPairReduction = 1,  // C[e][m, n] = sum_pair A[m, pair] B[pair, n] (K = the expert's pairs)
};

// Where an operand's memory rows come from. Operands are row-major in memory; a K-major operand's
// memory rows are its M (A) or N (B) index, an MN-major operand's are its K index. Pair rows are
// local (the sources' rows were fetched, dispatch.cu); an expert's weights may be a peer's.
enum class RowSource : int32_t {
  kExpert = 0,  // row r of expert e's matrix, at its owner d = e / E_local:
                // peers[d] + (e % E_local) * expert_stride + r * ld
  kPair = 1,    // pair row: data + (its scratch row - the chunk's first) * ld
};

struct GemmOperand {
  RowSource source;
  const void* data;              // kPair
  const void* peers[kMaxPeers];  // kExpert: each device's [E_local, ...] weights
  int64_t ld;                    // elements per memory row
  int64_t expert_stride;         // kExpert: elements between experts' matrices
};

enum class Major : int32_t { kK = 0, kMN = 1 };

constexpr int32_t kAllSources = -1, kSpanningSources = -2;  // GemmParams::only_source

// kPairReduction with several chunks: which groups a launch reduces (GemmParams::carry).
enum class ReductionPart : int32_t {
  kEveryGroup = 0,  // one chunk: every group, no carry (grouped_gemm: those the chunk holds whole)
  kContinued = 1,   // the group that began in an earlier chunk: starts from carry
  kBegun = 2,       // the groups that begin in this chunk: one may leave its sum in carry
                    // (grouped_gemm: that one only)
};

enum class Epilogue : int32_t {
  kActivation = 0,          // out[pair, j] = act(C) in the input dtype (gated: act(gate) * up)
  kStoreF32 = 1,            // out[pair, n] = C, float32
  kActivationBackward = 2,  // C = u = dy @ w_out^T: writes w*a, dh, partial dot(a, u)
  kStoreExpert = 3,         // out[e][m, n] = C in the input dtype (weight gradients); with a
                            // plan, float32 into the owner's partials[e % E_local, s]
};

struct GemmParams {
  GemmShape shape;
  int32_t m, n, k;  // the fixed extents; the pair extent comes from the work list
  // Gated GEMM1: B's columns j and n_split + j (gate and up) land in one tile, C's columns
  // [0, BN/2) and [BN/2, BN); 0 for a plain GEMM.
  int32_t n_split;
  GemmOperand a, b;
  // float32 operands multiplied on tensor cores as TF32, each rounded to the nearest (a call's
  // opt-in, which the handler honours where every operand row starts on 16 bytes); read by the
  // host, to pick the kernel.
  int32_t tf32;

  // The work list's groups (work_list.cu), and the M tile it was built for (WorkList::tile_m):
  // the launcher refuses a list built for another tile than the kernel's.
  const WorkItem* items;
  const int32_t* group_begin;
  const int32_t* group_end;
  const int32_t* group_expert;
  const int32_t* tile_offset;
  int32_t num_groups;
  int32_t tile_m;
  // kPairRows: the tiles this launch computes, by the source of their rows: kAllSources, one
  // source (tiles whose rows all come from it), or kSpanningSources (the others).
  int32_t only_source;
  // The chunk of the list whose rows the pair operands and outputs hold. kPairReduction sums
  // each group's pairs of this chunk: a group that began in an earlier chunk starts from its
  // float32 sum so far in `carry`, one that goes on into a later chunk leaves its sum there.
  // Chunk edges are whole M-tiles and so whole k-tiles of the group: the sum goes on exactly as
  // without chunks, bitwise. A group without pairs stores its zeros in chunk 0. With several
  // chunks the handler launches kContinued (reads carry) before kBegun (may overwrite it).
  Chunk chunk;
  float* carry;  // [m, n] float32; null with one chunk
  ReductionPart part;
  // kPairReduction: leave every group with rows to grouped_gemm, which Hopper runs them on; the
  // launch stores the zeros of the groups without any.
  int32_t skip_rows;

  Epilogue epilogue;
  int32_t activation;  // ccf::Activation
  void* out;
  int64_t out_ld;
  int64_t out_expert_stride;  // kStoreExpert
  // kStoreExpert without a plan: DeviceError::aborted, set (by the start barrier, which emptied
  // the list, so every group would store zeros): the gradients are NaN, as the call's other
  // outputs. An abort at the end barrier leaves them as computed, from rows the peers had
  // written. Null: never NaN.
  const int32_t* aborted;
  // kStoreExpert with a plan: each device's partials [E_local, plan_slots, partial_stride]
  // float32, this GEMM's part of each at partial_offset (null: no plan).
  float* partials[kMaxPeers];
  int32_t plan_slots;
  int64_t partial_stride, partial_offset;

  // Kept h rows (residuals="hidden", no plan): pair `pos` of the (emulated) device whose experts
  // its expert is, at index i among that device's pairs, keeps its float32 h = x @ w_in at
  // kept + (device * kept_rows + i) * G*F when i < kept_rows. kActivation stores them,
  // kActivationBackward reads them instead of `h`, and `skip_kept` (kStoreF32 over h) skips the
  // tiles whose pairs are all kept. Null: nothing kept.
  float* kept;
  int64_t kept_rows;
  int32_t experts_per_device;
  int32_t skip_kept;

  // kActivationBackward.
  const float* h;       // [pairs, G*F] the recomputed x @ w_in
  void* aw;             // [pairs, F] w * act(h), input dtype; null: dW_out is not wanted
  void* dh;             // [pairs, G*F] input dtype
  float* dot_partial;   // [pairs, num_partials] partial dot(a, u) of each N tile
  int32_t num_partials;  // the N tiles of F the handler sized it for: checked against the kernel's
  int32_t gated;
  const void* weights[kMaxPeers];  // each source's expert_weights [num_tokens, top_k]
  int32_t weights_f32;             // else the input dtype
  int32_t top_k;
};

// The M and N tile of the GEMMs of a dtype (the same for every major combination).
int expert_gemm_tile_m(DType dtype);
int expert_gemm_tile_n(DType dtype);

// Supported (a_major, b_major): (kK, kMN), (kK, kK), (kMN, kMN); N-major B is Major::kMN.
cudaError_t expert_gemm(DType dtype, Major a_major, Major b_major, const GemmParams& params,
                        int num_sms, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// grouped_gemm_sm90.cu: on Hopper, the pair-row GEMMs whose epilogue is a float32 store
// (kPairRows, kStoreF32) and the weight gradients of the groups a chunk holds whole as CUTLASS
// grouped GEMMs; the fused epilogues of expert_gemm then run as passes over the float32 rows
// (activation.cu).

// Whether the current GPU runs them: a Hopper GPU and sm_90a among the build's architectures.
bool grouped_gemms_available();

// Bytes of the workspace grouped_gemm takes for `num_groups` groups on `num_sms` SMs.
int64_t grouped_gemm_workspace_bytes(int32_t num_groups, int num_sms);

// kPairRows (kStoreF32): out[row] = a[row] @ b[expert] for the rows of each group in the
// launch's chunk from `only_source` (kAllSources: all; kSpanningSources: none, as the source
// phases leave no row to it), less the kept ones under `skip_kept`. a: pair rows; b: expert
// weights, Major::kMN as stored or Major::kK transposed.
// kPairReduction (kStoreExpert, no plan): out[group] = a^T b over the group's rows, in the input
// dtype. Part kEveryGroup: each group whose rows all lie in the chunk. With a carry, kContinued:
// carry += a^T b over the rows here of the group that began in an earlier chunk, and into out
// where its rows end here; kBegun: carry = a^T b over the rows here of the group that goes on
// into the next chunk. Groups without rows are expert_gemm's (skip_rows). a, b: pair rows
// (b_major Major::kMN).
// bf16/f16 on a Hopper GPU only.
cudaError_t grouped_gemm(DType dtype, Major b_major, const GemmParams& params, void* workspace,
                         int device, int num_sms, cudaStream_t stream);

// activation.cu: the epilogue of a kActivation or kActivationBackward GemmParams (GEMM1, the
// backward's u GEMM) as a pass over the float32 rows grouped_gemm wrote for it: [chunk rows,
// n + n_split] of h = x @ w_in, or [chunk rows, n] of u = dy @ w_out^T (with a dot partial per
// N tile, as expert_gemm's epilogue). Rows of `only_source` only, as the GEMM.
struct RowPass {
  GemmParams gemm;
  const float* rows;
};
// `num_sms`: the SMs its grid fills once (the GEMM's), its warps then walking the chunk's rows.
cudaError_t activation_pass(DType dtype, const RowPass& pass, int num_sms, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// combine.cu

struct ScatterParams {
  TokenPairs pairs;
  int32_t hidden, num_slots;
  const float* rows;                // [chunk rows, hidden] by scratch row (TokenPairs)
  int32_t weighted;                 // multiply each row by expert_weights[t, k]
  const void* weights[kMaxPeers];   // each source's expert_weights [num_tokens, top_k]
  int32_t weights_f32;              // else `dtype`
  float* staging[kMaxPeers];        // each source's staging [num_tokens, num_slots, hidden]
  // Backward only (else null): d expert_weights[t, k] = sum of the pair's dot partials.
  const float* dot_partial;         // [chunk rows, num_partials]
  int32_t num_partials;
  void* d_weights[kMaxPeers];       // each source's d_expert_weights [num_tokens, top_k]
  // Real peers: this device's barrier flags for the site, by writer rank (null when emulating).
  // A source whose flag reads kAbortFlag has given the call up and may have freed its staging:
  // its rows are not sent. (A source that gives up during the scatter is not caught.)
  const uint64_t* flags;
};

// For every (source, token) with pairs in this chunk and every slot they use: adds that slot's
// rows of the chunk (times the weights when `weighted`) to staging[source][token, slot], in
// scratch-row order, and in the backward writes their d_expert_weights. A slot's first rows
// start from zero rather than read the staging, so over the chunks each slot is the sum of its
// rows in scratch-row (= work-list) order, whatever the chunking. A real device's pairs of a
// token share one slot; an emulated group's work list holds every device's, so a token's pairs
// may use several, each summed on its own as its device would. Ends with a system-scope fence
// (the rows go to peer memory).
cudaError_t scatter_slots(DType dtype, const ScatterParams& params, cudaStream_t stream);

struct CombineParams {
  const int32_t* ids;    // [num_tokens, top_k] this device's expert_ids
  // With a plan: WorkList::pair_device at this device's first pair (the devices that computed
  // its tokens' pairs, and so its slots); null: each id's owner did.
  const int32_t* pair_device;
  const float* staging;  // [num_tokens, num_slots, hidden]
  void* out;             // [num_tokens, hidden] y or dx
  int32_t num_tokens, top_k, hidden, num_slots;
  int32_t experts_per_device, num_experts;  // this group's: D * E_local
  int64_t experts_total;                    // valid ids are [0, experts_total), as in Routing
  // Backward: d_expert_weights [num_tokens, top_k], or null. NaN at bad ids; the pairs of
  // another group's experts keep the handler's zeros (the caller sums over groups).
  void* d_weights;
  int32_t weights_f32;
  const int32_t* aborted;  // DeviceError::aborted: set, every output is NaN
};

// out[t] = sum of t's slots in use in slot order (0 without any), cast to `dtype`; a token with
// an id outside [0, experts_total) gets NaN (the id is also reported through DeviceError by
// count_pairs), and so does every token of a call whose barrier aborted.
cudaError_t combine_slots(DType dtype, const CombineParams& params, cudaStream_t stream);

// With a plan, after the end barrier: each expert of this device (every device's, emulated)
// gets its weight gradients as the sum of its plan slots' partials in slot order, rounded once
// into dw_in [E_local, H, G*F] and dw_out [E_local, F, H] (the input dtype).
struct PartialSumParams {
  const float* partials;  // [experts, slots, H*G*F + F*H]
  const int32_t* workers;  // the plan's [E, slots], from this device's first expert on
  int32_t experts, slots;
  int64_t in_elements, out_elements;  // H*G*F, F*H
  void* dw_in;
  void* dw_out;
  const int32_t* aborted;  // DeviceError::aborted: set, the sums are NaN (partials unwritten)
};
cudaError_t sum_partials(DType dtype, const PartialSumParams& params, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// signal.cu (the steps: barrier.cuh)

struct BarrierParams {
  // Each member's flags for the call site, [kMaxPeers] with flag r written by rank r: a buffer
  // the handler keeps per (GPU, site) (peers in one process), or in its region of the site
  // (peers in other processes, ipc_memory.h). Keyed by site, so two sites' barriers never share
  // a flag, whatever order or streams their calls run in.
  uint64_t* signals[kMaxPeers];
  // Every member passes every barrier of a site, so one count is the epoch with every member.
  // Peers in one process: the handler's count (`epoch`, `passed` null). Peers in other processes:
  // `passed`, the count in this device's region, which the kernel reads and raises.
  uint64_t epoch;
  uint64_t* passed;
  int32_t num_members;
  int32_t rank;                  // this device's index in the arrays above
  int64_t timeout_ns;
  DeviceError* error;
  // Optional (null to skip): check that the rank/group operands on the device still hold the
  // values the handler cached for this call site.
  const int32_t* rank_value;
  const int32_t* group_value;
  int32_t expected_group;
  // Peers in other processes, start barrier only (else null): each member's signature word in
  // its region. This device writes `signature` (a hash of the shapes it traced) into its own
  // before signalling and compares each member's once that member has signalled.
  uint64_t* signatures[kMaxPeers];
  uint64_t signature;
  // The end barrier of a call: until a member signals it, that member may still be writing into
  // this device's staging and d_weights (or reading its operands), so each wait lasts until its
  // member signals (kAbortFlag included) or the timeout, even once another wait failed. Entered
  // with the call given up (a failed launch, a start barrier that failed after signalling), it
  // still waits so for the members that signalled the call's start (DeviceError::signalled).
  int32_t end;
};

// Every member stores the epoch into its flag in each member's buffer (system-scope release) and
// waits until each member's flag in its own buffer reaches it (acquire). A flag
// more than one barrier ahead (a correct run never has one: a peer cannot pass a barrier this
// device has not signalled) is a group out of step; a wait past the timeout, a changed rank or
// other shapes are faults too. On any of them the kernel records the fault, sets
// DeviceError::aborted and stores kAbortFlag at every member, then returns (cuda/barrier.cuh).
cudaError_t barrier(const BarrierParams& params, cudaStream_t stream);

}  // namespace ccf::cuda
