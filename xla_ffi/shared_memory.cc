#include "xla_ffi/shared_memory.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace ccf {

namespace {
std::mutex segments_mu;
std::map<std::pair<int32_t, int32_t>, Segment>& Segments() {
  static auto* segments = new std::map<std::pair<int32_t, int32_t>, Segment>;
  return *segments;
}

// Why (device, chunk) cannot be registered, or "". The caller holds segments_mu.
std::string Taken(int32_t device, int32_t chunk) {
  if (!Segments().count({device, chunk})) return {};
  return "jax_ccfuser: workspace chunk " + std::to_string(chunk) + " of device " +
         std::to_string(device) + " is already mapped";
}

// What /proc says of a process: fields 3, 20 and 22 of its stat file, counted after the
// command's closing parenthesis (the command may hold spaces and parentheses).
struct ProcStat {
  char state;
  long threads;
  unsigned long long started;  // clock ticks since boot
};

bool ReadProcStat(const std::string& pid, ProcStat* out) {
  FILE* f = std::fopen(("/proc/" + pid + "/stat").c_str(), "r");
  if (!f) return false;
  char line[1024];
  const size_t n = std::fread(line, 1, sizeof(line) - 1, f);
  std::fclose(f);
  line[n] = '\0';
  const char* after = std::strrchr(line, ')');
  return after && std::sscanf(after + 1,
                              " %c %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s "
                              "%*s %ld %*s %llu",
                              &out->state, &out->threads, &out->started) == 3;
}

// This process's PID and time namespaces (inodes): the PID namespace is 0 where /proc cannot
// speak for it, missing or mounted for another PID namespace (unshare without --mount-proc),
// where /proc's ids are other processes'. The time namespace shifts /proc's start times; 0 on
// kernels without one.
std::pair<uint64_t, uint64_t> Namespaces() {
  char self[32];
  const ssize_t n = readlink("/proc/self", self, sizeof(self) - 1);
  struct stat pid_ns, time_ns;
  if (n <= 0 || std::string(self, n) != std::to_string(getpid()) ||
      stat("/proc/self/ns/pid", &pid_ns) != 0)
    return {0, 0};
  return {pid_ns.st_ino, stat("/proc/self/ns/time", &time_ns) == 0 ? time_ns.st_ino : 0};
}

// Says which process runs the device whose liveness this is; where /proc cannot tell, the
// namespaces stay 0 and its peers never take the process for exited.
void RecordProcess(DeviceLiveness* liveness) {
  const auto [pid_namespace, time_namespace] = Namespaces();
  ProcStat self;
  const bool known = pid_namespace != 0 && ReadProcStat("self", &self);
  liveness->pid = getpid();
  liveness->pid_namespace = known ? pid_namespace : 0;
  liveness->time_namespace = known ? time_namespace : 0;
  liveness->started = known ? self.started : 0;
}

std::string Failed(const char* what, const std::string& name) {
  return std::string("jax_ccfuser: ") + what + " shared-memory segment " + name + ": " +
         std::strerror(errno);
}
}  // namespace

std::string MapSegment(const std::string& name, int64_t bytes, bool create, int32_t device,
                       int32_t chunk) {
  // A page keeps the workspace after the liveness page-aligned, as Python aligns regions.
  constexpr int64_t kLivenessBytes = 4096;
  static_assert(sizeof(DeviceLiveness) <= kLivenessBytes);
  std::lock_guard<std::mutex> lock(segments_mu);
  if (std::string err = Taken(device, chunk); !err.empty()) return err;
  const int64_t head = chunk == 0 ? kLivenessBytes : 0;
  DeviceLiveness* liveness = nullptr;
  if (chunk > 0) {
    auto first = Segments().find({device, 0});
    if (first == Segments().end() || !first->second.liveness)
      return "jax_ccfuser: workspace chunk " + std::to_string(chunk) + " of device " +
             std::to_string(device) + " mapped before its chunk 0";
    liveness = first->second.liveness;
  }
  const int fd = shm_open(name.c_str(), create ? O_RDWR | O_CREAT | O_EXCL : O_RDWR, 0600);
  if (fd < 0) return Failed(create ? "cannot create" : "cannot open", name);
  // Reserved, not only sized: tmpfs counts a page against its limit when it is first written,
  // so a sparse segment past the limit maps fine and its first write past it kills the process
  // with SIGBUS (every process of the host checked the same free space before any wrote).
  if (create) {
    int failed;
    do failed = posix_fallocate(fd, 0, head + bytes);
    while (failed == EINTR);  // a signal arrived while tmpfs reserved the pages
    if (failed != 0) {
      const std::string err =
          "jax_ccfuser: cannot reserve " + std::to_string((head + bytes) >> 20) +
          " MiB of shared memory for segment " + name + ": " + std::strerror(failed) +
          (failed == ENOSPC ? " (in a container, raise /dev/shm's size, e.g. `docker run "
                              "--shm-size`, or use jax_ccfuser.transport('collectives'))"
                            : "");
      close(fd);
      shm_unlink(name.c_str());
      return err;
    }
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < head + bytes) {
    close(fd);
    return "jax_ccfuser: shared-memory segment " + name + " is smaller than " +
           std::to_string(bytes) + " bytes";
  }
  void* mapped = mmap(nullptr, head + bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);  // the mapping keeps the memory
  if (mapped == MAP_FAILED) return Failed("cannot map", name);
  char* base = static_cast<char*>(mapped);
  if (chunk == 0) {
    liveness = reinterpret_cast<DeviceLiveness*>(base);
    if (create) RecordProcess(liveness);
  }
  Segments()[{device, chunk}] = Segment{base + head, bytes, create, liveness};
  return {};
}

std::string RegisterSegment(int32_t device, int32_t chunk, const Segment& segment) {
  std::lock_guard<std::mutex> lock(segments_mu);
  if (std::string err = Taken(device, chunk); !err.empty()) return err;
  Segments()[{device, chunk}] = segment;
  return {};
}

std::string UnlinkSegment(const std::string& name) {
  if (shm_unlink(name.c_str()) != 0 && errno != ENOENT) return Failed("cannot unlink", name);
  return {};
}

const Segment* FindSegment(int32_t device, int32_t chunk) {
  std::lock_guard<std::mutex> lock(segments_mu);
  auto it = Segments().find({device, chunk});
  return it == Segments().end() ? nullptr : &it->second;
}

DeviceLiveness* LivenessAt(const void* address) {
  const char* p = static_cast<const char*>(address);
  std::lock_guard<std::mutex> lock(segments_mu);
  for (const auto& [key, seg] : Segments())
    if (seg.liveness && p >= seg.base && p < seg.base + seg.bytes) return seg.liveness;
  return nullptr;
}

int64_t ExitedProcess(const DeviceLiveness& liveness) {
  if (liveness.departed.load(std::memory_order_acquire)) return liveness.pid;
  const auto [pid_namespace, time_namespace] = Namespaces();
  if (liveness.pid_namespace == 0 || liveness.pid_namespace != pid_namespace ||
      liveness.time_namespace != time_namespace)
    return 0;
  const pid_t pid = static_cast<pid_t>(liveness.pid);
  // kill looks the id up in this process's PID namespace, the one it shares with the device's.
  if (kill(pid, 0) != 0 && errno == ESRCH) return pid;
  ProcStat proc;
  // A /proc that hides the process (hidepid) cannot tell.
  if (!ReadProcStat(std::to_string(pid), &proc)) return 0;
  // A zombie has exited and waits for its parent to reap it, unless it is only its main thread
  // that ended while others run; a later start is another process that took the id.
  const bool zombie = (proc.state == 'Z' || proc.state == 'X') && proc.threads <= 1;
  return zombie || proc.started != liveness.started ? pid : 0;
}

void MarkDeparted() {
  std::lock_guard<std::mutex> lock(segments_mu);
  for (const auto& [key, seg] : Segments())
    if (seg.owned && seg.liveness) seg.liveness->departed.store(1, std::memory_order_release);
}

}  // namespace ccf
