// Coordinate Attention's gate, x * a_h * a_w, in place: an XLA FFI handler for CPU inference.
//
// x is NHWC float32; a_h (N, H, 1, C) holds one gate vector per row, a_w (N, 1, W, C) one per
// column. The output is x's own buffer (aliased by the caller), so the pass reads each line of x
// once and writes it back while it is still in cache, where XLA:CPU's loop writes a second
// tensor of the same size.
#include <cstdint>

#include "simd.h"

namespace {

using namespace ca_flax;

template <typename V>
inline int64_t Lanes(const float* x, const float* gh, const float* gw, float* y, int64_t c,
                     int64_t channels) {
  constexpr int64_t L = kLanes<V>;
  for (; c + L <= channels; c += L) {
    Store<V>(y + c, Load<V>(x + c) * Load<V>(gh + c) * Load<V>(gw + c));
  }
  return c;
}

ffi::Error Gate(Tensor4 x, Tensor4 a_h, Tensor4 a_w, ffi::Result<Tensor4> y) {
  const auto d = x.dimensions(), hd = a_h.dimensions(), wd = a_w.dimensions();
  const int64_t N = d[0], H = d[1], W = d[2], C = d[3];
  if (hd[0] != N || hd[1] != H || hd[2] != 1 || hd[3] != C || wd[0] != N || wd[1] != 1 ||
      wd[2] != W || wd[3] != C) {
    return ffi::Error::InvalidArgument("a_h must be (N, H, 1, C) and a_w (N, 1, W, C) for x");
  }
  const float* in = x.typed_data();
  float* out = y->typed_data();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < H; ++h) {
      const float* gh = a_h.typed_data() + (n * H + h) * C;
      for (int64_t w = 0; w < W; ++w) {
        const float* gw = a_w.typed_data() + (n * W + w) * C;
        const int64_t at = ((n * H + h) * W + w) * C;
        int64_t c = 0;
        if constexpr (kWide) c = Lanes<f32x16>(in + at, gh, gw, out + at, c, C);
        c = Lanes<f32x8>(in + at, gh, gw, out + at, c, C);
        for (; c < C; ++c) out[at + c] = in[at + c] * gh[c] * gw[c];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxGate, Gate,
                              ffi::Ffi::Bind()
                                  .Arg<Tensor4>()  // x
                                  .Arg<Tensor4>()  // a_h
                                  .Arg<Tensor4>()  // a_w
                                  .Ret<Tensor4>());
