// The nanobind module `jax_ccfuser._ccfuser_cuda`: hands the CUDA handlers to Python, which
// registers them for platform "CUDA" under the same target names as the CPU ones.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/ffi_module.h"

// Defined in moe_cuda.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeBackwardCuda);

NB_MODULE(_ccfuser_cuda, m) {
  ccf::DefineRegistrations(m, CcfMoeForwardCuda, CcfMoeBackwardCuda);
}
