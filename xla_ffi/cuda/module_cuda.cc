// The nanobind module `jax_ccfuser._ccfuser_cuda`: hands the CUDA handlers to Python, which
// registers them for platform "CUDA" under the same target names as the CPU ones, and the CUDA
// IPC workspaces shared by the processes of a host (ipc_memory.h).
#include <cstring>
#include <string>
#include <utility>

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/cuda/cuda_launch.h"
#include "xla_ffi/ffi_module.h"
#include "xla_ffi/cuda/ipc_memory.h"
#include "xla_ffi/peer_group.h"
#include "xla_ffi/region_layout.h"

namespace nb = nanobind;

// Defined in moe_cuda.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeBackwardCuda);

NB_MODULE(_ccfuser_cuda, m) {
  ccf::DefineRegistrations(m, CcfMoeForwardCuda, CcfMoeBackwardCuda);
  m.def("grouped_gemms", &ccf::GroupedGemms,
        "Whether the current GPU's calls run the GEMMs over pair rows as CUTLASS's SM90 grouped "
        "GEMMs (a Hopper GPU running the build's sm_90a code; JAX_CCFUSER_GROUPED_GEMMS=0 turns "
        "them off); false without a GPU.");
  m.def("fail_next_call_for_testing", &ccf::FailNextCallForTesting, nb::arg("rank"),
        "Makes the next call on device `rank` of an in-process group fail once the group has "
        "met, as a call going wrong midway.");
  m.def(
      "ipc_allocate",
      [](int ordinal, int64_t bytes, int32_t device, int32_t chunk) {
        cudaIpcMemHandle_t handle{};
        std::string err = ccf::IpcAllocate(ordinal, bytes, device, chunk, &handle);
        return std::make_pair(nb::bytes(handle.reserved, err.empty() ? sizeof(handle) : 0),
                              std::move(err));
      },
      nb::arg("ordinal"), nb::arg("bytes"), nb::arg("device"), nb::arg("chunk"),
      "Allocates a zeroed workspace chunk on local GPU `ordinal` as (device, chunk)'s; (its "
      "CUDA IPC handle, \"\") or (b\"\", why not).");
  m.def(
      "ipc_open",
      [](int ordinal, nb::bytes handle, int64_t bytes, int32_t device, int32_t chunk) {
        cudaIpcMemHandle_t h;
        if (handle.size() != sizeof(h))
          return "jax_ccfuser: a CUDA IPC handle has " + std::to_string(sizeof(h)) +
                 " bytes; got " + std::to_string(handle.size());
        std::memcpy(h.reserved, handle.c_str(), sizeof(h));
        return ccf::IpcOpen(ordinal, h, bytes, device, chunk);
      },
      nb::arg("ordinal"), nb::arg("handle"), nb::arg("bytes"), nb::arg("device"),
      nb::arg("chunk"),
      "Opens another process's workspace chunk (device, chunk) from its CUDA IPC handle on "
      "local GPU `ordinal`; \"\" or why not.");
  m.def(
      "shared_region_bytes",
      [](int64_t tokens, int64_t hidden, int64_t k, int64_t slots, int64_t x_bytes,
         int64_t weights_bytes, bool backward) {
        return ccf::LayoutIpcRegion(tokens, hidden, k, slots, x_bytes, weights_bytes, backward)
            .bytes;
      },
      nb::arg("tokens"), nb::arg("hidden"), nb::arg("k"), nb::arg("slots"), nb::arg("x_bytes"),
      nb::arg("weights_bytes"), nb::arg("backward"),
      "Bytes of one device's region of a call site in the CUDA IPC workspaces.");
  // For bench/model.py's test: the threshold its model of the source phases states.
  m.attr("phase_rows") = ccf::kPhaseRows;
  m.def(
      "scratch_bytes",
      [](int num_devices, int64_t tokens, int64_t hidden, int64_t ffn, int64_t k,
         int64_t experts_local, bool gated, bool float32, bool emulated, bool backward,
         int64_t scratch_budget, bool grouped_gemms, int num_sms, bool weight_grads) {
        ccf::Call call;
        call.d.num_devices = num_devices;
        call.d.tokens = tokens;
        call.d.hidden = hidden;
        call.d.ffn = ffn;
        call.d.gate_ffn = (gated ? 2 : 1) * ffn;
        call.d.k = k;
        call.d.experts_local = experts_local;
        call.d.x_type = float32 ? xla::ffi::DataType::F32 : xla::ffi::DataType::BF16;
        call.experts_here = static_cast<int32_t>(emulated ? num_devices * experts_local
                                                          : experts_local);
        call.grouped_gemms = grouped_gemms && !float32;
        call.num_sms = num_sms;
        call.weight_grads = weight_grads;
        return ccf::SizeChunks(&call, scratch_budget, backward);
      },
      nb::arg("num_devices"), nb::arg("tokens"), nb::arg("hidden"), nb::arg("ffn"), nb::arg("k"),
      nb::arg("experts_local"), nb::arg("gated"), nb::arg("float32"), nb::arg("emulated"),
      nb::arg("backward"), nb::arg("scratch_budget"), nb::arg("grouped_gemms") = false,
      nb::arg("num_sms") = 132, nb::arg("weight_grads") = true,
      "Bytes of scratch one forward or backward call takes from XLA's allocator on one GPU "
      "under a scratch budget (no reassignment plan; float32 or a 16-bit dtype; with the grouped "
      "GEMMs' float32 rows and workspace on `num_sms` SMs or without; a backward with the expert "
      "weights' gradients or, frozen, without), as the handler sizes its chunks.");
}
