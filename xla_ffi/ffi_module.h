// What both nanobind modules hand Python: their ABI number, their handlers as capsules and the
// call contract: the attributes' names and types, and the codes of the `activation` attribute.
#pragma once

#include <cstdint>

#include <nanobind/nanobind.h>

#include "common/activation.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/moe_call.h"

namespace ccf {

// Must equal jax_ccfuser/_extension.py's ABI_VERSION; bumped when an FFI signature, a function
// the modules hand Python or the shared liveness page changes.
constexpr int kAbiVersion = 8;

// The jaxlib whose FFI headers the module was built against (CMake defines it): an older jaxlib
// refuses handlers of a newer FFI API, and then fails every computation, JAX's own too.
#ifndef CCF_JAXLIB_VERSION
#define CCF_JAXLIB_VERSION ""  // a build other than CMake's: unknown, not checked
#endif

// An attribute's type as Python gives it: a numpy dtype name, "[]" after it for an array.
template <typename T>
struct AttrTypeName;
template <>
struct AttrTypeName<uint64_t> {
  static constexpr const char* kName = "uint64";
};
template <>
struct AttrTypeName<int64_t> {
  static constexpr const char* kName = "int64";
};
template <>
struct AttrTypeName<int32_t> {
  static constexpr const char* kName = "int32";
};
template <>
struct AttrTypeName<xla::ffi::Span<const int32_t>> {
  static constexpr const char* kName = "int32[]";
};

// Defines `abi_version()`, `jaxlib_version()`, `registrations()` ({target name: handler capsule}),
// `call_attributes()` ({attribute name: AttrTypeName}, in CCF_CALL_ATTRS order) and
// `activation_codes()` ({activation name: attribute value}) on `m`.
template <typename Handler>
void DefineRegistrations(nanobind::module_& m, Handler* forward, Handler* backward) {
  m.def("abi_version", [] { return kAbiVersion; });
  m.def("jaxlib_version", [] { return CCF_JAXLIB_VERSION; });
  m.def("registrations", [forward, backward] {
    nanobind::dict d;
    d["ccf_moe_fwd"] = nanobind::capsule(reinterpret_cast<void*>(forward));
    d["ccf_moe_bwd"] = nanobind::capsule(reinterpret_cast<void*>(backward));
    return d;
  });
  m.def("call_attributes", [] {
    nanobind::dict d;
#define CCF_CALL_ATTR_TYPE(type, name) d[#name] = AttrTypeName<type>::kName;
    CCF_CALL_ATTRS(CCF_CALL_ATTR_TYPE, )
#undef CCF_CALL_ATTR_TYPE
    return d;
  });
  m.def("activation_codes", [] {
    nanobind::dict d;
    for (int32_t code = 0; code < kNumActivations; ++code) d[kActivationNames[code]] = code;
    return d;
  });
}

}  // namespace ccf
