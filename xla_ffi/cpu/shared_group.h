// The fused-MoE protocol between processes of one host, over their shared workspaces: the
// barriers in the headers of the devices' regions of a call site (region_layout.h), and the
// devices' liveness before their workspaces (shared_memory.h), by which a wait fails fast when a
// peer is gone, as in a process (`BarrierWait`), or its process has exited.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "xla_ffi/peer_group.h"
#include "xla_ffi/region_layout.h"
#include "xla_ffi/shared_memory.h"

namespace ccf {

class SharedGroup final : public Rendezvous, private Silence {
 public:
  // `headers[r]`: rank r's region header, mapped in this process; `group`: which EP group.
  SharedGroup(int32_t group, std::vector<RegionHeader*> headers);

  // Waits up to `timeout`, less where a peer is gone (`BarrierWait`). Giving up at a barrier
  // after publish breaks the site: its later calls fail at once, in every process.
  xla::ffi::Error Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) override;
  void ReportFailure(const std::string& msg) override;
  std::string Failure() override;

 private:
  bool HeardSince(int rank, Clock::time_point since) override;
  Clock::time_point GoneSince(int rank) override;
  void SetGoneSince(int rank, Clock::time_point when) override;
  int64_t Exited(int rank) override;
  void Heard(int rank, Clock::time_point when);
  // The first rank that gave up in the middle of a call of this site, or -1; its error.
  int GaveUpMidway() const;
  xla::ffi::Error Broken(int rank, int gave_up) const;

  const int32_t group_;
  std::vector<RegionHeader*> headers_;
  std::vector<DeviceLiveness*> liveness_;  // per rank
};

}  // namespace ccf
