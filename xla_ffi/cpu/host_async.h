// The CPU handlers run on threads of their own: the handler XLA calls returns a future at once.
//
// A handler that waits for its peers must not hold a thread of XLA:CPU's executor. That executor
// runs a program's ready operations in whatever order its threads pick them up, which can
// differ between the devices of one program: one device could wait in this handler for a peer
// that waits, in turn, in an XLA collective (a psum) that the first device would run only after
// this handler returns. Neither returns: XLA aborts the process after 40 s. XLA orders its own
// collectives among themselves; it cannot order them with a custom call. On a thread of its own
// the handler waits while the executor goes on with the rest of the program, so every device
// reaches both the collective and this call.
//
// What XLA passes a handler lives only as long as the call that XLA makes: the buffers'
// descriptors and the attributes' arrays belong to its call frame, the thread pool to its
// execution context. So the handler keeps copies of the descriptors (the memory they describe
// stays XLA's until the future completes) and takes its worker threads from HostThreads.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/moe_call.h"

namespace ccf {

// Copies of one call's buffer descriptors and attribute arrays, for as long as the call runs.
class KeptCall {
 public:
  xla::ffi::AnyBuffer Keep(const xla::ffi::AnyBuffer& b) {
    return xla::ffi::AnyBuffer(Describe(b.element_type(), b.untyped_data(), b.dimensions()));
  }

  template <xla::ffi::DataType dtype, size_t rank>
  xla::ffi::Buffer<dtype, rank> Keep(const xla::ffi::Buffer<dtype, rank>& b) {
    return xla::ffi::Buffer<dtype, rank>(Describe(dtype, b.untyped_data(), b.dimensions()));
  }

  template <typename T>
  xla::ffi::Result<T> Keep(xla::ffi::Result<T> r) {
    return xla::ffi::Result<T>(Keep(*r));
  }

  CallAttrs Keep(const CallAttrs& attrs) {
    CallAttrs kept = attrs;
    const std::vector<int32_t>& devices =
        devices_.emplace_back(attrs.devices.begin(), attrs.devices.end());
    kept.devices = xla::ffi::Span<const int32_t>(devices.data(), devices.size());
    return kept;
  }

 private:
  const XLA_FFI_Buffer* Describe(xla::ffi::DataType dtype, void* data,
                                 xla::ffi::Span<const int64_t> dims) {
    std::vector<int64_t>& kept_dims = dims_.emplace_back(dims.begin(), dims.end());
    XLA_FFI_Buffer& b = buffers_.emplace_back();
    b.struct_size = XLA_FFI_Buffer_STRUCT_SIZE;
    b.extension_start = nullptr;
    b.dtype = static_cast<XLA_FFI_DataType>(dtype);
    b.data = data;
    b.rank = static_cast<int64_t>(kept_dims.size());
    b.dims = kept_dims.data();
    return &b;
  }

  // Deques: what is kept never moves while more is added.
  std::deque<XLA_FFI_Buffer> buffers_;
  std::deque<std::vector<int64_t>> dims_;
  std::deque<std::vector<int32_t>> devices_;
};

// `Detached<&Impl>::Call` is the handler XLA calls for `Impl`: it keeps the call's arguments and
// runs `Impl` on a new thread, whose error (or success) completes the returned future. XLA then
// resumes the program on that thread.
template <auto Impl>
struct Detached;

template <typename... Args, xla::ffi::Error (*Impl)(Args...)>
struct Detached<Impl> {
  static xla::ffi::Future Call(Args... args) {
    auto kept = std::make_shared<KeptCall>();
    auto call = std::make_shared<std::tuple<Args...>>(kept->Keep(args)...);
    xla::ffi::Promise promise;
    xla::ffi::Future future(promise);
    try {
      std::thread([kept, call, promise]() mutable {
        xla::ffi::Error status = std::apply(Impl, *call);
        if (status.failure())
          promise.SetError(std::move(status));
        else
          promise.SetAvailable();
      }).detach();
    } catch (const std::system_error& e) {  // no thread to be had: the call fails, nothing waits
      promise.SetError(xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                                       std::string("jax_ccfuser: no thread for the call: ") +
                                           e.what()));
    }
    return future;
  }
};

}  // namespace ccf
