// Row-major float32 GEMM panels on the host: OpenBLAS (the scipy-openblas32 wheel) kernels,
// spread by column blocks over a pool of one thread per core.
//
// OpenBLAS runs single-threaded in the calling thread (`UseCallerThreadOnly`): the simulated
// devices already call it concurrently, and this pool, not a second pool of OpenBLAS's own,
// decides how the cores are shared. It is not XLA's intra-op pool: the handlers run on threads
// of their own (host_async.h), after the call that could have lent them XLA's has returned.
#pragma once

#include <cblas.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

namespace ccf {

inline void UseCallerThreadOnly() { scipy_openblas_set_num_threads(1); }

// One thread per core for the kernels' column blocks, shared by every handler call of the
// process. Tasks never wait on one another (Workers::ParallelFor's caller claims work too).
class HostThreads {
 public:
  // Never destroyed: handler threads may still run while the process exits.
  static HostThreads& Get() {
    static HostThreads* pool = new HostThreads(Cores());
    return *pool;
  }

  // The cores this process may run on (taskset, a container's cpuset), as Python's
  // os.sched_getaffinity counts them; the machine's where the mask cannot be read.
  static unsigned Cores() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
  }

  int num_threads() const { return num_threads_; }

  void Schedule(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  explicit HostThreads(unsigned n) : num_threads_(static_cast<int>(n)) {
    for (unsigned i = 0; i < n; ++i)
      std::thread([this] {
        for (;;) {
          std::function<void()> task;
          {
            std::unique_lock<std::mutex> lock(mu_);
            cv_.wait(lock, [this] { return !tasks_.empty(); });
            task = std::move(tasks_.front());
            tasks_.pop_front();
          }
          task();
        }
      }).detach();
  }

  const int num_threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
};

// `num_workers` threads of the pool (the caller being one of them) for this handler call.
class Workers {
 public:
  Workers(HostThreads* pool, int num_workers)
      : pool_(pool), num_workers_(std::max(1, num_workers)) {}

  int num_workers() const { return num_workers_; }

  // Runs fn(i) for i in [0, n). The caller claims work too, so this finishes even if no pool
  // thread ever picks a task up; tasks that start late find nothing left and touch only `state`.
  template <typename F>
  void ParallelFor(int64_t n, const F& fn) const {
    if (num_workers_ == 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0};
      std::mutex mu;
      std::condition_variable cv;
      int64_t done = 0;  // guarded by mu
    };
    auto state = std::make_shared<State>();
    auto work = [state, n, &fn] {
      for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
        fn(i);
        std::lock_guard<std::mutex> lock(state->mu);
        if (++state->done == n) state->cv.notify_all();
      }
    };
    for (int w = 1; w < std::min<int64_t>(num_workers_, n); ++w) pool_->Schedule(work);
    work();
    // Sleep rather than spin: with several devices per core a spinning waiter steals the core
    // from the worker it waits for.
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->done == n; });
  }

 private:
  HostThreads* pool_;
  int num_workers_;
};

// C[m, n] = alpha * op(A) @ op(B) + beta * C, all row-major (op transposes when asked). The
// column blocks depend only on the worker count, so results are bitwise reproducible for a
// given count; OpenBLAS rounds a column differently in a block of another width (blocks of one
// fixed width on every machine cost a 2048 x 4096 x 1024 GEMM about half its speed, measured
// single-threaded).
inline void Gemm(const Workers& workers, bool trans_a, bool trans_b, int64_t m, int64_t n,
                 int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr int64_t kMinBlock = 64;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(workers.num_workers(), n / kMinBlock));
  const int64_t width = (n + blocks - 1) / blocks;
  workers.ParallelFor(blocks, [&](int64_t blk) {
    const int64_t j0 = blk * width, cols = std::min(width, n - j0);
    scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                      trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
                      static_cast<blasint>(cols), static_cast<blasint>(k), alpha, a,
                      static_cast<blasint>(lda), trans_b ? b + j0 * ldb : b + j0,
                      static_cast<blasint>(ldb), beta, c + j0, static_cast<blasint>(ldc));
  });
}

}  // namespace ccf
