// The nanobind module `jax_ccfuser._ccfuser_cpu`: hands the CPU handlers to Python.
#include <nanobind/nanobind.h>

#include "xla_ffi/cpu_gemm.h"
#include "xla_ffi/moe_cpu.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/traffic.h"

namespace nb = nanobind;

namespace {
// Must equal jax_ccfuser/_extension.py's ABI_VERSION.
constexpr int kAbiVersion = 2;

template <typename T>
nb::capsule Capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_ccfuser_cpu, m) {
  ccf::UseCallerThreadOnly();
  m.def("abi_version", [] { return kAbiVersion; });
  m.def("registrations", [] {
    nb::dict d;
    d["ccf_moe_fwd"] = Capsule(CcfMoeForwardCpu);
    d["ccf_moe_bwd"] = Capsule(CcfMoeBackwardCpu);
    return d;
  });
  m.def("peer_group_count", &ccf::PeerGroupCount,
        "Live (call site, group) entries of the peer registry.");
  m.def("fail_next_call_for_testing", &ccf::FailNextCallForTesting, nb::arg("rank"),
        "Makes the next call on device `rank` fail after publishing, like a crashed peer.");
  m.def(
      "traffic_records",
      [](bool clear) {
        nb::list out;
        for (const ccf::Traffic& t : ccf::TrafficRecords(clear)) {
          nb::dict r;
          r["site"] = t.site;
          r["rank"] = t.rank;
          r["backward"] = t.backward;
          r["pairs"] = t.pairs;
          r["remote_rows_read"] = t.remote_rows_read;
          r["remote_bytes_read"] = t.remote_bytes_read;
          r["remote_rows_written"] = t.remote_rows_written;
          r["remote_bytes_written"] = t.remote_bytes_written;
          out.append(r);
        }
        return out;
      },
      nb::arg("clear") = false, "The latest call's traffic per (site, direction, rank).");
}
