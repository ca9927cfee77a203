#include "xla_ffi/cuda/cuda_launch.h"

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "common/activation.h"

namespace ffi = xla::ffi;

namespace ccf {
namespace {

cuda::DType ToDType(ffi::DataType t) {
  return t == ffi::DataType::F32 ? cuda::DType::kF32
         : t == ffi::DataType::BF16 ? cuda::DType::kBF16
                                    : cuda::DType::kF16;
}

// The first device whose tokens and experts this call serves: its rank, or 0 when emulating
// (every device's).
int32_t FirstOwnDevice(const Call& c) { return std::max(c.me, 0); }

int32_t TileM(const Call& c) { return cuda::expert_gemm_tile_m(ToDType(c.d.x_type)); }

int64_t NumGroups(const Call& c) {
  return c.plan.workers != nullptr ? int64_t{c.experts_here} * c.plan.slots : c.experts_here;
}

// The M-tiles of the worst case: every pair of the list computed here, each group's last tile
// partly filled.
int64_t WorstTiles(const Call& c) {
  const int64_t pairs = c.d.num_devices * c.d.tokens * c.d.k;
  return (pairs + NumGroups(c) * (TileM(c) - 1)) / TileM(c);
}

int64_t NumChunks(const Call& c) { return (WorstTiles(c) + c.chunk_tiles - 1) / c.chunk_tiles; }

// The scratch rows of one chunk.
int64_t ChunkRows(const Call& c) { return cuda::Chunk{c.chunk_tiles, 0}.rows(TileM(c)); }

cuda::WorkList CarveWorkList(const Call& c, Arena& arena) {
  const int64_t pairs = c.d.num_devices * c.d.tokens * c.d.k;
  const int64_t chunks = cuda::work_list_chunks(pairs);
  const bool planned = c.plan.workers != nullptr;
  cuda::WorkList w;
  w.pair_code = arena.Take<int32_t>(pairs);
  w.pair_pos = arena.Take<int32_t>(pairs);
  w.pair_row = arena.Take<int32_t>(pairs);
  w.chunk_counts = arena.Take<int32_t>(c.experts_here * chunks);
  w.expert_count = arena.Take<int32_t>(c.experts_here);
  w.expert_offset = planned ? arena.Take<int32_t>(c.experts_here + 1) : nullptr;
  w.items = arena.Take<cuda::WorkItem>(pairs);
  w.tile_m = TileM(c);
  w.num_groups = static_cast<int32_t>(NumGroups(c));
  w.group_begin = arena.Take<int32_t>(w.num_groups);
  w.group_end = arena.Take<int32_t>(w.num_groups);
  w.group_expert = arena.Take<int32_t>(w.num_groups);
  w.tile_offset = arena.Take<int32_t>(w.num_groups + 1);
  w.pair_device = planned ? arena.Take<int32_t>(pairs) : nullptr;
  return w;
}

cuda::Routing MakeRouting(const Call& c, DeviceState& me) {
  cuda::Routing r{};
  for (int dev = 0; dev < c.d.num_devices; ++dev) r.ids[dev] = c.peers[dev].ids;
  r.num_sources = c.d.num_devices;
  r.num_tokens = static_cast<int32_t>(c.d.tokens);
  r.top_k = static_cast<int32_t>(c.d.k);
  r.experts_per_device = static_cast<int32_t>(c.d.experts_local);
  r.first_expert = c.first_expert;
  r.num_experts_here = c.experts_here;
  r.experts_total = c.d.experts_total;
  r.aborted = &me.error->aborted;
  r.plan = c.plan;
  r.me = c.me;
  r.recorded_source = c.recorded_source;
  return r;
}

void LaunchWorkList(const Call& c, const cuda::WorkList& list, DeviceState& me,
                    cudaStream_t stream, Launcher& launcher) {
  const cuda::Routing routing = MakeRouting(c, me);
  launcher.Run("count_pairs", [&] { return cuda::count_pairs(routing, list, me.error, stream); });
  launcher.Run("scan_counts", [&] { return cuda::scan_counts(routing, list, stream); });
  launcher.Run("fill_work_list", [&] { return cuda::fill_work_list(routing, list, stream); });
  if (c.plan.workers != nullptr)
    launcher.Run("assign_plan", [&] { return cuda::assign_plan(routing, list, stream); });
  launcher.Run("place_rows", [&] { return cuda::place_rows(routing, list, stream); });
}

// The start barrier (which also checks the cached rank and group) or the end barrier of a real
// group; nothing when emulating, where stream order does the job.
void DeviceBarrier(const Call& c, DeviceState& me, const ScalarS32* rank, const ScalarS32* group,
                   cudaStream_t stream, Launcher& launcher) {
  if (c.place == nullptr) return;
  cuda::BarrierParams b = c.barrier;
  if (b.passed == nullptr) b.epoch = NextBarrier(me, *c.place);  // else counted in the region
  b.rank_value = rank ? rank->typed_data() : nullptr;
  b.group_value = group ? group->typed_data() : nullptr;
  b.end = rank == nullptr;
  if (b.end)  // peers compare signatures at the start barrier only
    for (uint64_t*& word : b.signatures) word = nullptr;
  // A launch of this call failed: the barrier gives the call up instead of telling the peers
  // that this device's part is done, and at the end still waits for them (cuda/barrier.cuh).
  if (launcher.failed())
    launcher.Always("marking the call aborted", [&] {
      return cudaMemsetAsync(&me.error->aborted, 1, sizeof(me.error->aborted), stream);
    });
  launcher.Always("barrier", [&] { return cuda::barrier(b, stream); });
}

// The start of a call: this device's operands staged where peers in other processes read them,
// d_expert_weights zeroed (peers write into it as soon as the start barrier opens), the start
// barrier, the work list.
void OpenCall(const Call& c, DeviceState& me, const cuda::WorkList& list, const ScalarS32& rank,
              const ScalarS32& group, cudaStream_t stream, Launcher& launcher) {
  for (const Call::Staged& copy : c.staged)
    launcher.Run("staging operands into the shared region", [&] {
      return cudaMemcpyAsync(copy.to, copy.from, copy.bytes, cudaMemcpyDeviceToDevice, stream);
    });
  // Backward: every (token, k) with a valid id is written by its expert's GPU; zero them anyway
  // so a failed call leaves no uninitialised memory behind.
  if (c.own_d_weights != nullptr)
    launcher.Run("zeroing d_expert_weights", [&] {
      return cudaMemsetAsync(c.own_d_weights, 0,
                             ffi::ByteWidth(c.d.weights_type) * c.own_tokens * c.d.k, stream);
    });
  DeviceBarrier(c, me, &rank, &group, stream, launcher);
  LaunchWorkList(c, list, me, stream, launcher);
}

// A GEMM on `sms` SMs (its persistent grid's size).
void LaunchGemm(const char* what, const Call& c, int sms, cuda::Major a_major,
                cuda::Major b_major, const cuda::GemmParams& params, cudaStream_t stream,
                Launcher& launcher) {
  launcher.Run(what, [&] {
    return cuda::expert_gemm(ToDType(c.d.x_type), a_major, b_major, params, sms, stream);
  });
}

// A pair-row GEMM (its A is pair rows, K-major). With grouped GEMMs: CUTLASS's into float32
// rows (the output, or for a fused epilogue `rows`, which its pass then reads); else
// expert_gemm with the epilogue fused.
void LaunchPairRows(const char* what, const Call& c, const DeviceState& me, int sms,
                    cuda::Major b_major, const cuda::GemmParams& params, float* rows,
                    void* workspace, cudaStream_t stream, Launcher& launcher) {
  if (!c.grouped_gemms) {
    LaunchGemm(what, c, sms, cuda::Major::kK, b_major, params, stream, launcher);
    return;
  }
  const cuda::DType dtype = ToDType(c.d.x_type);
  const bool fused = params.epilogue != cuda::Epilogue::kStoreF32;
  cuda::GemmParams plain = params;
  if (fused) {
    plain.epilogue = cuda::Epilogue::kStoreF32;
    plain.n = params.n + params.n_split;  // gated GEMM1: gate and up columns as stored
    plain.n_split = 0;
    plain.out = rows;
    plain.out_ld = plain.n;
  }
  launcher.Run(what, [&] {
    return cuda::grouped_gemm(dtype, b_major, plain, workspace, me.ordinal, sms, stream);
  });
  if (fused)
    launcher.Run("activation pass",
                 [&] { return cuda::activation_pass(dtype, {params, rows}, sms, stream); });
}

// A weight gradient's launches in one chunk. With a carry, the group that began in an earlier
// chunk (kContinued) reads it before the one going on into the next chunk (kBegun) overwrites it.
// With grouped GEMMs and no plan, grouped_gemm sums every group with rows (those the chunk holds
// whole, then the two carried parts) and expert_gemm only stores the zeros of the groups without
// any, in chunk 0 (cuda::GemmParams::skip_rows); else expert_gemm does it all.
void LaunchWeightGradient(const char* what, const Call& c, const DeviceState& me,
                          cuda::GemmParams& params, void* workspace, cudaStream_t stream,
                          Launcher& launcher) {
  using cuda::ReductionPart;
  const bool carried = params.carry != nullptr;
  const auto sm80 = [&](ReductionPart part) {
    params.part = part;
    LaunchGemm(what, c, c.num_sms, cuda::Major::kMN, cuda::Major::kMN, params, stream, launcher);
  };
  const auto grouped = [&](ReductionPart part) {
    params.part = part;
    launcher.Run(what, [&] {
      return cuda::grouped_gemm(ToDType(c.d.x_type), cuda::Major::kMN, params, workspace,
                                me.ordinal, c.num_sms, stream);
    });
  };
  params.skip_rows = c.grouped_gemms && c.plan.workers == nullptr;
  if (!params.skip_rows) {
    if (carried) {
      sm80(ReductionPart::kContinued);
      sm80(ReductionPart::kBegun);
    } else {
      sm80(ReductionPart::kEveryGroup);
    }
    return;
  }
  // Under a carry expert_gemm counts the groups without rows among those begun in the chunk.
  if (params.chunk.index == 0) sm80(carried ? ReductionPart::kBegun : ReductionPart::kEveryGroup);
  grouped(ReductionPart::kEveryGroup);
  if (carried) {
    grouped(ReductionPart::kContinued);
    grouped(ReductionPart::kBegun);
  }
}

// The dispatch of one operand (x, or dy): each row of sources [first, end) with pairs here read
// once out of its source's buffer into `rows`, by work-list position.
struct Fetched {
  const void* PeerBuffers::*field;
  void* rows;
};

cuda::TokenPairs PairsOf(const Call& c, const cuda::WorkList& list, cuda::Chunk chunk) {
  return {list.pair_code, list.pair_row, c.d.num_devices, static_cast<int32_t>(c.d.tokens),
          static_cast<int32_t>(c.d.k), chunk.first_row(TileM(c)), chunk.end_row(TileM(c))};
}

// `max_sms` > 0: the fetch keeps to that many SMs (cuda::FetchParams::max_sms).
void FetchRows(const Call& c, const cuda::WorkList& list, cuda::Chunk chunk,
               const Fetched& operand, int first, int end, int max_sms, cudaStream_t stream,
               Launcher& launcher) {
  cuda::FetchParams p{};
  p.max_sms = max_sms;
  p.pairs = PairsOf(c, list, chunk);
  p.first_source = first;
  p.end_source = end;
  p.row_bytes = c.d.hidden * ffi::ByteWidth(c.d.x_type);
  for (int dev = 0; dev < c.d.num_devices; ++dev) p.sources[dev] = c.peers[dev].*operand.field;
  p.rows = operand.rows;
  launcher.Run("fetching rows", [&] { return cuda::fetch_rows(p, stream); });
}

// The GEMMs over pair rows run in phases by the source of their rows: this device's own first,
// then each peer's in ring order (me + 1, me + 2, ...), then the tiles whose rows span two
// sources. The peers' rows are fetched on the device's side stream in that order, an event
// after each peer's, which the GEMMs of its phase wait for: a peer's rows cross the link while
// the GEMMs work on those already here, and the members of a group read from different peers at
// any one time. Emulated peers run the same phases from source 0 on (one memory, so nothing to
// hide there, but one GPU then runs the sequence D GPUs run).
//
// Phases pay only where each phase's GEMMs still do enough work per byte of weights: every
// phase reads all of the call's expert weights once more, and an expert holds T*K/E rows from
// one source on average. Below kPhaseRows of them the GEMMs wait on those reads: on an H200 at
// Mixtral-8x7B's shape with T = 512 per device (128 rows an expert from each of D = 8
// sources) the forward's grouped GEMMs took 10.0 ms in phases, 2.7 times the dense GEMM of their
// FLOPs. Fewer rows: one phase, after every source's rows are in (the fetch then hides behind
// nothing). JAX_CCFUSER_SOURCE_PHASES=1 asks for phases whatever the shape, =0 for none (the
// tests run both; the results are bitwise alike).
bool SourcePhasesPay(const MoeDims& d) {
  const char* env = std::getenv("JAX_CCFUSER_SOURCE_PHASES");
  const std::string asked = env != nullptr ? env : "";
  if (asked == "0" || asked == "1") return asked == "1";
  return d.tokens * d.k >= kPhaseRows * d.experts_total;
}

class SourcePhases {
 public:
  SourcePhases(const Call& c, DeviceState& me)
      : c_(c),
        me_(me),
        devices_(c.d.num_devices),
        first_(FirstOwnDevice(c)),
        pipelined_(devices_ > 1 && SourcePhasesPay(c.d)) {}

  int size() const { return pipelined_ ? devices_ + 1 : 1; }

  // The rows phase `phase` computes (GemmParams::only_source).
  int32_t source(int phase) const {
    if (!pipelined_) return cuda::kAllSources;
    return phase == devices_ ? cuda::kSpanningSources : (first_ + phase) % devices_;
  }

  // Enqueues the fetch of every phase's rows of `operands` in `chunk`: the own rows on `stream`,
  // the peers' on the side stream from this point of `stream` on (the work list is built, the
  // previous chunk's GEMMs are done with the scratch).
  void Fetch(std::initializer_list<Fetched> operands, const cuda::WorkList& list,
             cuda::Chunk chunk, cudaStream_t stream, Launcher& launcher) const {
    if (!pipelined_) {
      for (const Fetched& op : operands)
        FetchRows(c_, list, chunk, op, 0, devices_, 0, stream, launcher);
      return;
    }
    // Always: the side stream must join XLA's again even after a failed launch.
    launcher.Always("forking the fetch stream",
                    [&] { return cudaEventRecord(me_.fetched[0], stream); });
    launcher.Always("forking the fetch stream",
                    [&] { return cudaStreamWaitEvent(me_.side, me_.fetched[0], 0); });
    // On the SMs the GEMMs beside it leave free, if any (Run); without, the fetch's blocks
    // take SMs as the GEMMs' grids leave them.
    const int fetch_sms = c_.num_sms - c_.fetching_sms;
    for (int phase = 1; phase < devices_; ++phase) {
      const int32_t src = source(phase);
      for (const Fetched& op : operands)
        FetchRows(c_, list, chunk, op, src, src + 1, fetch_sms, me_.side, launcher);
      launcher.Always("recording a peer's fetched rows", [&] {
        const cudaError_t recorded = cudaEventRecord(me_.fetched[phase], me_.side);
        // The last peer's record is the join (Run): without it the fetches must end before the
        // call returns, or they may outlive its scratch. A failure path, so the host may wait.
        if (recorded != cudaSuccess && phase == devices_ - 1) cudaStreamSynchronize(me_.side);
        return recorded;
      });
    }
    for (const Fetched& op : operands)
      FetchRows(c_, list, chunk, op, first_, first_ + 1, 0, stream, launcher);
  }

  // Runs `launch(only_source, sms)` for each phase on `stream`, once that phase's rows are in:
  // the last phase (spanning tiles) waits for the last peer's, which joins the side stream back.
  // While later phases' rows are still being fetched the GEMMs run on `sms` < every SM: their
  // persistent grids fill whatever SMs they get, and the fetch's blocks would otherwise find
  // none free until a GEMM ends (Call::fetching_sms).
  template <typename Launch>
  void Run(cudaStream_t stream, Launcher& launcher, Launch launch) const {
    for (int phase = 0; phase < size(); ++phase) {
      if (phase > 0) {
        const int event = std::min(phase, devices_ - 1);
        launcher.Always("waiting for a peer's rows",
                        [&] { return cudaStreamWaitEvent(stream, me_.fetched[event], 0); });
      }
      launch(source(phase), pipelined_ && phase < devices_ - 1 ? c_.fetching_sms : c_.num_sms);
    }
  }

 private:
  const Call& c_;
  DeviceState& me_;
  const int devices_, first_;
  const bool pipelined_;
};

cuda::GemmOperand PairRows(const void* data, int64_t ld) {
  cuda::GemmOperand op{};
  op.source = cuda::RowSource::kPair;
  op.data = data;
  op.ld = ld;
  return op;
}

// Expert e's rows at its owner: this device's own weights where XLA keeps them, the others'
// (read by helpers of a plan) through the peer table.
cuda::GemmOperand ExpertRows(const Call& c, const void* own, const void* PeerBuffers::*field,
                             int64_t ld, int64_t expert_stride) {
  cuda::GemmOperand op{};
  op.source = cuda::RowSource::kExpert;
  for (int dev = 0; dev < c.d.num_devices; ++dev)
    op.peers[dev] = dev == c.me ? own : c.peers[dev].*field;
  op.ld = ld;
  op.expert_stride = expert_stride;
  return op;
}

cuda::GemmParams GemmOver(const Call& c, const cuda::WorkList& list, cuda::GemmShape shape,
                          int64_t m, int64_t n, int64_t k, cuda::GemmOperand a,
                          cuda::GemmOperand b, cuda::Epilogue epilogue) {
  cuda::GemmParams p{};
  p.shape = shape;
  p.m = static_cast<int32_t>(m);
  p.n = static_cast<int32_t>(n);
  p.k = static_cast<int32_t>(k);
  p.a = a;
  p.b = b;
  p.tf32 = c.tf32;
  p.items = list.items;
  p.group_begin = list.group_begin;
  p.group_end = list.group_end;
  p.group_expert = list.group_expert;
  p.tile_offset = list.tile_offset;
  p.num_groups = list.num_groups;
  p.tile_m = list.tile_m;
  p.only_source = cuda::kAllSources;
  p.chunk = {c.chunk_tiles, 0};
  p.part = cuda::ReductionPart::kEveryGroup;
  p.epilogue = epilogue;
  p.activation = static_cast<int32_t>(c.d.activation);
  p.gated = IsGated(c.d.activation);
  p.weights_f32 = c.d.weights_type == ffi::DataType::F32;
  p.top_k = static_cast<int32_t>(c.d.k);
  for (int dev = 0; dev < c.d.num_devices; ++dev) p.weights[dev] = c.peers[dev].weights;
  p.kept = c.kept;
  p.kept_rows = c.kept_rows;
  p.experts_per_device = static_cast<int32_t>(c.d.experts_local);
  return p;
}

cuda::ScatterParams ScatterOver(const Call& c, const cuda::WorkList& list, cuda::Chunk chunk,
                                const float* rows) {
  cuda::ScatterParams p{};
  p.pairs = PairsOf(c, list, chunk);
  p.hidden = static_cast<int32_t>(c.d.hidden);
  p.num_slots = c.d.slots;
  p.rows = rows;
  p.weights_f32 = c.d.weights_type == ffi::DataType::F32;
  for (int dev = 0; dev < c.d.num_devices; ++dev) {
    p.weights[dev] = c.peers[dev].weights;
    p.staging[dev] = c.peers[dev].staging;
    p.d_weights[dev] = c.peers[dev].d_weights;
  }
  if (c.place != nullptr) p.flags = c.barrier.signals[c.place->rank];
  return p;
}

cuda::CombineParams CombineOver(const Call& c, const cuda::WorkList& list, DeviceState& me,
                                void* out, void* d_weights) {
  cuda::CombineParams p{};
  p.ids = c.own_ids;
  // This device's tokens are its sources' pairs from rank * T * K on (emulated: all of them).
  if (list.pair_device != nullptr)
    p.pair_device = list.pair_device + FirstOwnDevice(c) * c.d.tokens * c.d.k;
  p.staging = c.own_staging;
  p.out = out;
  p.num_tokens = static_cast<int32_t>(c.own_tokens);
  p.top_k = static_cast<int32_t>(c.d.k);
  p.hidden = static_cast<int32_t>(c.d.hidden);
  p.num_slots = c.d.slots;
  p.experts_per_device = static_cast<int32_t>(c.d.experts_local);
  p.num_experts = static_cast<int32_t>(c.d.group_experts());
  p.experts_total = c.d.experts_total;
  p.d_weights = d_weights;
  p.weights_f32 = c.d.weights_type == ffi::DataType::F32;
  p.aborted = &me.error->aborted;
  return p;
}

void Scatter(const Call& c, const cuda::ScatterParams& scatter, cudaStream_t stream,
             Launcher& launcher) {
  launcher.Run("scatter_slots",
               [&] { return cuda::scatter_slots(ToDType(c.d.x_type), scatter, stream); });
}

// The end of a call, once every chunk's rows are scattered into their sources' staging: the end
// barrier (the peers have written this device's slots and stopped reading its buffers), the sum
// of its slots into `out` (and, backward, the NaN of d expert_weights at bad ids).
void CloseCall(const Call& c, const cuda::WorkList& list, DeviceState& me, void* out,
               void* d_weights, cudaStream_t stream, Launcher& launcher) {
  const cuda::DType dtype = ToDType(c.d.x_type);
  DeviceBarrier(c, me, nullptr, nullptr, stream, launcher);
  launcher.Run("combine_slots", [&] {
    return cuda::combine_slots(dtype, CombineOver(c, list, me, out, d_weights), stream);
  });
}

// With a plan, once the end barrier has passed (the helpers' partials are in): each own
// expert's weight gradients, the sum of its plan slots' partials in slot order.
void SumPartials(const Call& c, DeviceState& me, const BackwardScratch& s, void* dw_in,
                 void* dw_out, cudaStream_t stream, Launcher& launcher) {
  cuda::PartialSumParams p{};
  p.partials = s.partials;
  p.workers = c.plan.workers +
              static_cast<int64_t>(FirstOwnDevice(c)) * c.d.experts_local * c.plan.slots;
  p.experts = c.own_experts;
  p.slots = c.plan.slots;
  p.in_elements = c.d.hidden * c.d.gate_ffn;
  p.out_elements = c.d.ffn * c.d.hidden;
  p.dw_in = dw_in;
  p.dw_out = dw_out;
  p.aborted = &me.error->aborted;
  launcher.Run("sum_partials", [&] {
    return cuda::sum_partials(ToDType(c.d.x_type), p, stream);
  });
}

}  // namespace

ForwardScratch CarveForward(const Call& c, Arena& arena) {
  const int64_t rows = ChunkRows(c);
  ForwardScratch s;
  s.list = CarveWorkList(c, arena);
  s.x = arena.Take<char>(rows * c.d.hidden * ffi::ByteWidth(c.d.x_type));
  s.a = arena.Take<char>(rows * c.d.ffn * ffi::ByteWidth(c.d.x_type));
  s.rows = arena.Take<float>(rows * c.d.hidden);
  if (c.grouped_gemms) {
    s.h = arena.Take<float>(rows * c.d.gate_ffn);
    s.gemm_workspace = arena.Take<char>(cuda::grouped_gemm_workspace_bytes(
        static_cast<int32_t>(NumGroups(c)), c.num_sms));
  }
  return s;
}

void RunForward(const Call& c, DeviceState& me, const ForwardScratch& s, const ScalarS32& rank,
                const ScalarS32& group, void* y, cudaStream_t stream, Launcher& launcher) {
  const MoeDims& d = c.d;
  const int64_t h = d.hidden, f = d.ffn, gf = d.gate_ffn;
  OpenCall(c, me, s.list, rank, group, stream, launcher);
  const SourcePhases phases(c, me);

  // GEMM1: x rows @ w_in[e], activation (gated: gate and up columns side by side in one tile);
  // the kept pairs' h stored on the side.
  cuda::GemmParams g1 = GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, f, h,
                                 PairRows(s.x, h),
                                 ExpertRows(c, c.w_in, &PeerBuffers::w_in, gf, h * gf),
                                 cuda::Epilogue::kActivation);
  g1.n_split = IsGated(d.activation) ? static_cast<int32_t>(f) : 0;
  g1.out = s.a;
  g1.out_ld = f;
  // GEMM2: a @ w_out[e] into float32 rows.
  cuda::GemmParams g2 = GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, h, f,
                                 PairRows(s.a, f),
                                 ExpertRows(c, c.w_out, &PeerBuffers::w_out, h, f * h),
                                 cuda::Epilogue::kStoreF32);
  g2.out = s.rows;
  g2.out_ld = h;
  for (int32_t index = 0; index < NumChunks(c); ++index) {
    const cuda::Chunk chunk{c.chunk_tiles, index};
    phases.Fetch({{&PeerBuffers::x, s.x}}, s.list, chunk, stream, launcher);
    g1.chunk = g2.chunk = chunk;
    phases.Run(stream, launcher, [&](int32_t source, int sms) {
      g1.only_source = g2.only_source = source;
      LaunchPairRows("GEMM1", c, me, sms, cuda::Major::kMN, g1, s.h, s.gemm_workspace, stream,
                     launcher);
      LaunchPairRows("GEMM2", c, me, sms, cuda::Major::kMN, g2, nullptr, s.gemm_workspace,
                     stream, launcher);
    });
    cuda::ScatterParams scatter = ScatterOver(c, s.list, chunk, s.rows);
    scatter.weighted = 1;
    Scatter(c, scatter, stream, launcher);
  }
  CloseCall(c, s.list, me, y, nullptr, stream, launcher);
}

BackwardScratch CarveBackward(const Call& c, Arena& arena) {
  const int64_t rows = ChunkRows(c);
  const int64_t width = ffi::ByteWidth(c.d.x_type);
  const int tile_n = cuda::expert_gemm_tile_n(ToDType(c.d.x_type));
  BackwardScratch s;
  s.list = CarveWorkList(c, arena);
  // dot(a, u) per N-tile: expert_gemm's epilogue and the grouped GEMMs' pass split F alike.
  s.num_partials = static_cast<int32_t>((c.d.ffn + tile_n - 1) / tile_n);
  s.x = arena.Take<char>(rows * c.d.hidden * width);
  s.dy = arena.Take<char>(rows * c.d.hidden * width);
  s.h = arena.Take<float>(rows * c.d.gate_ffn);
  // What only the weight gradients read: w*a rows, the carry, the plan's partials (so frozen
  // experts' scratch holds more rows a chunk, and their helpers write nothing).
  if (c.weight_grads) s.aw = arena.Take<char>(rows * c.d.ffn * width);
  s.dh = arena.Take<char>(rows * c.d.gate_ffn * width);
  s.dot_partial = arena.Take<float>(rows * s.num_partials);
  s.rows = arena.Take<float>(rows * c.d.hidden);
  if (c.weight_grads && NumChunks(c) > 1) s.carry = arena.Take<float>(c.d.expert_elements());
  if (c.grouped_gemms) {
    s.u = arena.Take<float>(rows * c.d.ffn);
    s.gemm_workspace = arena.Take<char>(cuda::grouped_gemm_workspace_bytes(
        static_cast<int32_t>(NumGroups(c)), c.num_sms));
  }
  if (c.weight_grads && c.plan.workers != nullptr)
    s.partials = arena.Take<float>(static_cast<int64_t>(c.own_experts) * c.plan.slots *
                                   c.d.expert_elements());
  return s;
}

void RunBackward(const Call& c, DeviceState& me, const BackwardScratch& s, const ScalarS32& rank,
                 const ScalarS32& group, void* dx, void* d_weights, void* dw_in, void* dw_out,
                 cudaStream_t stream, Launcher& launcher) {
  const MoeDims& d = c.d;
  const int64_t h = d.hidden, f = d.ffn, gf = d.gate_ffn;
  OpenCall(c, me, s.list, rank, group, stream, launcher);
  const SourcePhases phases(c, me);

  // h = x @ w_in[e], float32, for the tiles whose h the forward did not keep.
  cuda::GemmParams h_gemm = GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, gf, h,
                                     PairRows(s.x, h),
                                     ExpertRows(c, c.w_in, &PeerBuffers::w_in, gf, h * gf),
                                     cuda::Epilogue::kStoreF32);
  h_gemm.skip_kept = 1;
  h_gemm.out = s.h;
  h_gemm.out_ld = gf;
  // u = dy @ w_out[e]^T; the epilogue forms w*a, dh and the partial dot(a, u) from the kept or
  // recomputed h.
  cuda::GemmParams u_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, f, h, PairRows(s.dy, h),
               ExpertRows(c, c.w_out, &PeerBuffers::w_out, h, f * h),
               cuda::Epilogue::kActivationBackward);
  u_gemm.h = s.h;
  u_gemm.aw = s.aw;
  u_gemm.dh = s.dh;
  u_gemm.dot_partial = s.dot_partial;
  u_gemm.num_partials = s.num_partials;
  // dW_out[e] = (w a)^T dy and dW_in[e] = x^T dh, reduced over the group's pairs in order: the
  // outputs, or with a plan each slot's float32 partial at the expert's owner; with several
  // chunks the group a chunk ends in the middle of keeps its sums in `carry` (w_in's first).
  cuda::GemmParams dw_out_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairReduction, f, h, 0, PairRows(s.aw, f),
               PairRows(s.dy, h), cuda::Epilogue::kStoreExpert);
  dw_out_gemm.out = dw_out;
  dw_out_gemm.out_ld = h;
  dw_out_gemm.out_expert_stride = f * h;
  cuda::GemmParams dw_in_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairReduction, h, gf, 0,
               PairRows(s.x, h), PairRows(s.dh, gf), cuda::Epilogue::kStoreExpert);
  dw_in_gemm.out = dw_in;
  dw_in_gemm.out_ld = gf;
  dw_in_gemm.out_expert_stride = h * gf;
  dw_out_gemm.aborted = dw_in_gemm.aborted = &me.error->aborted;
  if (c.plan.workers != nullptr) {
    for (cuda::GemmParams* g : {&dw_in_gemm, &dw_out_gemm}) {
      for (int dev = 0; dev < d.num_devices; ++dev) g->partials[dev] = c.peers[dev].partials;
      g->plan_slots = c.plan.slots;
      g->partial_stride = d.expert_elements();
    }
    dw_out_gemm.partial_offset = h * gf;  // after w_in's elements
  }
  if (s.carry != nullptr) {
    dw_in_gemm.carry = s.carry;
    dw_out_gemm.carry = s.carry + h * gf;
  }
  // dx rows = dh @ w_in[e]^T.
  cuda::GemmParams dx_gemm =
      GemmOver(c, s.list, cuda::GemmShape::kPairRows, 0, h, gf, PairRows(s.dh, gf),
               ExpertRows(c, c.w_in, &PeerBuffers::w_in, gf, h * gf), cuda::Epilogue::kStoreF32);
  dx_gemm.out = s.rows;
  dx_gemm.out_ld = h;

  for (int32_t index = 0; index < NumChunks(c); ++index) {
    const cuda::Chunk chunk{c.chunk_tiles, index};
    phases.Fetch({{&PeerBuffers::x, s.x}, {&PeerBuffers::dy, s.dy}}, s.list, chunk, stream,
                 launcher);
    for (cuda::GemmParams* g : {&h_gemm, &u_gemm, &dw_out_gemm, &dw_in_gemm, &dx_gemm})
      g->chunk = chunk;
    phases.Run(stream, launcher, [&](int32_t source, int sms) {
      h_gemm.only_source = u_gemm.only_source = source;
      LaunchPairRows("h = x @ w_in", c, me, sms, cuda::Major::kMN, h_gemm, nullptr,
                     s.gemm_workspace, stream, launcher);
      LaunchPairRows("u = dy @ w_out^T", c, me, sms, cuda::Major::kK, u_gemm, s.u,
                     s.gemm_workspace, stream, launcher);
    });
    if (c.weight_grads) {
      LaunchWeightGradient("dw_out", c, me, dw_out_gemm, s.gemm_workspace, stream, launcher);
      LaunchWeightGradient("dw_in", c, me, dw_in_gemm, s.gemm_workspace, stream, launcher);
    }
    LaunchPairRows("dx = dh @ w_in^T", c, me, c.num_sms, cuda::Major::kK, dx_gemm, nullptr,
                   s.gemm_workspace, stream, launcher);
    cuda::ScatterParams scatter = ScatterOver(c, s.list, chunk, s.rows);
    scatter.weighted = 0;  // w is in dh already
    scatter.dot_partial = s.dot_partial;
    scatter.num_partials = s.num_partials;
    Scatter(c, scatter, stream, launcher);
  }
  CloseCall(c, s.list, me, dx, c.own_d_weights, stream, launcher);
  if (!c.weight_grads) {
    // Not wanted: zeros rather than memory no one wrote (jax_debug_nans reads every output).
    const size_t width = ffi::ByteWidth(d.w_type);
    launcher.Run("zeroing dw_in", [&] {
      return cudaMemsetAsync(dw_in, 0, width * c.own_experts * h * gf, stream);
    });
    launcher.Run("zeroing dw_out", [&] {
      return cudaMemsetAsync(dw_out, 0, width * c.own_experts * f * h, stream);
    });
  } else if (c.plan.workers != nullptr) {
    SumPartials(c, me, s, dw_in, dw_out, stream, launcher);
  }
  if (c.own_d_weights != d_weights)  // peers wrote them into this device's region
    launcher.Run("copying d_expert_weights out of the region", [&] {
      return cudaMemcpyAsync(d_weights, c.own_d_weights,
                             ffi::ByteWidth(d.weights_type) * c.own_tokens * d.k,
                             cudaMemcpyDeviceToDevice, stream);
    });
}

template <typename Scratch>
int64_t ScratchBytes(const Call& c, Scratch (*carve)(const Call&, Arena&)) {
  Arena sizing{nullptr};
  carve(c, sizing);
  return static_cast<int64_t>(sizing.used);
}

int64_t SizeChunks(Call* c, int64_t budget, bool backward) {
  auto bytes = [&](int64_t tiles) {
    c->chunk_tiles = static_cast<int32_t>(tiles);
    return backward ? ScratchBytes(*c, CarveBackward) : ScratchBytes(*c, CarveForward);
  };
  const int64_t worst = std::max<int64_t>(WorstTiles(*c), 1);
  if (const int64_t all = bytes(worst); all <= budget || worst == 1) return all;
  // Several chunks: the bytes grow by one tile's rows per tile, from what every chunk shares
  // (the work list, the carry).
  const int64_t one = bytes(1), per_tile = bytes(2) - one, shared = one - per_tile;
  const int64_t tiles = budget > shared + per_tile ? (budget - shared) / per_tile : 1;
  return bytes(std::min(tiles, worst - 1));
}

}  // namespace ccf
