// The CPU handlers of the fused MoE ("ccf_moe_fwd" / "ccf_moe_bwd" for platform "cpu").
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CcfMoeBackwardCpu);
