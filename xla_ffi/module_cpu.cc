// The nanobind module `jax_ccfuser._ccfuser_cpu`: hands the CPU handlers to Python.
#include <nanobind/nanobind.h>

#include "xla_ffi/cpu_gemm.h"
#include "xla_ffi/ffi_module.h"
#include "xla_ffi/moe_cpu.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/traffic.h"

namespace nb = nanobind;

NB_MODULE(_ccfuser_cpu, m) {
  ccf::UseCallerThreadOnly();
  ccf::DefineRegistrations(m, CcfMoeForwardCpu, CcfMoeBackwardCpu);
  m.def("peer_group_count", &ccf::PeerGroupCount,
        "Live (call site, group) entries of the peer registry.");
  m.def("fail_next_call_for_testing", &ccf::FailNextCallForTesting, nb::arg("rank"),
        "Makes the next call on device `rank` fail after publishing, as a call going wrong midway.");
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
