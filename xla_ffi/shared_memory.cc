#include "xla_ffi/shared_memory.h"

#include <fcntl.h>
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

// What /proc says of process `pid` (or "self"): its state and its start in clock ticks since boot
// (fields 3 and 22 of its stat file, counted after the command's closing parenthesis, as the
// command may hold both spaces and parentheses). Returns errno's ENOENT if there is no such
// process, another nonzero errno if /proc cannot tell, 0 if it did.
int ProcessStat(const std::string& pid, char* state, uint64_t* started) {
  FILE* f = std::fopen(("/proc/" + pid + "/stat").c_str(), "r");
  if (!f) return errno ? errno : EIO;
  char line[1024];
  const size_t n = std::fread(line, 1, sizeof(line) - 1, f);
  std::fclose(f);
  line[n] = '\0';
  const char* after = std::strrchr(line, ')');
  unsigned long long ticks = 0;
  if (!after || std::sscanf(after + 1, " %c %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s "
                            "%*s %*s %*s %*s %*s %llu", state, &ticks) != 2)
    return EIO;
  *started = ticks;
  return 0;
}

uint64_t PidNamespace() {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? st.st_ino : 0;
}

// Says which process runs the device whose liveness this is; peers that cannot read it back
// (/proc missing) never take the device's process for exited.
void RecordProcess(DeviceLiveness* liveness) {
  char state;
  uint64_t started;
  const bool known = ProcessStat("self", &state, &started) == 0;
  liveness->pid = getpid();
  liveness->pid_namespace = known ? PidNamespace() : 0;
  liveness->started = known ? started : 0;
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
  if (create && ftruncate(fd, head + bytes) != 0) {
    const std::string err = Failed("cannot size", name);
    close(fd);
    shm_unlink(name.c_str());
    return err;
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
  if (liveness.pid_namespace == 0 || liveness.pid_namespace != PidNamespace()) return 0;
  char state;
  uint64_t started;
  const int err = ProcessStat(std::to_string(liveness.pid), &state, &started);
  // A zombie has exited, its parent just has not reaped it; a later start is another process
  // that took the id.
  const bool exited =
      err == ENOENT || (err == 0 && (state == 'Z' || state == 'X' || started != liveness.started));
  return exited ? liveness.pid : 0;
}

}  // namespace ccf
