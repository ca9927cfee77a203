// What both nanobind modules hand Python: their ABI number and their handlers as capsules.
#pragma once

#include <nanobind/nanobind.h>

namespace ccf {

// Must equal jax_ccfuser/_extension.py's ABI_VERSION; bumped when an FFI signature changes.
constexpr int kAbiVersion = 3;

// Defines `abi_version()` and `registrations()` ({target name: handler capsule}) on `m`.
template <typename Handler>
void DefineRegistrations(nanobind::module_& m, Handler* forward, Handler* backward) {
  m.def("abi_version", [] { return kAbiVersion; });
  m.def("registrations", [forward, backward] {
    nanobind::dict d;
    d["ccf_moe_fwd"] = nanobind::capsule(reinterpret_cast<void*>(forward));
    d["ccf_moe_bwd"] = nanobind::capsule(reinterpret_cast<void*>(backward));
    return d;
  });
}

}  // namespace ccf
