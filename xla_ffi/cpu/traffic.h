// What each device moved through shared memory in the latest call of each site: the figures
// users compare with the all_to_all baseline's buffers, recorded by the handlers.
#pragma once

#include <cstdint>
#include <vector>

namespace ccf {

struct Traffic {
  uint64_t site = 0;
  int32_t rank = 0;
  bool backward = false;
  int64_t pairs = 0;               // routed (token, k) pairs computed
  int64_t remote_rows_read = 0;    // token rows read from other devices (x, and dy backward)
  int64_t remote_bytes_read = 0;
  int64_t remote_rows_written = 0;  // partial-sum rows written into other devices' staging
  int64_t remote_bytes_written = 0;
};

// Replaces the record of (site, rank, direction).
void RecordTraffic(const Traffic& t);

// All records, ordered by (site, direction, rank); `clear` empties the table afterwards.
std::vector<Traffic> TrafficRecords(bool clear);

}  // namespace ccf
