// A buffer XLA allocates and nothing writes: the output of a cache-blocked inference loop,
// written in full chunk by chunk before anything reads it. XLA:CPU's zeros for it (what
// lax.scan's stacked outputs start from) cost a pass over the whole result each call, a write
// of memory that the loop overwrites anyway (docs/cpu_backend.md).
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// `trip` is not read: it ties the buffer to the loop trip it is made in (see cpu_kernels.py).
ffi::Error Uninitialized(ffi::AnyBuffer trip, ffi::Result<ffi::AnyBuffer>) {
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxUninitialized, Uninitialized,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
