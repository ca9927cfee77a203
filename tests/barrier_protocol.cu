// Runs the device barrier's steps (cuda/barrier.cuh) on the host, where a group's members can be
// made late, dead or out of step at will: each member is a thread that runs its calls' barriers
// in order, as its stream would, and each barrier is a block of kMaxPeers threads. Between the
// barriers a member writes into its peers' staging, as the scatter does. Checked: the epochs and
// counts of a group in step, and what each fault records and leaves behind; that a barrier
// entered aborted returns at once; that an end barrier returns only once every member that may
// write into this device's buffers has signalled, also after a failed launch or another
// member's failure, where without those rules it returns first (the controls). The host's
// memory model is not the GPU's: the release/acquire ordering itself awaits a GPU. Prints each
// case and the number of errors; exits 1 on any.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/barrier.cuh"

using namespace ccf::cuda;
using Clock = std::chrono::steady_clock;

namespace {

int errors = 0;

void expect(bool ok, const char* scenario, const char* what) {
  if (!ok && errors++ < 40) std::printf("  %s: %s\n", scenario, what);
}

// A reusable meeting of `count` threads: __syncthreads or __syncwarp on the host.
class Gate {
 public:
  explicit Gate(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  const int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
};

struct HostMemory {
  Gate* block;
  Gate* members;
  int load_delay_ms;  // a member slow to read its flags

  uint64_t load_acquire(const uint64_t* flag) {
    if (load_delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(load_delay_ms));
    return __atomic_load_n(flag, __ATOMIC_ACQUIRE);
  }
  void store_release(uint64_t* flag, uint64_t value) {
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
  }
  void fence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
  bool aborted(const DeviceError* e) { return __atomic_load_n(&e->aborted, __ATOMIC_ACQUIRE); }
  void set_aborted(DeviceError* e) { __atomic_exchange_n(&e->aborted, 1, __ATOMIC_SEQ_CST); }
  void record(DeviceError* e, int32_t code, int32_t member, int64_t value, int64_t limit) {
    int32_t ok = kDeviceOk;
    if (__atomic_compare_exchange_n(&e->code, &ok, code, false, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST)) {
      e->source = member;
      e->value = value;
      e->limit = limit;
    }
  }
  uint64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
        .count();
  }
  void pause() { std::this_thread::sleep_for(std::chrono::microseconds(20)); }
  void sync_block() { block->arrive_and_wait(); }
  void sync_members(int32_t) { members->arrive_and_wait(); }
};

// One member's memory: its flags (flag r written by rank r), its count and signature word (peers
// in other processes), its fault record, the rank and group operands the handler cached, and its
// staging, slot r written by rank r.
struct Device {
  uint64_t flags[kMaxPeers] = {};
  uint64_t passed = 0;
  uint64_t signature = 0;
  DeviceError error{};
  int32_t rank_value = 0, group_value = 0;
  int32_t staging[kMaxPeers] = {};

  int32_t slot(int r) { return __atomic_load_n(&staging[r], __ATOMIC_RELAXED); }
  bool aborted() { return __atomic_load_n(&error.aborted, __ATOMIC_ACQUIRE) != 0; }
};

constexpr int64_t kMs = 1000000;

struct Group {
  std::vector<std::unique_ptr<Device>> devices;
  bool ipc;  // counts and signatures in the members' regions
  int64_t timeout_ns = 2000 * kMs;

  Group(int members, bool ipc) : ipc(ipc) {
    for (int r = 0; r < members; ++r) {
      devices.push_back(std::make_unique<Device>());
      devices.back()->rank_value = r;
    }
  }
  int size() const { return static_cast<int>(devices.size()); }
  Device& operator[](int r) { return *devices[r]; }

  // The params of member `rank`'s barrier number `epoch` at the site (from 1), the start or the
  // end of a call.
  BarrierParams params(int rank, uint64_t epoch, bool end) {
    BarrierParams p{};
    for (int m = 0; m < size(); ++m) p.signals[m] = devices[m]->flags;
    p.num_members = size();
    p.rank = rank;
    p.timeout_ns = timeout_ns;
    p.error = &devices[rank]->error;
    if (ipc)
      p.passed = &devices[rank]->passed;
    else
      p.epoch = epoch;
    if (!end) {
      p.rank_value = &devices[rank]->rank_value;
      p.group_value = &devices[rank]->group_value;
      if (ipc) {
        for (int m = 0; m < size(); ++m) p.signatures[m] = &devices[m]->signature;
        p.signature = 0x5eed;
      }
    }
    p.end = end;
    return p;
  }

  // A member writing its partial sums into member `to`'s staging.
  void write(int from, int to, int32_t value) {
    __atomic_store_n(&devices[to]->staging[from], value, __ATOMIC_RELAXED);
  }
};

// A barrier "kernel": kMaxPeers threads, joined (the stream's next launch starts after it).
// Returns how long it took.
double run_barrier(const BarrierParams& p, int load_delay_ms = 0) {
  Gate block(kMaxPeers), members(p.num_members);
  HostMemory memory{&block, &members, load_delay_ms};
  bool stop = false;
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < kMaxPeers; ++i)
    threads.emplace_back([&, i] { barrier_thread(p, i, &stop, memory); });
  for (std::thread& t : threads) t.join();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Runs each member's stream on its own thread.
void run_members(const std::vector<std::function<void()>>& streams) {
  std::vector<std::thread> threads;
  for (const auto& s : streams) threads.emplace_back(s);
  for (std::thread& t : threads) t.join();
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

void no_fault(Device& d, const char* name) {
  expect(d.error.code == kDeviceOk && !d.aborted(), name, "a fault was recorded");
}

// Members pass `calls` calls (start barrier, writes into every member's staging, end barrier)
// and each finds every member's writes of the call in its staging after its end barrier.
void in_step(bool ipc) {
  const char* name = ipc ? "in step, counts in the regions" : "in step, counts on the host";
  const int members = 4, calls = 3;
  Group g(members, ipc);
  std::vector<int> complete(members, 0);
  std::vector<std::function<void()>> streams;
  for (int r = 0; r < members; ++r)
    streams.push_back([&, r] {
      for (int c = 1; c <= calls; ++c) {
        run_barrier(g.params(r, 2 * c - 1, false));
        sleep_ms((r * 7 + c * 3) % 5);  // members finish their work in varying order
        for (int to = 0; to < members; ++to) g.write(r, to, c);
        run_barrier(g.params(r, 2 * c, true));
        bool all = true;
        for (int from = 0; from < members; ++from) all = all && g[r].slot(from) == c;
        complete[r] += all;
      }
    });
  run_members(streams);
  for (int r = 0; r < members; ++r) {
    no_fault(g[r], name);
    expect(complete[r] == calls, name, "an end barrier returned before a member's writes");
    for (int m = 0; m < members; ++m)
      expect(g[r].flags[m] == 2 * calls, name, "a flag is not the count of barriers passed");
    if (ipc) expect(g[r].passed == 2 * calls, name, "a region's count is not the barriers passed");
  }
  std::printf("%s: %s\n", name, errors ? "errors" : "ok");
}

// A member that never calls: the others time out naming it, give the call up and mark the group
// broken; their next barriers, entered aborted, return at once.
void dead_member() {
  const char* name = "a dead member";
  Group g(3, false);
  g.timeout_ns = 100 * kMs;
  std::vector<double> later(2);
  run_members({[&] {
                 run_barrier(g.params(0, 1, false));
                 later[0] = run_barrier(g.params(0, 2, true)) + run_barrier(g.params(0, 3, false));
               },
               [&] {
                 run_barrier(g.params(1, 1, false));
                 later[1] = run_barrier(g.params(1, 2, true)) + run_barrier(g.params(1, 3, false));
               }});
  for (int r = 0; r < 2; ++r) {
    const DeviceError& e = g[r].error;
    expect(e.code == kBarrierTimeout && e.source == 2 && e.value == 0 && e.limit == 1, name,
           "the timeout does not name the dead member, its last flag and the epoch");
    expect(g[r].aborted(), name, "the call is not given up");
    expect(g[2].flags[r] == kAbortFlag, name, "the dead member's flags do not say aborted");
    expect(later[r] < 0.05, name, "a barrier entered aborted waited");
  }
  std::printf("%s: %s\n", name, errors ? "errors" : "ok");
}

// Member 1 has passed two barriers more than member 0 at the site.
void out_of_step() {
  const char* name = "a member out of step";
  Group g(2, false);
  run_members({[&] { run_barrier(g.params(0, 1, false)); },
               [&] { run_barrier(g.params(1, 3, false)); }});
  expect(g[0].error.code == kOutOfStep && g[0].error.source == 1 && g[0].error.value == 3 &&
             g[0].error.limit == 1,
         name, "member 0 does not record member 1's flag as out of step");
  expect(g[1].error.code == kOutOfStep && g[1].error.source == 0 &&
             static_cast<uint64_t>(g[1].error.value) == kAbortFlag,
         name, "member 1 does not see member 0 give up");
  expect(g[0].aborted() && g[1].aborted(), name, "a member carries on");
  std::printf("%s: %s\n", name, errors ? "errors" : "ok");
}

// Member 1's rank operand holds another rank than the one the handler cached.
void rank_changed() {
  const char* name = "a changed rank";
  Group g(2, false);
  g[1].rank_value = 0;
  run_members({[&] { run_barrier(g.params(0, 1, false)); },
               [&] { run_barrier(g.params(1, 1, false)); }});
  expect(g[1].error.code == kRankMismatch && g[1].error.value == 0 && g[1].error.limit == 1,
         name, "the member does not record its changed rank");
  expect(g[0].error.code == kOutOfStep && g[0].error.source == 1, name,
         "its peer does not see it give up");
  std::printf("%s: %s\n", name, errors ? "errors" : "ok");
}

// Peers in other processes that traced other shapes.
void other_shapes() {
  const char* name = "other shapes";
  Group g(2, true);
  run_members({[&] { run_barrier(g.params(0, 1, false)); },
               [&] {
                 BarrierParams p = g.params(1, 1, false);
                 p.signature = 0xbad;
                 run_barrier(p);
               }});
  // Whichever compares first records the other's signature; the other may see it give up
  // (kAbortFlag over its epoch) before it compares.
  const DeviceError &e0 = g[0].error, &e1 = g[1].error;
  expect((e0.code == kShapeMismatch && e0.value == 0xbad) ||
             (e1.code == kShapeMismatch && e1.value == 0x5eed),
         name, "neither member recorded the other's signature");
  for (const DeviceError* e : {&e0, &e1})
    expect(e->code == kShapeMismatch || e->code == kOutOfStep, name, "a member carries on");
  std::printf("%s: %s\n", name, errors ? "errors" : "ok");
}

// How a call is given up after its start barrier, with member 2 still to write into member
// 0's staging (200 ms later, as a scatter still running would):
//   kFailedLaunch: a launch of member 0 fails once every member has passed the start (the host
//     sets `aborted`); member 1 writes too;
//   kPeerGaveUp:   member 1 gives up (an earlier barrier's abort) once every member has passed;
//   kSlowStart:    member 1 gives up once member 2 has passed, while member 0 still reads the
//     start's flags (its loads are 100 ms late), so member 0's start fails on member 1's
//     kAbortFlag although member 2 passed.
enum Case { kFailedLaunch, kPeerGaveUp, kSlowStart };
const char* const kCaseNames[] = {"a failed launch", "another member gave up",
                                  "another member gave up during a slow start"};

// Whether the writes were in member 0's staging when its end barrier returned: with the end
// rules (BarrierParams::end) they must be; without them (the control) member 0 returns first.
bool writes_before_return(Case c, bool rules) {
  const char* name = kCaseNames[c];
  Group g(3, false);
  bool landed = false;
  int started[3] = {};
  auto wait_started = [&](int r) {
    while (!__atomic_load_n(&started[r], __ATOMIC_ACQUIRE)) sleep_ms(1);
  };
  auto start = [&](int r, int load_delay_ms = 0) {
    run_barrier(g.params(r, 1, false), load_delay_ms);
    __atomic_store_n(&started[r], 1, __ATOMIC_RELEASE);
  };
  auto give_up = [&](int r) { __atomic_store_n(&g[r].error.aborted, 1, __ATOMIC_RELEASE); };
  const bool writes_1 = c == kFailedLaunch;
  std::vector<std::function<void()>> streams;
  streams.push_back([&] {
    start(0, c == kSlowStart ? 100 : 0);
    if (c == kFailedLaunch) {
      for (int r = 0; r < 3; ++r) wait_started(r);
      give_up(0);
    }
    BarrierParams end = g.params(0, 2, true);
    end.end = rules;
    run_barrier(end);
    landed = g[0].slot(2) == 1 && (!writes_1 || g[0].slot(1) == 1);
  });
  for (int r = 1; r < 3; ++r)
    streams.push_back([&, r] {
      start(r);
      if (r == 1 && !writes_1) {
        for (int other = c == kSlowStart ? 2 : 0; other < 3; ++other) wait_started(other);
        give_up(1);
      } else {
        sleep_ms(200);
        g.write(r, 0, 1);
      }
      run_barrier(g.params(r, 2, true));
    });
  run_members(streams);
  if (!rules) return landed;
  if (c == kFailedLaunch) {
    expect(g[0].error.code == kDeviceOk && g[0].aborted(), name,
           "the member that gave up recorded a fault of its own or carried on");
    for (int r = 1; r < 3; ++r)
      // From member 0, or from the other peer that saw it first.
      expect(g[r].error.code == kOutOfStep &&
                 static_cast<uint64_t>(g[r].error.value) == kAbortFlag,
             name, "a peer did not see the call given up");
  } else {
    expect(g[0].error.code == kOutOfStep && g[0].error.source == 1 && g[0].aborted(), name,
           "member 0 did not see member 1 give up");
  }
  return landed;
}

void end_rules() {
  for (Case c : {kFailedLaunch, kPeerGaveUp, kSlowStart}) {
    expect(writes_before_return(c, true), kCaseNames[c],
           "the end barrier returned while a peer could still write into the staging");
    expect(!writes_before_return(c, false), kCaseNames[c],
           "the control without the end rules waited too, so the check above proves nothing");
    std::printf("%s: %s\n", kCaseNames[c], errors ? "errors" : "ok");
  }
}

}  // namespace

int main() {
  in_step(false);
  in_step(true);
  dead_member();
  out_of_step();
  rank_changed();
  other_shapes();
  end_rules();
  std::printf("errors: %d\n", errors);
  return errors ? 1 : 0;
}
