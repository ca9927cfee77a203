// The nanobind module `jax_ccfuser._ccfuser_cuda`: hands the CUDA handlers to Python, which
// registers them for platform "CUDA" under the same target names as the CPU ones.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/ffi.h"

// Defined in moe_cuda.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeBackwardCuda);

namespace nb = nanobind;

namespace {
// Must equal jax_ccfuser/_extension.py's ABI_VERSION.
constexpr int kAbiVersion = 2;

template <typename T>
nb::capsule Capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_ccfuser_cuda, m) {
  m.def("abi_version", [] { return kAbiVersion; });
  m.def("registrations", [] {
    nb::dict d;
    d["ccf_moe_fwd"] = Capsule(CcfMoeForwardCuda);
    d["ccf_moe_bwd"] = Capsule(CcfMoeBackwardCuda);
    return d;
  });
}
