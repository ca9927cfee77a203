// Checks, on the host, the launch sequence of xla_ffi/cuda/cuda_launch.cc, which nothing else
// checks without a GPU (and on one, a missing event shows only as a rare wrong row). RunForward and
// RunBackward run against stubs of the CUDA runtime calls and of the kernels' launchers: each
// stub checks its launcher's preconditions and records its operation, its stream and the bytes
// it reads and writes, as the kernel it stands for reaches them from the launch's own parameters
// (cuda/*.cu, cited at each stub).
//   - Order: two operations on different streams that touch the same bytes, one writing, must be
//     ordered by events (vector clocks). Pair rows are told apart by source where the kernels
//     split them: fetch_rows writes one source's rows; expert_gemm's phases compute the tiles of
//     one source or those spanning sources (tile_source); the grouped GEMMs and activation passes
//     the rows of one source (first_from, row_pair). A real group's other members are a third
//     stream that the device barriers order: before the start barrier they write their inputs
//     and zero their d_expert_weights, between the barriers they read this device's inputs and
//     write their parts of its staging, d_expert_weights and partials, after the end barrier
//     they read and reuse all of theirs. So this device reaches a peer's memory only between its
//     barriers, and its own shared buffers outside them where its peers may touch them.
//   - Every operation on the side stream is joined into XLA's stream before the call returns.
//   - What the call produces for itself is written before it is read, each chunk's pair rows in
//     that chunk (so a launch left out shows, where no two operations meet); a scatter runs for
//     each chunk of the worst case in turn; a weight gradient's carry goes from one chunk's
//     kBegun part to the next chunk's kContinued (cuda::GemmParams::carry).
//   - Scratch: SizeChunks takes the most M-tiles the budget holds (one at least), the carve over
//     its bytes uses all of them, each kernel's reach into a region stays inside it (so does
//     every access to any other buffer), and some operation reads each region (frozen experts'
//     backward takes none of the weight gradients' scratch).
//   - Failures: for each n, the n-th call of the successful run (a launcher or a runtime call)
//     fails. What cuda_launch.h's Launcher promises: the error is returned (for a
//     real group the handler then marks the GPU broken, moe_cuda.cc's Finish); every device
//     barrier of the successful run is still enqueued, with the same epoch and parameters, and
//     each one after the failure behind a mark that the call aborted, so the members' counts stay
//     in step and they learn of it; after the failure only barriers, those marks and event calls
//     are enqueued; the side stream is joined (where the join's own record fails, by the host
//     waiting for the side stream) and the order holds.
// Over a matrix: forward and backward; one device, D = 2 and 8 emulated, in one process and
// across processes; float32 (a plain activation), bfloat16 (a gated one) on the SM80 kernels and
// on the grouped GEMMs; h recomputed, kept, or a reassignment plan; one chunk, two M-tiles and
// one M-tile a chunk; source phases off and on. Past it, in one chunk: phases by the shape (the
// setting unset) at kPhaseRows and below, and a work list of many experts. Prints each group of
// configurations, the counts and the number of errors; exits 1 on any.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "xla_ffi/cuda/cuda_launch.cc"

#include "cuda/gemm_config.cuh"

namespace {

using ccf::cuda::DType;
using ccf::cuda::Epilogue;
using ccf::cuda::GemmParams;
using ccf::cuda::GemmShape;

constexpr cudaError_t kInjected = cudaErrorLaunchOutOfResources;

int errors = 0;
std::string where;  // the configuration, and the call made to fail

void fail(const std::string& what) {
  if (errors++ < 40) std::printf("  %s: %s\n", where.c_str(), what.c_str());
}

void expect(bool ok, const char* what) {
  if (!ok) fail(what);
}

// ---------------------------------------------------------------------------------------------
// Device memory: named buffers that nothing reads or writes (the kernels are stubs); what counts
// is which bytes each operation names.

struct Buffer {
  std::string name;
  const char* at;
  int64_t bytes;
};

class Memory {
 public:
  // Bytes of their own, aligned as XLA's buffers and the arena's regions are.
  char* Raw(int64_t bytes) {
    blocks_.emplace_back(new char[bytes + ccf::cuda::kWorkspaceAlignment]);
    const uintptr_t at = reinterpret_cast<uintptr_t>(blocks_.back().get());
    return reinterpret_cast<char*>((at + ccf::cuda::kWorkspaceAlignment - 1) /
                                   ccf::cuda::kWorkspaceAlignment *
                                   ccf::cuda::kWorkspaceAlignment);
  }
  char* Take(const std::string& name, int64_t bytes) {
    char* at = Raw(bytes);
    Name(name, at, bytes);
    return at;
  }
  void Name(const std::string& name, const void* at, int64_t bytes) {
    buffers_.push_back({name, static_cast<const char*>(at), bytes});
  }
  const Buffer* Find(const void* p) const {
    for (const Buffer& b : buffers_)
      if (static_cast<const char*>(p) >= b.at && static_cast<const char*>(p) < b.at + b.bytes)
        return &b;
    return nullptr;
  }
  std::string NameOf(const void* p) const {
    const Buffer* b = Find(p);
    return b != nullptr ? b->name : "unknown memory";
  }

 private:
  std::vector<std::unique_ptr<char[]>> blocks_;
  std::vector<Buffer> buffers_;
};

// ---------------------------------------------------------------------------------------------
// The trace of one call.

// XLA's stream, the side stream that fetches the peers' rows, and a real group's other members.
enum StreamId { kXla, kSide, kPeers, kStreams };
const char* const kStreamNames[] = {"XLA's stream", "the side stream", "the peers"};
using Clock = std::array<int64_t, kStreams>;

void Merge(Clock& into, const Clock& from) {
  for (int s = 0; s < kStreams; ++s) into[s] = std::max(into[s], from[s]);
}

// Which part of a buffer an access covers, where operations on different parts never meet: the
// rows of a pair-row buffer by source (two bits a source: those in its own tiles, those in tiles
// that span sources), or the parts of a shared buffer by computing device (a bit each).
constexpr uint32_t kEveryPart = ~0u;
uint32_t OwnTiles(int source) { return 1u << (2 * source); }
uint32_t SpanningTiles(int source) { return 2u << (2 * source); }
uint32_t RowsFrom(int source) { return OwnTiles(source) | SpanningTiles(source); }

struct Access {
  const char* at;
  int64_t bytes;
  uint32_t part;
  bool write;
};

enum class Kind { kKernel, kCopy, kRecord, kWait, kAbortMark, kBarrier, kPeers };

struct Op {
  const char* name;
  int32_t source;  // GemmParams::only_source or a fetch's first source; kNone: neither
  int32_t chunk;   // -1: none
  Kind kind;
  StreamId stream;
  Clock clock;  // the operations it happens after, itself included
  size_t first, end;  // its accesses
};
constexpr int32_t kNone = -100;
const char* const kScatter = "scatter_slots";  // one a chunk

struct BarrierCall {
  bool end;
  uint64_t epoch;
  const uint64_t* passed;
  const int32_t* rank_value;
  const int32_t* group_value;
  bool signatures;
  bool operator==(const BarrierCall& o) const {
    return end == o.end && epoch == o.epoch && passed == o.passed &&
           rank_value == o.rank_value && group_value == o.group_value &&
           signatures == o.signatures;
  }
};

struct Trace {
  std::vector<Op> ops;
  std::vector<Access> accesses;
  Clock streams[kStreams];
  std::array<Clock, ccf::cuda::kMaxPeers + 1> events;
  std::array<bool, ccf::cuda::kMaxPeers + 1> recorded;
  std::vector<BarrierCall> barriers;  // every one the call asked for, enqueued or not
  std::map<const void*, int32_t> carry_begun;  // the chunk whose kBegun part wrote each carry
  bool stale_wait;  // a wait for an event this call never recorded
  int calls, fail_at;
  // The failing call: the operations enqueued before it, what it was.
  size_t failed_after;
  Op failed;
  cudaError_t reported;  // what the launcher handed CudaFailure

  void Reset(int fail) {
    ops.clear();
    accesses.clear();
    for (Clock& c : streams) c = {};
    events = {};
    recorded = {};
    barriers.clear();
    carry_begun.clear();
    stale_wait = false;
    calls = 0;
    fail_at = fail;
    failed_after = SIZE_MAX;
    reported = cudaSuccess;
  }
};

Trace trace;

// What the stubs need to know of the call under way.
struct World {
  cudaStream_t xla = reinterpret_cast<cudaStream_t>(uintptr_t{0x1000});
  cudaStream_t side = reinterpret_cast<cudaStream_t>(uintptr_t{0x2000});
  const ccf::DeviceState* device = nullptr;
  int me = -1;  // rank in a real group, else -1
  // The last work list's routing: its pairs and whose expert weights the GEMMs read.
  ccf::cuda::Routing routing{};
  // A real group's members, in the three spans the barriers make (file comment).
  std::vector<Access> peers_before, peers_between, peers_after;
};

World world;

// This device's part of what the members share; every part when it is the whole group.
uint32_t Mine() { return world.me >= 0 ? 1u << world.me : kEveryPart; }

// The pairs a work list covers, D * T * K; by default the call's.
int64_t Pairs(const ccf::cuda::Routing& r = world.routing) {
  return int64_t{r.num_sources} * r.num_tokens * r.top_k;
}

StreamId StreamOf(cudaStream_t s) {
  if (s == world.xla) return kXla;
  if (s == world.side) return kSide;
  expect(false, "an operation went to a stream that is neither XLA's nor the side stream");
  return kXla;
}

int EventOf(cudaEvent_t e) {
  for (size_t i = 0; i < world.device->fetched.size(); ++i)
    if (world.device->fetched[i] == e) return static_cast<int>(i);
  expect(false, "an event that is not the device's");
  return 0;
}

// Whether this call is the one made to fail: it then enqueues nothing.
bool Fails(const char* name, Kind kind, cudaStream_t stream, int32_t source = kNone,
           int32_t chunk = -1) {
  if (trace.calls++ != trace.fail_at) return false;
  trace.failed_after = trace.ops.size();
  trace.failed = {name, source, chunk, kind, StreamOf(stream), {}, 0, 0};
  return true;
}

Op& Push(const char* name, Kind kind, StreamId s, int32_t source = kNone, int32_t chunk = -1) {
  trace.streams[s][s] += 1;
  const size_t at = trace.accesses.size();
  trace.ops.push_back({name, source, chunk, kind, s, trace.streams[s], at, at});
  return trace.ops.back();
}

void Touch(const void* at, int64_t bytes, uint32_t part, bool write) {
  if (at == nullptr) {
    fail(std::string(trace.ops.back().name) + " reaches through a null pointer");
    return;
  }
  trace.accesses.push_back({static_cast<const char*>(at), bytes, part, write});
  trace.ops.back().end = trace.accesses.size();
}
void Read(const void* at, int64_t bytes, uint32_t part = kEveryPart) {
  Touch(at, bytes, part, false);
}
void Write(const void* at, int64_t bytes, uint32_t part = kEveryPart) {
  Touch(at, bytes, part, true);
}

void PushPeers(const char* name, const std::vector<Access>& accesses) {
  Push(name, Kind::kPeers, kPeers);
  for (const Access& a : accesses) Touch(a.at, a.bytes, a.part, a.write);
}

std::string Describe(const Op& op) {
  std::string s = op.name;
  if (op.kind == Kind::kRecord || op.kind == Kind::kWait)
    s += " (fetched[" + std::to_string(op.source) + "])";
  else if (op.source == ccf::cuda::kSpanningSources) s += " (tiles spanning sources)";
  else if (op.source >= 0) s += " (source " + std::to_string(op.source) + ")";
  if (op.chunk >= 0) s += ", chunk " + std::to_string(op.chunk);
  return s + " on " + kStreamNames[op.stream];
}

// ---------------------------------------------------------------------------------------------
// What the kernels reach.

int64_t Width(DType t) { return t == DType::kF32 ? 4 : 2; }

// expert_gemm's phases compute whole tiles (tile_source); the grouped GEMMs and the activation
// passes the rows of one source, and nothing for the spanning phase.
uint32_t TileRows(int32_t only_source) {
  if (only_source == ccf::cuda::kAllSources) return kEveryPart;
  if (only_source >= 0) return OwnTiles(only_source);
  uint32_t spanning = 0;
  for (int s = 0; s < ccf::cuda::kMaxPeers; ++s) spanning |= SpanningTiles(s);
  return spanning;
}
uint32_t SourceRows(int32_t only_source) {
  return only_source == ccf::cuda::kAllSources ? kEveryPart : RowsFrom(only_source);
}

// The sources whose pairs rows of `part` hold (whose expert_weights an epilogue reads).
void ReadWeights(const void* const* weights, int64_t width, int32_t only_source) {
  const int64_t bytes = int64_t{world.routing.num_tokens} * world.routing.top_k * width;
  for (int s = 0; s < world.routing.num_sources; ++s)
    if (only_source < 0 || s == only_source) Read(weights[s], bytes);
}

// The work list's groups that the GEMMs walk (gemm_units.cuh: group_of_tile, decode_tile), and
// their pairs (tile_source, row_pair, first_from).
void ReadGroups(const GemmParams& p, bool items) {
  Read(p.group_begin, 4 * int64_t{p.num_groups});
  Read(p.group_end, 4 * int64_t{p.num_groups});
  Read(p.group_expert, 4 * int64_t{p.num_groups});
  Read(p.tile_offset, 4 * (int64_t{p.num_groups} + 1));
  if (items) Read(p.items, sizeof(ccf::cuda::WorkItem) * Pairs());
}

// A group's expert weights at its owner (expert_gemm.cu's operand_row, build_problems): the
// owners of the experts the work list covers.
void ReadExperts(const ccf::cuda::GemmOperand& b, int64_t width) {
  const ccf::cuda::Routing& r = world.routing;
  const int first = r.first_expert / r.experts_per_device;
  const int last = (r.first_expert + r.num_experts_here - 1) / r.experts_per_device;
  for (int dev = first; dev <= last; ++dev)
    Read(b.peers[dev], int64_t{r.experts_per_device} * b.expert_stride * width);
}

// GemmParams::kept: rows `device * kept_rows + i` of `columns` floats (pair_rows.cuh's
// kept_index), for the devices whose groups the launch has.
int64_t KeptBytes(const GemmParams& p, int64_t columns) {
  const int64_t devices = (p.num_groups - 1) / p.experts_per_device + 1;
  return devices * p.kept_rows * columns * 4;
}

// What GEMM1's and the u GEMM's fused epilogues write of the chunk's `rows` rows of `part`
// (pair_rows.cuh: activate_row, activation_backward_row), in expert_gemm or a pass.
void EpilogueRows(DType dtype, const GemmParams& p, uint32_t part, int64_t rows) {
  const int64_t w = Width(dtype);
  if (p.epilogue == Epilogue::kActivation) {
    Write(p.out, rows * p.out_ld * w, part);
    if (p.kept != nullptr) Write(p.kept, KeptBytes(p, p.n + p.n_split));
    return;
  }
  const int64_t gf = p.gated ? 2 * int64_t{p.n} : p.n;
  Read(p.h, rows * gf * 4, part);
  if (p.kept != nullptr) Read(p.kept, KeptBytes(p, gf));
  ReadWeights(p.weights, p.weights_f32 ? 4 : w, p.only_source);
  Write(p.dh, rows * gf * w, part);
  if (p.aw != nullptr) Write(p.aw, rows * p.n * w, part);
  Write(p.dot_partial, rows * p.num_partials * 4, part);
}

// A weight gradient's store (expert_gemm.cu's kStoreExpert, finish_carry): each group's matrix
// of the output, or with a plan its float32 partial at the expert's owner.
void StoreExpert(const GemmParams& p, int64_t width) {
  if (p.partials[0] == nullptr) {
    Write(p.out, int64_t{p.num_groups} * p.out_expert_stride * width);
    return;
  }
  const ccf::cuda::Routing& r = world.routing;
  for (int dev = 0; dev < r.num_sources; ++dev)
    Write(p.partials[dev], int64_t{r.experts_per_device} * p.plan_slots * p.partial_stride * 4,
          Mine());
}

// GemmParams::carry: null with one chunk; with several, a chunk's kContinued part starts from
// the sum the previous chunk's kBegun part left, so it runs before this chunk's kBegun.
void Carry(const GemmParams& p) {
  expect(p.chunk.index == 0 || p.carry != nullptr,
         "a weight gradient past the first chunk without the carry");
  if (p.carry == nullptr) return;
  const auto begun = trace.carry_begun.try_emplace(p.carry, -1).first;
  if (p.part == ccf::cuda::ReductionPart::kContinued && p.chunk.index > 0 &&
      begun->second != p.chunk.index - 1)
    fail("a weight gradient continues a carry that chunk " + std::to_string(begun->second) +
         " began, in chunk " + std::to_string(p.chunk.index));
  if (p.part == ccf::cuda::ReductionPart::kBegun) begun->second = p.chunk.index;
}

// expert_gemm.cu's serves(): the epilogues each operand layout compiles, of the layouts it has.
bool Serves(ccf::cuda::Major a, ccf::cuda::Major b, Epilogue e) {
  using ccf::cuda::Major;
  if (a == Major::kMN) return b == Major::kMN && e == Epilogue::kStoreExpert;
  if (b == Major::kK) return e == Epilogue::kActivationBackward || e == Epilogue::kStoreF32;
  return e == Epilogue::kActivation || e == Epilogue::kStoreF32;
}

const char* GemmName(const GemmParams& p) {
  if (p.shape == GemmShape::kPairReduction) return "expert_gemm (weight gradient)";
  switch (p.epilogue) {
    case Epilogue::kActivation: return "expert_gemm (GEMM1 + activation)";
    case Epilogue::kActivationBackward: return "expert_gemm (u + activation backward)";
    default: return "expert_gemm (float32 rows)";
  }
}

// A device barrier, `touches` naming what its kernel reaches, between the sides of a real
// group's members (file comment): at the start barrier they have written their inputs and may
// then reach this device's shared buffers; at the end barrier they have stopped, and go on to
// their own. Where a barrier is not enqueued the group is broken instead (the error is returned,
// the members' barriers time out) and only the timeout orders the members after it, which
// api.cuh leaves uncovered: their sides after it are not modelled.
template <class Touches>
void BarrierWithPeers(bool end, bool enqueued, cudaStream_t stream, Touches touches) {
  if (!end) PushPeers("the peers before the start barrier", world.peers_before);
  if (!enqueued) return;
  const StreamId s = StreamOf(stream);
  Merge(trace.streams[s], trace.streams[kPeers]);
  Push("barrier", Kind::kBarrier, s);
  touches();
  Merge(trace.streams[kPeers], trace.streams[s]);
  if (end) PushPeers("the peers after the end barrier", world.peers_after);
  else PushPeers("the peers between the barriers", world.peers_between);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The CUDA runtime calls cuda_launch.cc makes.

extern "C" {

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  const int e = EventOf(event);
  if (Fails("cudaEventRecord", Kind::kRecord, stream, e)) return kInjected;
  const StreamId s = StreamOf(stream);
  Push("cudaEventRecord", Kind::kRecord, s, e);
  trace.events[e] = trace.streams[s];
  trace.recorded[e] = true;
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  const int e = EventOf(event);
  if (Fails("cudaStreamWaitEvent", Kind::kWait, stream, e)) return kInjected;
  const StreamId s = StreamOf(stream);
  trace.stale_wait |= !trace.recorded[e];
  Merge(trace.streams[s], trace.events[e]);
  Push("cudaStreamWaitEvent", Kind::kWait, s, e);
  return cudaSuccess;
}

// What this device enqueues after it, on either stream, starts after the stream's work ended.
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  const StreamId s = StreamOf(stream);
  for (StreamId t : {kXla, kSide}) Merge(trace.streams[t], trace.streams[s]);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* at, int value, size_t bytes, cudaStream_t stream) {
  const bool abort_mark = at == &world.device->error->aborted;
  const Kind kind = abort_mark ? Kind::kAbortMark : Kind::kCopy;
  if (Fails("cudaMemsetAsync", kind, stream)) return kInjected;
  if (abort_mark) expect(value == 1 && bytes == sizeof(int32_t), "the abort mark is not a 1");
  Push(abort_mark ? "marking the call aborted" : "cudaMemsetAsync", kind, StreamOf(stream));
  Write(at, static_cast<int64_t>(bytes));
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  expect(kind == cudaMemcpyDeviceToDevice, "a copy that is not device to device");
  if (Fails("cudaMemcpyAsync", Kind::kCopy, stream)) return kInjected;
  Push("cudaMemcpyAsync", Kind::kCopy, StreamOf(stream));
  Read(from, static_cast<int64_t>(bytes));
  Write(to, static_cast<int64_t>(bytes));
  return cudaSuccess;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// cuda_device.cc's and the kernels' host functions that cuda_launch.cc calls. Each launcher
// checks its launcher's preconditions (CCF_HOST_ASSERT), then records what its kernel reaches.

namespace ccf {

xla::ffi::Error CudaFailure(const std::string& what, cudaError_t status) {
  trace.reported = status;
  return xla::ffi::Error::Internal(what);
}

uint64_t NextBarrier(DeviceState&, SitePlace& place) { return ++place.barriers; }

}  // namespace ccf

namespace ccf::cuda {

// expert_gemm.cu's own definitions.
int expert_gemm_tile_m(DType dtype) {
  using namespace gemm_config;
  return dtype == DType::kF32 ? SimtConfig<Major::kK, Major::kK>::kTileM
                              : TensorCoreConfig<bfloat16_t, Major::kK, Major::kK>::kTileM;
}

int expert_gemm_tile_n(DType dtype) {
  using namespace gemm_config;
  return dtype == DType::kF32 ? SimtConfig<Major::kK, Major::kK>::kTileN
                              : TensorCoreConfig<bfloat16_t, Major::kK, Major::kK>::kTileN;
}

// grouped_gemm_sm90.cu's size needs CUTLASS's sm90 kernels; any size that grows with both
// arguments does here, the carve and each launch asking the same function.
int64_t grouped_gemm_workspace_bytes(int32_t num_groups, int num_sms) {
  return 4096 + 320 * int64_t{num_groups} + 64 * int64_t{num_sms};
}

// work_list.cu count_pairs: every source's ids (classify_pair), the abort flag; pair codes and
// chunk counts; a bad id into the fault record.
cudaError_t count_pairs(const Routing& r, const WorkList& list, DeviceError* error,
                        cudaStream_t stream) {
  expect(r.num_experts_here > 0 && r.num_experts_here <= kMaxExpertsHere &&
             r.num_sources > 0 && r.num_sources <= kMaxPeers && r.aborted != nullptr,
         "count_pairs' preconditions");
  world.routing = r;
  if (Fails("count_pairs", Kind::kKernel, stream)) return kInjected;
  Push("count_pairs", Kind::kKernel, StreamOf(stream));
  const int64_t pairs = Pairs(r), chunks = work_list_chunks(pairs);
  for (int s = 0; s < r.num_sources; ++s) Read(r.ids[s], 4 * int64_t{r.num_tokens} * r.top_k);
  Read(r.aborted, 4);
  Write(list.pair_code, 4 * pairs);
  Write(list.chunk_counts, 4 * r.num_experts_here * chunks);
  Write(error, sizeof(DeviceError));
  return cudaSuccess;
}

// scan_counts: chunk counts into offsets, expert_count.
cudaError_t scan_counts(const Routing& r, const WorkList& list, cudaStream_t stream) {
  if (Fails("scan_counts", Kind::kKernel, stream)) return kInjected;
  Push("scan_counts", Kind::kKernel, StreamOf(stream));
  const int64_t counts = 4 * int64_t{r.num_experts_here} * work_list_chunks(Pairs(r));
  Read(list.chunk_counts, counts);
  Write(list.chunk_counts, counts);
  Write(list.expert_count, 4 * int64_t{r.num_experts_here});
  return cudaSuccess;
}

// The work list's group table: each group's pairs, expert and first M-tile.
void WriteGroupTable(const WorkList& list, int64_t groups) {
  Write(list.group_begin, 4 * groups);
  Write(list.group_end, 4 * groups);
  Write(list.group_expert, 4 * groups);
  Write(list.tile_offset, 4 * (groups + 1));
}

// fill_work_list: items and positions from the counts; without a plan the groups and their
// M-tile table.
cudaError_t fill_work_list(const Routing& r, const WorkList& list, cudaStream_t stream) {
  expect(list.tile_m > 0 && (r.plan.workers != nullptr || list.num_groups == r.num_experts_here),
         "fill_work_list's preconditions");
  if (Fails("fill_work_list", Kind::kKernel, stream)) return kInjected;
  Push("fill_work_list", Kind::kKernel, StreamOf(stream));
  const int64_t pairs = Pairs(r), experts = r.num_experts_here;
  Read(list.expert_count, 4 * experts);
  Read(list.chunk_counts, 4 * experts * work_list_chunks(pairs));
  Read(list.pair_code, 4 * pairs);
  if (r.plan.workers != nullptr) Write(list.expert_offset, 4 * (experts + 1));
  Write(list.items, sizeof(WorkItem) * pairs);
  Write(list.pair_pos, 4 * pairs);
  if (r.plan.workers == nullptr) WriteGroupTable(list, experts);
  return cudaSuccess;
}

// assign_plan (assign_plan_pairs, assign_plan_groups): the plan's arrays over the list; every
// pair's computing device and slot, the groups and their M-tile table.
cudaError_t assign_plan(const Routing& r, const WorkList& list, cudaStream_t stream) {
  expect(r.plan.workers != nullptr && r.plan.slots > 0 &&
             list.num_groups == r.num_experts_here * r.plan.slots &&
             list.num_groups <= kMaxExpertsHere && list.pair_device != nullptr,
         "assign_plan's preconditions");
  if (Fails("assign_plan", Kind::kKernel, stream)) return kInjected;
  Push("assign_plan", Kind::kKernel, StreamOf(stream));
  const int64_t pairs = Pairs(r), experts = r.num_experts_here, groups = list.num_groups;
  Read(r.plan.workers, 4 * experts * r.plan.slots);
  Read(r.plan.bounds, 4 * experts * (r.plan.slots + 1));
  Read(r.aborted, 4);
  Read(list.pair_code, 4 * pairs);
  Read(list.pair_pos, 4 * pairs);
  Read(list.expert_offset, 4 * (experts + 1));
  Read(list.expert_count, 4 * experts);
  Write(list.pair_device, 4 * pairs);
  Write(list.pair_code, 4 * pairs);
  WriteGroupTable(list, groups);
  return cudaSuccess;
}

// place_rows: each local pair's scratch row from its group.
cudaError_t place_rows(const Routing& r, const WorkList& list, cudaStream_t stream) {
  if (Fails("place_rows", Kind::kKernel, stream)) return kInjected;
  const int64_t pairs = Pairs(r);
  if (pairs == 0) return cudaSuccess;
  Push("place_rows", Kind::kKernel, StreamOf(stream));
  Read(list.pair_code, 4 * pairs);
  Read(list.pair_pos, 4 * pairs);
  Read(list.group_begin, 4 * int64_t{list.num_groups});
  Read(list.tile_offset, 4 * (int64_t{list.num_groups} + 1));
  Write(list.pair_row, 4 * pairs);
  return cudaSuccess;
}

// signal.cu / barrier.cuh barrier_thread: the cached rank and group, the fault record (aborted,
// signalled), the count of barriers passed, the signatures, its flag at every member and its own
// flags.
cudaError_t barrier(const BarrierParams& b, cudaStream_t stream) {
  expect(b.num_members > 0 && b.num_members <= kMaxPeers && b.rank >= 0 &&
             b.rank < b.num_members && b.error == world.device->error,
         "barrier's preconditions");
  trace.barriers.push_back({b.end != 0, b.epoch, b.passed, b.rank_value, b.group_value,
                            b.signatures[b.rank] != nullptr});
  const bool failed = Fails("barrier", Kind::kBarrier, stream);
  BarrierWithPeers(b.end != 0, !failed, stream, [&] {
    if (b.rank_value != nullptr) Read(b.rank_value, 4);
    if (b.group_value != nullptr) Read(b.group_value, 4);
    Read(b.error, sizeof(DeviceError));
    Write(b.error, sizeof(DeviceError));
    if (b.passed != nullptr) Write(b.passed, 8);
    for (int m = 0; m < b.num_members; ++m) {
      Write(b.signals[m] + b.rank, 8);
      if (b.signatures[m] != nullptr) Touch(b.signatures[m], 8, kEveryPart, m == b.rank);
    }
    Read(b.signals[b.rank], 8 * int64_t{b.num_members});
  });
  return failed ? kInjected : cudaSuccess;
}

// dispatch.cu fetch_rows: the pairs' codes and rows, each source's rows in [first, end), into
// the chunk's rows of those sources.
cudaError_t fetch_rows(const FetchParams& p, cudaStream_t stream) {
  expect(p.pairs.num_sources > 0 && p.pairs.num_sources <= kMaxPeers && 0 <= p.first_source &&
             p.first_source <= p.end_source && p.end_source <= p.pairs.num_sources &&
             p.row_bytes > 0 && p.row_bytes % 4 == 0 && p.max_sms >= 0,
         "fetch_rows' preconditions");
  const int64_t chunk_rows = p.pairs.row_end - p.pairs.row_begin;
  const int32_t chunk = static_cast<int32_t>(p.pairs.row_begin / std::max<int64_t>(chunk_rows, 1));
  const int32_t source = p.end_source == p.first_source + 1 ? p.first_source : kNone;
  if (Fails("fetch_rows", Kind::kKernel, stream, source, chunk)) return kInjected;
  if (p.end_source == p.first_source || p.pairs.num_tokens == 0) return cudaSuccess;
  Push("fetch_rows", Kind::kKernel, StreamOf(stream), source, chunk);
  const int64_t pairs = int64_t{p.pairs.num_sources} * p.pairs.num_tokens * p.pairs.top_k;
  Read(p.pairs.pair_code, 4 * pairs);
  Read(p.pairs.pair_row, 4 * pairs);
  uint32_t rows = 0;
  for (int s = p.first_source; s < p.end_source; ++s) {
    Read(p.sources[s], p.pairs.num_tokens * p.row_bytes);
    rows |= RowsFrom(s);
  }
  Write(p.rows, chunk_rows * p.row_bytes, rows);
  return cudaSuccess;
}

// expert_gemm.cu: pair rows (A) by tiles of `only_source` times the experts' weights, or a weight
// gradient over the chunk's rows (with skip_rows only the groups without rows: their zeros),
// from and into the carry; the epilogues.
cudaError_t expert_gemm(DType dtype, Major a_major, Major b_major, const GemmParams& p,
                        int num_sms, cudaStream_t stream) {
  const int32_t tile_n = expert_gemm_tile_n(dtype);
  expect(Serves(a_major, b_major, p.epilogue) && num_sms > 0 &&
             p.tile_m == expert_gemm_tile_m(dtype) &&
             p.num_groups > 0 && p.num_groups <= kMaxExpertsHere &&
             (p.only_source == kAllSources || p.shape == GemmShape::kPairRows) &&
             p.chunk.tiles > 0 && p.chunk.index >= 0 &&
             (p.part == ReductionPart::kEveryGroup) == (p.carry == nullptr) &&
             (p.part == ReductionPart::kEveryGroup || p.shape == GemmShape::kPairReduction) &&
             (!p.skip_rows || p.shape == GemmShape::kPairReduction) &&
             (p.epilogue != Epilogue::kActivationBackward ||
              p.num_partials == (p.n + tile_n - 1) / tile_n),
         "expert_gemm's preconditions");
  if (Fails(GemmName(p), Kind::kKernel, stream, p.only_source, p.chunk.index)) return kInjected;
  Push(GemmName(p), Kind::kKernel, StreamOf(stream), p.only_source, p.chunk.index);
  const int64_t rows = p.chunk.rows(p.tile_m), w = Width(dtype);
  ReadGroups(p, p.shape == GemmShape::kPairRows);
  if (p.shape == GemmShape::kPairRows) {
    const uint32_t part = TileRows(p.only_source);
    Read(p.a.data, rows * p.a.ld * w, part);
    ReadExperts(p.b, w);
    if (p.epilogue == Epilogue::kStoreF32) Write(p.out, rows * p.out_ld * 4, part);
    else EpilogueRows(dtype, p, part, rows);
    return cudaSuccess;
  }
  if (!p.skip_rows) {
    Carry(p);
    Read(p.a.data, rows * p.a.ld * w);
    Read(p.b.data, rows * p.b.ld * w);
    if (p.carry != nullptr) {
      Read(p.carry, int64_t{p.m} * p.n * 4);
      Write(p.carry, int64_t{p.m} * p.n * 4);
    }
  }
  if (p.partials[0] == nullptr) {  // kStoreExpert's NaN after an aborted barrier
    expect(p.aborted == &world.device->error->aborted,
           "a weight gradient that cannot tell an aborted call (its zeros would look summed)");
    Read(p.aborted, 4);
  }
  StoreExpert(p, w);
  return cudaSuccess;
}

// grouped_gemm_sm90.cu: its workspace (the problem arrays, CUTLASS's own); pair rows of
// `only_source` (none for the spanning phase, which launches nothing) into float32 rows, or a
// weight gradient: the groups whole in the chunk into the output, a carried one into the carry
// (and finish_carry's store).
cudaError_t grouped_gemm(DType dtype, Major b_major, const GemmParams& p, void* workspace,
                         int device, int num_sms, cudaStream_t stream) {
  const bool reduction = p.shape == GemmShape::kPairReduction;
  expect(dtype != DType::kF32 && p.a.source == RowSource::kPair && p.num_groups > 0 &&
             p.num_groups <= kMaxExpertsHere && device == world.device->ordinal &&
             (reduction ? p.epilogue == Epilogue::kStoreExpert && p.partials[0] == nullptr &&
                              p.b.source == RowSource::kPair && b_major == Major::kMN &&
                              (p.part == ReductionPart::kEveryGroup || p.carry != nullptr)
                        : p.epilogue == Epilogue::kStoreF32 && p.b.source == RowSource::kExpert),
         "grouped_gemm's preconditions");
  const char* name = reduction ? "grouped_gemm (weight gradient)" : "grouped_gemm (float32 rows)";
  if (Fails(name, Kind::kKernel, stream, p.only_source, p.chunk.index)) return kInjected;
  if (!reduction && p.only_source == kSpanningSources) return cudaSuccess;
  Push(name, Kind::kKernel, StreamOf(stream), p.only_source, p.chunk.index);
  const int64_t rows = p.chunk.rows(p.tile_m), w = Width(dtype);
  // The problem arrays and CUTLASS's own, written then read.
  Write(workspace, grouped_gemm_workspace_bytes(p.num_groups, num_sms));
  Read(workspace, grouped_gemm_workspace_bytes(p.num_groups, num_sms));
  ReadGroups(p, !reduction);
  if (!reduction) {
    const uint32_t part = SourceRows(p.only_source);
    Read(p.a.data, rows * p.a.ld * w, part);
    ReadExperts(p.b, w);
    Write(p.out, rows * p.out_ld * 4, part);
    return cudaSuccess;
  }
  Carry(p);
  Read(p.a.data, rows * p.a.ld * w);
  Read(p.b.data, rows * p.b.ld * w);
  if (p.part == ReductionPart::kEveryGroup) {
    StoreExpert(p, w);
    return cudaSuccess;
  }
  Read(p.carry, int64_t{p.m} * p.n * 4);
  Write(p.carry, int64_t{p.m} * p.n * 4);
  if (p.part == ReductionPart::kContinued) StoreExpert(p, w);
  return cudaSuccess;
}

// activation.cu / row_passes.cuh: the float32 rows of `only_source` (nothing for the spanning
// phase) through GEMM1's or the u GEMM's epilogue.
cudaError_t activation_pass(DType dtype, const RowPass& q, int num_sms, cudaStream_t stream) {
  const GemmParams& p = q.gemm;
  const int32_t columns = expert_gemm_tile_n(dtype);
  expect(num_sms > 0 && dtype != DType::kF32 &&
             (p.epilogue == Epilogue::kActivation ||
              (p.epilogue == Epilogue::kActivationBackward &&
               p.num_partials == (p.n + columns - 1) / columns)),
         "activation_pass' preconditions");
  if (Fails("activation_pass", Kind::kKernel, stream, p.only_source, p.chunk.index))
    return kInjected;
  if (p.only_source == kSpanningSources) return cudaSuccess;
  Push("activation_pass", Kind::kKernel, StreamOf(stream), p.only_source, p.chunk.index);
  const int64_t rows = p.chunk.rows(p.tile_m);
  const uint32_t part = SourceRows(p.only_source);
  const int64_t width = p.epilogue == Epilogue::kActivation ? p.n + p.n_split : p.n;
  ReadGroups(p, true);
  Read(q.rows, rows * width * 4, part);
  EpilogueRows(dtype, p, part, rows);
  return cudaSuccess;
}

// combine.cu / slot_sums.cuh scatter_slots: the pairs, the members' abort flags, the chunk's rows
// (and dot partials), each source's expert_weights; this device's slots of each source's staging
// (the sums of earlier chunks read back) and its pairs' d_expert_weights.
cudaError_t scatter_slots(DType dtype, const ScatterParams& p, cudaStream_t stream) {
  expect(p.pairs.num_sources > 0 && p.pairs.num_sources <= kMaxPeers &&
             p.pairs.top_k <= kMaxTopK,
         "scatter_slots' preconditions");
  const int64_t chunk_rows = p.pairs.row_end - p.pairs.row_begin;
  const int32_t chunk = static_cast<int32_t>(p.pairs.row_begin / std::max<int64_t>(chunk_rows, 1));
  if (Fails(kScatter, Kind::kKernel, stream, kNone, chunk)) return kInjected;
  Push(kScatter, Kind::kKernel, StreamOf(stream), kNone, chunk);
  const int64_t tokens = p.pairs.num_tokens, k = p.pairs.top_k;
  const int64_t pairs = p.pairs.num_sources * tokens * k;
  const int64_t weights = p.weights_f32 ? 4 : Width(dtype);
  Read(p.pairs.pair_code, 4 * pairs);
  Read(p.pairs.pair_row, 4 * pairs);
  if (p.flags != nullptr) Read(p.flags, 8 * int64_t{p.pairs.num_sources});
  Read(p.rows, chunk_rows * p.hidden * 4);
  if (p.dot_partial != nullptr) Read(p.dot_partial, chunk_rows * p.num_partials * 4);
  for (int s = 0; s < p.pairs.num_sources; ++s) {
    if (p.weighted) Read(p.weights[s], tokens * k * weights);
    if (p.pairs.row_begin > 0)  // the sums of earlier chunks' rows, which chunk 0 has none of
      Read(p.staging[s], tokens * p.num_slots * p.hidden * 4, Mine());
    Write(p.staging[s], tokens * p.num_slots * p.hidden * 4, Mine());
    if (p.dot_partial != nullptr) Write(p.d_weights[s], tokens * k * weights, Mine());
  }
  return cudaSuccess;
}

// combine_slots: this device's ids (and with a plan the pairs' devices), its staging and the
// abort flag; y or dx, and NaN into d_expert_weights.
cudaError_t combine_slots(DType dtype, const CombineParams& p, cudaStream_t stream) {
  if (Fails("combine_slots", Kind::kKernel, stream)) return kInjected;
  Push("combine_slots", Kind::kKernel, StreamOf(stream));
  const int64_t tokens = p.num_tokens, k = p.top_k;
  Read(p.ids, 4 * tokens * k);
  if (p.pair_device != nullptr) Read(p.pair_device, 4 * tokens * k);
  Read(p.staging, tokens * p.num_slots * p.hidden * 4);
  Read(p.aborted, 4);
  Write(p.out, tokens * p.hidden * Width(dtype));
  if (p.d_weights != nullptr) Write(p.d_weights, tokens * k * (p.weights_f32 ? 4 : Width(dtype)));
  return cudaSuccess;
}

// sum_partials: each own expert's plan slots' partials, the plan's workers and the abort flag;
// the weight gradients.
cudaError_t sum_partials(DType dtype, const PartialSumParams& p, cudaStream_t stream) {
  expect(p.experts > 0 && p.experts <= 65535 && p.slots > 0, "sum_partials' preconditions");
  if (Fails("sum_partials", Kind::kKernel, stream)) return kInjected;
  Push("sum_partials", Kind::kKernel, StreamOf(stream));
  const int64_t experts = p.experts, w = Width(dtype);
  Read(p.partials, experts * p.slots * (p.in_elements + p.out_elements) * 4);
  Read(p.workers, 4 * experts * p.slots);
  Read(p.aborted, 4);
  Write(p.dw_in, experts * p.in_elements * w);
  Write(p.dw_out, experts * p.out_elements * w);
  return cudaSuccess;
}

}  // namespace ccf::cuda

// ---------------------------------------------------------------------------------------------
// The configurations.

namespace {

// How the call meets its peers (cuda_peers.cc's ConnectPeers); the shape per D keeps the worst
// case at a few M-tiles over the groups' padding.
struct Group {
  const char* name;
  int devices;
  int rank;  // -1: every device of the group in this call
  bool across_processes;
  int64_t tokens, k, experts_local;
};

const Group kGroups[] = {
    {"one device", 1, -1, false, 96, 2, 3},
    {"D=2 emulated", 2, -1, false, 64, 2, 2},
    {"D=8 emulated", 8, -1, false, 48, 2, 1},
    {"D=2 in one process, rank 1", 2, 1, false, 64, 2, 2},
    {"D=8 in one process, rank 5", 8, 5, false, 48, 2, 1},
    {"D=2 across processes, rank 0", 2, 0, true, 64, 2, 2},
    {"D=8 across processes, rank 3", 8, 3, true, 48, 2, 1},
};

enum class Kernels { kF32, kBf16, kBf16Grouped };
enum class Residuals { kRecompute, kKept, kPlan };
enum class Budget { kOneChunk, kTwoTiles, kOneTile };
const char* const kKernelNames[] = {"float32", "bfloat16", "bfloat16 on grouped GEMMs"};
const char* const kResidualNames[] = {"h recomputed", "h kept", "a plan"};
const char* const kBudgetNames[] = {"one chunk", "two M-tiles a chunk", "one M-tile a chunk"};

struct Setting {
  bool backward;
  const Group* group;
  Kernels kernels;
  Residuals residuals;
  Budget budget;
  const char* phases;  // JAX_CCFUSER_SOURCE_PHASES, or null: unset
  int64_t tokens, experts_local;
  const char* family;  // a shape past the matrix, or null
  bool frozen = false;  // a backward wanting no weight gradients (Call::weight_grads)

  std::string Name() const {
    return std::string(backward ? "backward, " : "forward, ") + group->name + ", " +
           kKernelNames[static_cast<int>(kernels)] + ", " +
           kResidualNames[static_cast<int>(residuals)] + ", " +
           kBudgetNames[static_cast<int>(budget)] + ", T=" + std::to_string(tokens) +
           ", E_local=" + std::to_string(experts_local) + ", source phases " +
           (phases == nullptr ? "unset" : phases) + (frozen ? ", frozen experts" : "");
  }
};

constexpr int kSlots = 2;         // a plan's
constexpr int64_t kKeptRows = 40;  // C
constexpr int kSms = 132;
constexpr uint64_t kBarriersBefore = 41;  // the site's count before the call

std::string Device(int dev, const char* what) {
  return "device " + std::to_string(dev) + "'s " + what;
}

// One configuration: the call as the handler builds it (moe_cuda.cc's Prepare, cuda_peers.cc's
// ConnectPeers), and its runs.
class Case {
 public:
  explicit Case(const Setting& s);
  void CheckScratch();
  // The successful run's trace and barriers are what each failing run is held to.
  void CheckSuccess();
  void CheckWeightGradients();
  void CheckFailure(int fail_at);
  int calls() const { return calls_; }

 private:
  ccf::Launcher Run(int fail_at);
  int64_t CarvedBytes(int32_t tiles) const;
  void NameScratch();
  void ConnectEmulated(const ccf::PeerBuffers& own, int64_t partials);
  void ConnectInProcess(const ccf::PeerBuffers& own, int64_t partials);
  void ConnectAcrossProcesses(const ccf::PeerBuffers& own);
  void DescribePeers();
  void CheckOrder(int64_t side_ops);
  void CheckWrittenBeforeRead();
  void CheckScratchRead();
  void CheckBarriers();
  int64_t Unjoined() const { return trace.streams[kSide][kSide] - trace.streams[kXla][kSide]; }

  Setting s_;
  Memory memory_;
  ccf::Call c_;
  ccf::DeviceState me_;
  ccf::SitePlace place_;
  XLA_FFI_Buffer rank_{}, group_{};
  ccf::ForwardScratch forward_{};
  ccf::BackwardScratch backward_{};
  char* scratch_ = nullptr;
  std::vector<Buffer> regions_;  // the carve's, named
  int64_t budget_ = 0, bytes_ = 0, worst_tiles_ = 0;
  bool pipelined_ = false;
  void *out_ = nullptr, *d_weights_ = nullptr, *dw_in_ = nullptr, *dw_out_ = nullptr;
  // What the call writes before it reads it: by region, whether it holds a chunk's pair rows.
  std::map<const char*, bool> produced_;
  std::vector<BarrierCall> barriers_;  // what the group expects of this call
  int calls_ = 0;
  uint64_t barriers_after_ = 0;
};

Case::Case(const Setting& s) : s_(s) {
  const Group& g = *s.group;
  const bool emulating = g.rank < 0, planned = s.residuals == Residuals::kPlan;
  const bool f32 = s.kernels == Kernels::kF32;
  if (s.phases != nullptr) setenv("JAX_CCFUSER_SOURCE_PHASES", s.phases, 1);
  else unsetenv("JAX_CCFUSER_SOURCE_PHASES");

  ccf::MoeDims& d = c_.d;
  d.tokens = s.tokens;
  d.hidden = 64;
  d.k = g.k;
  d.ffn = 160;  // two N-tiles of dot partials
  d.experts_local = s.experts_local;
  d.num_devices = g.devices;
  d.experts_total = d.group_experts();
  d.activation = f32 ? ccf::Activation::kGelu : ccf::Activation::kSwiglu;
  d.gate_ffn = (ccf::IsGated(d.activation) ? 2 : 1) * d.ffn;
  d.slots = static_cast<int>(std::min<int64_t>(d.k, d.num_devices));
  d.x_type = d.w_type = f32 ? xla::ffi::DataType::F32 : xla::ffi::DataType::BF16;
  d.weights_type = xla::ffi::DataType::F32;
  const int64_t x_width = f32 ? 4 : 2, weights_width = 4;
  const int64_t devices_here = emulating ? g.devices : 1;  // stacked in this call's operands
  const int64_t experts = d.group_experts();

  me_.num_sms = kSms;
  me_.side = world.side;
  for (size_t i = 0; i < me_.fetched.size(); ++i)
    me_.fetched[i] = reinterpret_cast<cudaEvent_t>(uintptr_t{0x3000} + i);
  me_.error = reinterpret_cast<ccf::cuda::DeviceError*>(
      memory_.Take("the fault record", sizeof(ccf::cuda::DeviceError)));
  world.device = &me_;
  world.me = g.rank;

  if (planned) {
    c_.plan.slots = kSlots;
    c_.plan.workers = reinterpret_cast<const int32_t*>(
        memory_.Take("the plan's workers", 4 * experts * kSlots));
    c_.plan.bounds = reinterpret_cast<const int32_t*>(
        memory_.Take("the plan's bounds", 4 * experts * (kSlots + 1)));
  }
  if (s.residuals == Residuals::kKept) {
    c_.kept_rows = kKeptRows;
    c_.kept = reinterpret_cast<float*>(
        memory_.Take("the kept h rows", 4 * devices_here * kKeptRows * d.gate_ffn));
  }
  c_.own_experts = static_cast<int32_t>(emulating ? experts : d.experts_local);
  c_.experts_here = planned ? static_cast<int32_t>(experts) : c_.own_experts;
  c_.weight_grads = !s.frozen;
  c_.grouped_gemms = s.kernels == Kernels::kBf16Grouped;
  c_.num_sms = kSms;
  c_.fetching_sms = std::max(1, kSms - kSms / 8);
  // Every pair of the group here, each group's last M-tile partly filled.
  const int64_t tile_m = ccf::cuda::expert_gemm_tile_m(f32 ? DType::kF32 : DType::kBF16);
  worst_tiles_ = (d.num_devices * d.tokens * d.k +
                  int64_t{c_.experts_here} * (planned ? kSlots : 1) * (tile_m - 1)) / tile_m;
  pipelined_ = d.num_devices > 1 &&
               (s.phases != nullptr ? std::string(s.phases) == "1"
                                    : d.tokens * d.k >= ccf::kPhaseRows * d.experts_total);

  // The budget: none to speak of, the bytes of two M-tiles' chunks, or one byte.
  budget_ = s.budget == Budget::kOneChunk   ? int64_t{1} << 40
            : s.budget == Budget::kTwoTiles ? CarvedBytes(2)
                                            : 1;
  bytes_ = ccf::SizeChunks(&c_, budget_, s.backward);
  scratch_ = memory_.Raw(bytes_);
  ccf::Arena arena{scratch_};
  if (s.backward) backward_ = ccf::CarveBackward(c_, arena);
  else forward_ = ccf::CarveForward(c_, arena);
  if (static_cast<int64_t>(arena.used) != bytes_)
    fail("the carve takes " + std::to_string(arena.used) + " bytes, SizeChunks sized " +
         std::to_string(bytes_));
  NameScratch();

  // The operands, stacked by device when emulating.
  ccf::PeerBuffers own;
  const int64_t n = devices_here;
  own.x = memory_.Take("x", n * d.tokens * d.hidden * x_width);
  own.ids = reinterpret_cast<const int32_t*>(memory_.Take("expert_ids", n * d.tokens * d.k * 4));
  own.weights = memory_.Take("expert_weights", n * d.tokens * d.k * weights_width);
  own.w_in = memory_.Take("w_in", n * d.experts_local * d.hidden * d.gate_ffn * x_width);
  own.w_out = memory_.Take("w_out", n * d.experts_local * d.ffn * d.hidden * x_width);
  own.staging = reinterpret_cast<float*>(
      memory_.Take("staging", n * d.tokens * d.slots * d.hidden * 4));
  if (s.backward) {
    own.dy = memory_.Take("dy", n * d.tokens * d.hidden * x_width);
    own.d_weights = memory_.Take("d_expert_weights", n * d.tokens * d.k * weights_width);
    dw_in_ = memory_.Take("dw_in", c_.own_experts * d.hidden * d.gate_ffn * x_width);
    dw_out_ = memory_.Take("dw_out", c_.own_experts * d.ffn * d.hidden * x_width);
  }
  out_ = memory_.Take(s.backward ? "dx" : "y", n * d.tokens * d.hidden * x_width);
  d_weights_ = own.d_weights;
  // ConnectPeers' own part, then each way of meeting the peers.
  c_.w_in = own.w_in;
  c_.w_out = own.w_out;
  c_.own_ids = own.ids;
  c_.own_staging = own.staging;
  c_.own_d_weights = own.d_weights;
  const int64_t partials = d.experts_local * kSlots * d.expert_elements();
  if (emulating) ConnectEmulated(own, partials);
  else if (g.across_processes) ConnectAcrossProcesses(own);
  else ConnectInProcess(own, partials);
  produced_[memory_.Find(c_.own_staging)->at] = false;
  for (const ccf::Call::Staged& copy : c_.staged)
    produced_[static_cast<const char*>(copy.to)] = false;
  rank_ = {XLA_FFI_Buffer_STRUCT_SIZE, nullptr, XLA_FFI_DataType_S32,
           memory_.Take("the rank operand", 4), 0, nullptr};
  group_ = {XLA_FFI_Buffer_STRUCT_SIZE, nullptr, XLA_FFI_DataType_S32,
            memory_.Take("the group operand", 4), 0, nullptr};
  if (!emulating) {
    // Across processes the count lives in the region, raised by the barriers on the GPU.
    const bool ipc = g.across_processes;
    barriers_ = {{false, ipc ? 0 : kBarriersBefore + 1, c_.barrier.passed,
                  static_cast<const int32_t*>(rank_.data),
                  static_cast<const int32_t*>(group_.data), ipc},
                 {true, ipc ? 0 : kBarriersBefore + 2, c_.barrier.passed, nullptr, nullptr, false}};
    barriers_after_ = kBarriersBefore + (ipc ? 0 : 2);
    DescribePeers();
  }
}

// The bytes of the scratch at `tiles` M-tiles a chunk.
int64_t Case::CarvedBytes(int32_t tiles) const {
  ccf::Call c = c_;
  c.chunk_tiles = tiles;
  ccf::Arena sizing{nullptr};
  if (s_.backward) ccf::CarveBackward(c, sizing);
  else ccf::CarveForward(c, sizing);
  return static_cast<int64_t>(sizing.used);
}

void Case::ConnectEmulated(const ccf::PeerBuffers& own, int64_t partials) {
  const ccf::MoeDims& d = c_.d;
  const int64_t x_width = xla::ffi::ByteWidth(d.x_type);
  for (int dev = 0; dev < d.num_devices; ++dev) {  // moe_call.cc's EmulatedPeer
    ccf::PeerBuffers b;
    auto at = [&](const void* base, int64_t bytes) {
      return static_cast<const char*>(base) + dev * bytes;
    };
    b.x = at(own.x, d.tokens * d.hidden * x_width);
    b.ids = reinterpret_cast<const int32_t*>(at(own.ids, d.tokens * d.k * 4));
    b.weights = at(own.weights, d.tokens * d.k * 4);
    b.w_in = at(own.w_in, d.experts_local * d.hidden * d.gate_ffn * x_width);
    b.w_out = at(own.w_out, d.experts_local * d.ffn * d.hidden * x_width);
    b.staging = own.staging + dev * d.tokens * d.slots * d.hidden;
    if (own.dy != nullptr) {
      b.dy = at(own.dy, d.tokens * d.hidden * x_width);
      b.d_weights = const_cast<char*>(at(own.d_weights, d.tokens * d.k * 4));
    }
    if (backward_.partials != nullptr) b.partials = backward_.partials + dev * partials;
    c_.peers.push_back(b);
  }
  c_.me = -1;
  c_.first_expert = 0;
  c_.own_tokens = d.num_devices * d.tokens;
}

// The peers publish their buffers and flags (cuda_peers.cc's ConnectInProcess, JoinGroup).
void Case::ConnectInProcess(const ccf::PeerBuffers& own, int64_t partials) {
  const ccf::MoeDims& d = c_.d;
  const int rank = s_.group->rank;
  const int64_t x_width = xla::ffi::ByteWidth(d.x_type);
  for (int dev = 0; dev < d.num_devices; ++dev) {
    ccf::PeerBuffers b = own;
    if (dev != rank) {
      b.x = memory_.Take(Device(dev, "x"), d.tokens * d.hidden * x_width);
      b.ids = reinterpret_cast<const int32_t*>(
          memory_.Take(Device(dev, "expert_ids"), d.tokens * d.k * 4));
      b.weights = memory_.Take(Device(dev, "expert_weights"), d.tokens * d.k * 4);
      b.w_in = memory_.Take(Device(dev, "w_in"),
                            d.experts_local * d.hidden * d.gate_ffn * x_width);
      b.w_out = memory_.Take(Device(dev, "w_out"), d.experts_local * d.ffn * d.hidden * x_width);
      b.staging = reinterpret_cast<float*>(
          memory_.Take(Device(dev, "staging"), d.tokens * d.slots * d.hidden * 4));
      if (own.dy != nullptr) {
        b.dy = memory_.Take(Device(dev, "dy"), d.tokens * d.hidden * x_width);
        b.d_weights = memory_.Take(Device(dev, "d_expert_weights"), d.tokens * d.k * 4);
      }
      if (backward_.partials != nullptr)
        b.partials = reinterpret_cast<float*>(
            memory_.Take(Device(dev, "weight-gradient partials"), 4 * partials));
    } else {
      b.partials = backward_.partials;  // published with the rest (moe_cuda.cc's Prepare)
    }
    b.signals = reinterpret_cast<uint64_t*>(
        memory_.Take(Device(dev, "barrier flags"), 8 * ccf::cuda::kMaxPeers));
    c_.peers.push_back(b);
    c_.barrier.signals[dev] = b.signals;
  }
  place_.signals = c_.peers[rank].signals;
  c_.recorded_source = rank;
}

// Every member's region of the call site: operands staged into this device's own, flags,
// signatures and the count of barriers passed there (cuda_peers.cc's ConnectIpc, RegionPeer).
void Case::ConnectAcrossProcesses(const ccf::PeerBuffers& own) {
  const ccf::MoeDims& d = c_.d;
  const int rank = s_.group->rank;
  const int64_t x_bytes = d.tokens * d.hidden * xla::ffi::ByteWidth(d.x_type);
  for (int dev = 0; dev < d.num_devices; ++dev) {
    ccf::PeerBuffers b;
    auto take = [&](const char* what, int64_t bytes) {
      return memory_.Take(Device(dev, "region's ") + what, bytes);
    };
    b.x = take("x", x_bytes);
    b.ids = reinterpret_cast<const int32_t*>(take("expert_ids", d.tokens * d.k * 4));
    b.weights = take("expert_weights", d.tokens * d.k * 4);
    b.staging = reinterpret_cast<float*>(take("staging", d.tokens * d.slots * d.hidden * 4));
    if (own.dy != nullptr) {
      b.dy = take("dy", x_bytes);
      b.d_weights = take("d_expert_weights", d.tokens * d.k * 4);
    }
    c_.peers.push_back(b);
    c_.barrier.signals[dev] =
        reinterpret_cast<uint64_t*>(take("barrier flags", 8 * ccf::cuda::kMaxPeers));
    c_.barrier.signatures[dev] = reinterpret_cast<uint64_t*>(take("signature", 8));
  }
  const ccf::PeerBuffers& mine = c_.peers[rank];
  const size_t x = x_bytes, pairs = d.tokens * d.k * 4;
  c_.staged = {{const_cast<void*>(mine.x), own.x, x},
               {const_cast<int32_t*>(mine.ids), own.ids, pairs},
               {const_cast<void*>(mine.weights), own.weights, pairs}};
  if (own.dy != nullptr) c_.staged.push_back({const_cast<void*>(mine.dy), own.dy, x});
  c_.own_staging = mine.staging;
  c_.own_d_weights = mine.d_weights;
  c_.barrier.passed =
      reinterpret_cast<uint64_t*>(memory_.Take(Device(rank, "region's barriers passed"), 8));
  c_.barrier.signature = 0x5eed;
}

// JoinGroup's part, and what the members do to the buffers they share with this device.
void Case::DescribePeers() {
  const int rank = s_.group->rank;
  const ccf::MoeDims& d = c_.d;
  ccf::cuda::BarrierParams& b = c_.barrier;
  b.num_members = d.num_devices;
  b.rank = rank;
  b.timeout_ns = 1000000000;
  b.error = me_.error;
  b.expected_group = 0;
  place_.rank = rank;
  place_.barriers = kBarriersBefore;
  c_.place = &place_;
  c_.me = rank;
  c_.first_expert = c_.plan.workers ? 0 : rank * static_cast<int32_t>(d.experts_local);
  c_.own_tokens = d.tokens;

  auto whole = [&](const void* p, bool write, uint32_t part, std::vector<Access>& into) {
    if (p == nullptr) return;
    if (const Buffer* buffer = memory_.Find(p))
      into.push_back({buffer->at, buffer->bytes, part, write});
    else
      fail("a peer's buffer in no memory");
  };
  world.peers_before.clear();
  world.peers_between.clear();
  world.peers_after.clear();
  using Buffers = std::initializer_list<const void*>;
  for (int dev = 0; dev < d.num_devices; ++dev) {
    const ccf::PeerBuffers& p = c_.peers[dev];
    if (dev == rank) {
      // Their reads of this device's inputs (and with a plan its experts' weights); their parts
      // of its staging, d_expert_weights and partials.
      for (const void* input : Buffers{p.x, p.ids, p.weights, p.dy})
        whole(input, false, kEveryPart, world.peers_between);
      if (c_.plan.workers != nullptr)
        for (const void* weights : Buffers{c_.w_in, c_.w_out})
          whole(weights, false, kEveryPart, world.peers_between);
      for (const void* shared : Buffers{p.staging, p.d_weights, p.partials})
        whole(shared, true, ~Mine(), world.peers_between);
      continue;
    }
    for (const void* input : Buffers{p.x, p.ids, p.weights, p.dy, p.d_weights})
      whole(input, true, kEveryPart, world.peers_before);
    for (const void* any : Buffers{p.x, p.ids, p.weights, p.dy, p.w_in, p.w_out, p.staging,
                                   p.d_weights, p.partials})
      whole(any, true, kEveryPart, world.peers_after);
  }
}

ccf::Launcher Case::Run(int fail_at) {
  trace.Reset(fail_at);
  place_.barriers = kBarriersBefore;
  const ccf::ScalarS32 rank(&rank_), group(&group_);
  ccf::Launcher launcher;
  if (s_.backward)
    ccf::RunBackward(c_, me_, backward_, rank, group, out_, d_weights_, dw_in_, dw_out_,
                     world.xla, launcher);
  else
    ccf::RunForward(c_, me_, forward_, rank, group, out_, world.xla, launcher);
  launcher.Result();  // hands CudaFailure the status
  return launcher;
}

// SizeChunks' choice: the most M-tiles a chunk that the budget holds, or one.
void Case::CheckScratch() {
  const int32_t tiles = c_.chunk_tiles;
  const int64_t wanted = s_.budget == Budget::kOneChunk   ? worst_tiles_
                         : s_.budget == Budget::kTwoTiles ? 2
                                                          : 1;
  if (tiles != wanted)
    fail("SizeChunks took " + std::to_string(tiles) + " M-tiles a chunk, not " +
         std::to_string(wanted) + " (the worst case: " + std::to_string(worst_tiles_) + ")");
  if (tiles < worst_tiles_) {
    expect(tiles >= 1, "no M-tile a chunk");
    expect(tiles == 1 || bytes_ <= budget_, "the chunks' scratch exceeds the budget");
    expect(CarvedBytes(tiles + 1) > budget_, "a chunk of one M-tile more fits the budget");
  }
}

// Names the carved regions: inside the scratch, each one up to where the next starts, so that a
// kernel reaching past its region's end reaches no buffer.
void Case::NameScratch() {
  std::vector<std::pair<const void*, const char*>> regions;
  auto add = [&](const void* p, const char* name) {
    if (p != nullptr) regions.push_back({p, name});
  };
  auto add_rows = [&](const void* p, const char* name) {
    add(p, name);
    if (p != nullptr) produced_[static_cast<const char*>(p)] = true;
  };
  const ccf::cuda::WorkList& l = s_.backward ? backward_.list : forward_.list;
  for (auto [p, name] :
       {std::pair<const void*, const char*>{l.pair_code, "pair_code"}, {l.pair_pos, "pair_pos"},
        {l.pair_row, "pair_row"}, {l.chunk_counts, "chunk_counts"},
        {l.expert_count, "expert_count"}, {l.expert_offset, "expert_offset"},
        {l.items, "items"}, {l.group_begin, "group_begin"}, {l.group_end, "group_end"},
        {l.group_expert, "group_expert"}, {l.tile_offset, "tile_offset"},
        {l.pair_device, "pair_device"}}) {
    add(p, name);
    if (p != nullptr) produced_[static_cast<const char*>(p)] = false;
  }
  if (s_.backward) {
    const ccf::BackwardScratch& b = backward_;
    for (auto [p, name] : {std::pair<const void*, const char*>{b.x, "x rows"}, {b.dy, "dy rows"},
                           {b.h, "h rows"}, {b.aw, "w*a rows"}, {b.dh, "dh rows"},
                           {b.dot_partial, "dot partials"}, {b.rows, "dx rows"},
                           {b.u, "u rows"}})
      add_rows(p, name);
    add(b.gemm_workspace, "grouped GEMM workspace");
    add(b.carry, "carry");
    add(b.partials, "weight-gradient partials");
    if (b.partials != nullptr) produced_[reinterpret_cast<const char*>(b.partials)] = false;
  } else {
    const ccf::ForwardScratch& f = forward_;
    for (auto [p, name] : {std::pair<const void*, const char*>{f.x, "x rows"}, {f.a, "a rows"},
                           {f.rows, "y rows"}, {f.h, "h rows"}})
      add_rows(p, name);
    add(f.gemm_workspace, "grouped GEMM workspace");
  }
  std::sort(regions.begin(), regions.end());
  for (size_t i = 0; i < regions.size(); ++i) {
    const char* at = static_cast<const char*>(regions[i].first);
    const char* end = i + 1 < regions.size() ? static_cast<const char*>(regions[i + 1].first)
                                             : scratch_ + bytes_;
    if (at < scratch_ || end > scratch_ + bytes_ || at >= end) {
      fail(std::string("the scratch region of ") + regions[i].second + " lies outside it");
      continue;
    }
    memory_.Name(std::string("scratch: ") + regions[i].second, at, end - at);
    regions_.push_back({regions[i].second, at, end - at});
  }
}

// Every pair of operations on different streams that touch the same bytes, one writing, is
// ordered; of the side stream's, the first `side_ops`. The operations of stream `s` that neither
// happen before op `b` nor after it are one run: from the first `b` has not seen to the first
// that has seen `b`.
void Case::CheckOrder(int64_t side_ops) {
  std::array<std::vector<const Op*>, kStreams> on;
  for (const Op& op : trace.ops)
    if (op.stream != kSide || op.clock[kSide] <= side_ops) on[op.stream].push_back(&op);
  // The first access of `a` and `b` that meet, one writing.
  auto meet = [](const Op& a, const Op& b) -> const Access* {
    for (size_t i = a.first; i < a.end; ++i)
      for (size_t j = b.first; j < b.end; ++j) {
        const Access& x = trace.accesses[i];
        const Access& y = trace.accesses[j];
        if ((x.write || y.write) && (x.part & y.part) && x.at < y.at + y.bytes &&
            y.at < x.at + x.bytes)
          return x.at > y.at ? &x : &y;
      }
    return nullptr;
  };
  int races = 0;
  for (int t = 0; t < kStreams; ++t)
    for (const Op* b : on[t])
      for (int s = t + 1; s < kStreams; ++s)
        for (size_t n = static_cast<size_t>(b->clock[s]); n < on[s].size(); ++n) {
          const Op& a = *on[s][n];
          if (a.clock[t] >= b->clock[t]) break;
          if (const Access* x = meet(a, *b); x != nullptr && races++ < 3)
            fail(Describe(*b) + " and " + Describe(a) + " both reach " + memory_.NameOf(x->at) +
                 ", one writing, unordered");
        }
}

// What the call produces for itself is read only once written, every part of it: a chunk's pair
// rows (every source's) by operations of that chunk; the work list, the staging (this device's
// slots and its peers'), the partials and the operands staged into the region by the call. A
// launch left out shows here, where no two operations meet.
void Case::CheckWrittenBeforeRead() {
  const uint32_t sources = (1u << (2 * c_.d.num_devices)) - 1;
  std::map<std::pair<const char*, int32_t>, uint32_t> written;
  for (const Op& op : trace.ops)
    for (size_t i = op.first; i < op.end; ++i) {
      const Access& a = trace.accesses[i];
      const Buffer* buffer = memory_.Find(a.at);
      const auto produced = buffer != nullptr ? produced_.find(buffer->at) : produced_.end();
      if (produced == produced_.end()) continue;
      const bool rows = produced->second;
      const uint32_t part = rows ? a.part & sources : a.part;
      uint32_t& done = written[{buffer->at, rows ? op.chunk : -1}];
      if (a.write) done |= part;
      else if (part & ~done)
        fail(Describe(op) + " reads " + buffer->name + " before the call wrote it");
    }
}

// Every region the carve takes is read by some operation: else the call holds scratch (fewer
// rows a chunk) for nothing.
void Case::CheckScratchRead() {
  for (const Buffer& region : regions_) {
    bool read = false;
    for (const Access& a : trace.accesses)
      read |= !a.write && a.at < region.at + region.bytes && region.at < a.at + a.bytes;
    if (!read) fail("nothing reads the scratch region of " + region.name);
  }
}

// The barriers the call asked for, enqueued or not: the group's two (start, end) with their
// epochs, or none when emulating.
void Case::CheckBarriers() {
  auto list = [](const std::vector<BarrierCall>& barriers) {
    std::string s;
    for (const BarrierCall& b : barriers)
      s += std::string(s.empty() ? "" : ", ") + (b.end ? "end" : "start") + " at epoch " +
           std::to_string(b.epoch);
    return "[" + s + "]";
  };
  if (trace.barriers != barriers_)
    fail("device barriers " + list(trace.barriers) + ", not the group's " + list(barriers_) +
         " (or with other parameters)");
  if (c_.place != nullptr)
    expect(place_.barriers == barriers_after_, "the site's barrier count is off");
}

void Case::CheckSuccess() {
  where = s_.Name();
  const ccf::Launcher launcher = Run(-1);
  calls_ = trace.calls;
  expect(!launcher.failed() && trace.reported == cudaSuccess, "the call reports a failure");
  CheckOrder(trace.streams[kSide][kSide]);
  CheckWrittenBeforeRead();
  CheckScratchRead();
  if (Unjoined() > 0)
    fail(std::to_string(Unjoined()) + " operations of the side stream are not joined");
  expect(!trace.stale_wait, "a wait for an event this call never recorded");
  for (const Op& op : trace.ops)
    expect(op.kind != Kind::kAbortMark, "a successful call marked itself aborted");
  for (const Op& op : trace.ops)
    for (size_t i = op.first; i < op.end; ++i) {
      const Access& a = trace.accesses[i];
      const Buffer* b = memory_.Find(a.at);
      if (b == nullptr || a.at + a.bytes > b->at + b->bytes)
        fail(Describe(op) + " reaches " + std::to_string(a.bytes) + " bytes from " +
             (b != nullptr ? "the start of " + b->name + ", past its end"
                           : "outside every buffer"));
    }
  int64_t fetches = 0, waits = 0;
  std::vector<int32_t> scattered;
  for (const Op& op : trace.ops) {
    fetches += op.stream == kSide && op.kind == Kind::kKernel;
    waits += op.kind == Kind::kWait;
    if (op.name == kScatter) scattered.push_back(op.chunk);
  }
  const int64_t chunks = (worst_tiles_ + c_.chunk_tiles - 1) / c_.chunk_tiles;
  std::vector<int32_t> each(chunks);
  std::iota(each.begin(), each.end(), 0);
  if (scattered != each)
    fail("the scatters ran for chunks other than each of the worst case's " +
         std::to_string(chunks) + " in turn");
  const int64_t operands = s_.backward ? 2 : 1;
  if (fetches != (pipelined_ ? (c_.d.num_devices - 1) * operands * chunks : 0) ||
      (waits > 0) != pipelined_)
    fail("source phases " + std::string(pipelined_ ? "expected" : "not expected") + ", but " +
         std::to_string(fetches) + " fetches on the side stream");
  if (s_.backward) CheckWeightGradients();
  CheckBarriers();
}

void Case::CheckWeightGradients() {
  // Wanted, the GEMMs write them; not wanted, one memset each zeroes them and nothing else does.
  for (void* out : {dw_in_, dw_out_}) {
    const Buffer* b = memory_.Find(out);
    int64_t zeroed = 0, written_otherwise = 0;
    for (const Op& op : trace.ops)
      for (size_t i = op.first; i < op.end; ++i) {
        const Access& a = trace.accesses[i];
        if (!a.write || memory_.Find(a.at) != b) continue;
        (std::string(op.name) == "cudaMemsetAsync" ? zeroed : written_otherwise) += a.bytes;
      }
    if (s_.frozen && (zeroed != b->bytes || written_otherwise != 0))
      fail(b->name + " of frozen experts: " + std::to_string(zeroed) + " of its " +
           std::to_string(b->bytes) + " bytes zeroed, " + std::to_string(written_otherwise) +
           " written otherwise");
    if (!s_.frozen && (zeroed != 0 || written_otherwise == 0))
      fail(b->name + ": not computed");
  }
}

void Case::CheckFailure(int fail_at) {
  where = s_.Name() + "; failing call " + std::to_string(fail_at);
  const ccf::Launcher launcher = Run(fail_at);
  const Op& failed = trace.failed;
  where += ", " + Describe(failed);
  expect(launcher.failed() && trace.reported == kInjected, "the failure is not returned");
  CheckBarriers();
  // After the failure: barriers, each behind an abort mark on its stream, and event calls.
  bool marked[kStreams] = {};
  for (size_t i = trace.failed_after; i < trace.ops.size(); ++i) {
    const Op& op = trace.ops[i];
    if (op.kind == Kind::kAbortMark) marked[op.stream] = true;
    else if (op.kind == Kind::kBarrier) expect(marked[op.stream], "a barrier with no abort mark");
    else if (op.kind == Kind::kKernel || op.kind == Kind::kCopy)
      fail(Describe(op) + " enqueued after the failure");
  }
  if (Unjoined() > 0)
    fail(std::to_string(Unjoined()) + " operations of the side stream are not joined");
  CheckOrder(trace.streams[kSide][kSide]);
}

}  // namespace

int main() {
  std::vector<Setting> settings;
  for (bool backward : {false, true})
    for (const Group& g : kGroups)
      for (Kernels kernels : {Kernels::kF32, Kernels::kBf16, Kernels::kBf16Grouped})
        for (Residuals residuals : {Residuals::kRecompute, Residuals::kKept, Residuals::kPlan})
          for (Budget budget : {Budget::kOneChunk, Budget::kTwoTiles, Budget::kOneTile})
            for (const char* phases : {"0", "1"}) {
              // Peers in other processes refuse plans (moe_cuda.cc's CheckCudaLimits).
              if (residuals == Residuals::kPlan && g.across_processes) continue;
              settings.push_back({backward, &g, kernels, residuals, budget, phases, g.tokens,
                                  g.experts_local, nullptr});
            }
  // Past the matrix, in one chunk: with the setting unset, the shape decides (phases from
  // kPhaseRows rows an expert from each source on: at the threshold and one token below); and
  // one device's work list of many experts over several of the work-list kernels' chunks of
  // pairs, whose per-chunk counts outgrow a region's alignment.
  const Group& two = kGroups[1];
  const int64_t at_threshold = ccf::kPhaseRows * two.devices * two.experts_local / two.k;
  for (bool backward : {false, true})
    for (const Group* g : {&kGroups[1], &kGroups[3]})
      for (int64_t tokens : {at_threshold - 1, at_threshold})
        settings.push_back({backward, g, Kernels::kBf16Grouped, Residuals::kRecompute,
                            Budget::kOneChunk, nullptr, tokens, g->experts_local,
                            "source phases by the shape"});
  for (bool backward : {false, true})
    for (Kernels kernels : {Kernels::kF32, Kernels::kBf16Grouped})
      settings.push_back({backward, &kGroups[0], kernels, Residuals::kRecompute,
                          Budget::kOneChunk, "0", 700, 64, "many experts"});
  // A backward whose weight gradients are not wanted, in one and in several chunks.
  for (const Group& g : kGroups)
    for (Kernels kernels : {Kernels::kF32, Kernels::kBf16Grouped})
      for (Residuals residuals : {Residuals::kRecompute, Residuals::kPlan})
        for (Budget budget : {Budget::kOneChunk, Budget::kOneTile}) {
          if (residuals == Residuals::kPlan && g.across_processes) continue;
          settings.push_back({true, &g, kernels, residuals, budget, "1", g.tokens,
                              g.experts_local, "frozen experts", true});
        }

  int64_t cases = 0, injected = 0;
  for (size_t i = 0; i < settings.size();) {
    // A verdict per direction and way of meeting the peers, or shape past the matrix.
    const Setting& first = settings[i];
    const int before = errors;
    int64_t group_cases = 0, group_injected = 0;
    for (; i < settings.size() && settings[i].backward == first.backward &&
           settings[i].family == first.family &&
           (first.family != nullptr || settings[i].group == first.group);
         ++i) {
      where = settings[i].Name();
      Case c(settings[i]);
      c.CheckScratch();
      c.CheckSuccess();
      for (int n = 0; n < c.calls(); ++n) c.CheckFailure(n);
      ++group_cases;
      group_injected += c.calls();
    }
    cases += group_cases;
    injected += group_injected;
    if (errors == before)
      std::printf("%s, %s: %lld configurations, %lld failures injected: ok\n",
                  first.backward ? "backward" : "forward",
                  first.family != nullptr ? first.family : first.group->name,
                  static_cast<long long>(group_cases), static_cast<long long>(group_injected));
  }
  std::printf("configurations: %lld, failures injected: %lld\n", static_cast<long long>(cases),
              static_cast<long long>(injected));
  std::printf("errors: %d\n", errors);
  return errors == 0 ? 0 : 1;
}
