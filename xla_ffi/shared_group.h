// The fused-MoE protocol between processes of one host, over their shared workspaces: the
// barriers in the headers of the devices' regions of a call site (region_layout.h).
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "xla_ffi/peer_group.h"
#include "xla_ffi/region_layout.h"

namespace ccf {

class SharedGroup final : public Rendezvous {
 public:
  // `headers[r]`: rank r's region header, mapped in this process.
  explicit SharedGroup(std::vector<RegionHeader*> headers) : headers_(std::move(headers)) {}

  xla::ffi::Error Arrive(int rank, Phase phase, std::chrono::milliseconds timeout) override;
  void ReportFailure(const std::string& msg) override;
  std::string Failure() override;

 private:
  std::vector<RegionHeader*> headers_;
};

}  // namespace ccf
