// What both nanobind modules hand Python: their ABI number, their handlers as capsules and the
// codes of the `activation` attribute.
#pragma once

#include <nanobind/nanobind.h>

#include "common/activation.h"

namespace ccf {

// Must equal jax_ccfuser/_extension.py's ABI_VERSION; bumped when an FFI signature changes.
constexpr int kAbiVersion = 4;

// Defines `abi_version()`, `registrations()` ({target name: handler capsule}) and
// `activation_codes()` ({activation name: attribute value}) on `m`.
template <typename Handler>
void DefineRegistrations(nanobind::module_& m, Handler* forward, Handler* backward) {
  m.def("abi_version", [] { return kAbiVersion; });
  m.def("registrations", [forward, backward] {
    nanobind::dict d;
    d["ccf_moe_fwd"] = nanobind::capsule(reinterpret_cast<void*>(forward));
    d["ccf_moe_bwd"] = nanobind::capsule(reinterpret_cast<void*>(backward));
    return d;
  });
  m.def("activation_codes", [] {
    nanobind::dict d;
    for (int32_t code = 0; code < kNumActivations; ++code) d[kActivationNames[code]] = code;
    return d;
  });
}

}  // namespace ccf
