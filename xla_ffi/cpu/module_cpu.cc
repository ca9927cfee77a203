// The nanobind module `jax_ccfuser._ccfuser_cpu`: hands the CPU handlers to Python.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "xla_ffi/cpu/cpu_gemm.h"
#include "xla_ffi/ffi_module.h"
#include "xla_ffi/cpu/moe_cpu.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/region_layout.h"
#include "xla_ffi/shared_memory.h"
#include "xla_ffi/cpu/traffic.h"

namespace nb = nanobind;

NB_MODULE(_ccfuser_cpu, m) {
  ccf::UseCallerThreadOnly();
  ccf::DefineRegistrations(m, CcfMoeForwardCpu, CcfMoeBackwardCpu);
  m.def("peer_group_count", &ccf::PeerGroupCount,
        "Live (call site, group) entries of the peer registry.");
  m.def("map_segment", &ccf::MapSegment, nb::arg("name"), nb::arg("bytes"), nb::arg("create"),
        nb::arg("device"), nb::arg("chunk"),
        "Creates or opens shared-memory segment `name` as (device, chunk)'s workspace; \"\" or why not.");
  m.def("unlink_segment", &ccf::UnlinkSegment, nb::arg("name"),
        "Removes a segment's name (its mappings stay); \"\" or why not.");
  m.def(
      "exited_process",
      [](int32_t device) -> int64_t {
        const ccf::Segment* first = ccf::FindSegment(device, 0);
        return first && first->liveness ? ccf::ExitedProcess(*first->liveness) : 0;
      },
      nb::arg("device"),
      "The id of the process that runs `device` if it has exited, else 0 (or where unknown).");
  m.def("mark_departed", &ccf::MarkDeparted,
        "Tells the peers in other processes that this process's devices will make no more calls.");
  m.def(
      "shared_region_bytes",
      [](int64_t tokens, int64_t hidden, int64_t k, int64_t slots, int64_t x_bytes,
         int64_t weights_bytes, int64_t experts_local, int64_t expert_elements, int64_t w_bytes,
         int64_t plan_slots, bool backward) {
        return ccf::LayoutRegion({tokens, hidden, k, slots, x_bytes, weights_bytes, experts_local,
                                  expert_elements, w_bytes, plan_slots, backward})
            .bytes;
      },
      nb::arg("tokens"), nb::arg("hidden"), nb::arg("k"), nb::arg("slots"), nb::arg("x_bytes"),
      nb::arg("weights_bytes"), nb::arg("experts_local"), nb::arg("expert_elements"),
      nb::arg("w_bytes"), nb::arg("plan_slots"), nb::arg("backward"),
      "Bytes of one device's region of a shared-memory call site.");
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
