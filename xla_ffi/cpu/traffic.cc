#include "xla_ffi/cpu/traffic.h"

#include <map>
#include <mutex>
#include <tuple>

namespace ccf {
namespace {
std::mutex traffic_mu;
std::map<std::tuple<uint64_t, bool, int32_t>, Traffic>& Table() {
  static auto* table = new std::map<std::tuple<uint64_t, bool, int32_t>, Traffic>;
  return *table;
}
}  // namespace

void RecordTraffic(const Traffic& t) {
  std::lock_guard<std::mutex> lock(traffic_mu);
  Table()[{t.site, t.backward, t.rank}] = t;
}

std::vector<Traffic> TrafficRecords(bool clear) {
  std::lock_guard<std::mutex> lock(traffic_mu);
  std::vector<Traffic> out;
  for (const auto& [key, t] : Table()) out.push_back(t);
  if (clear) Table().clear();
  return out;
}

}  // namespace ccf
