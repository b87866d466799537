// Dense 3x3 convolution (padding 1, stride 1 or 2) of an NHWC float32 tensor with few input
// channels, BatchNorm folded in, as one pass: an XLA FFI handler for CPU inference.
//
//   out = act(conv(x) * mul + add),  act = ReLU6 when `relu6`
//
// The networks' stem (3 input channels, 32 outputs) is the use: XLA:CPU builds it as nine
// strided slices concatenated into a 27-channel copy of the output's size, one thin matmul, and
// an elementwise pass for the BatchNorm and ReLU6, each writing or reading a tensor of the
// output's size; this pass reads the input once and writes the output once (measurements:
// docs/cpu_backend.md). Each step computes 8 neighbouring output pixels for 32 (then 16, 8,
// single) output channels: every input value of their windows is broadcast against
// the tap's weight vectors, with the 8 x 2 accumulators in registers (4 x 2 without AVX-512).
// Input rows go into a zero-bordered ring of three rows, so no padded copy is made and the loops
// have no edge cases.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace ca_flax;

struct Dense {
  int64_t height, width, in_channels, out_channels, out_height, out_width;
  const float* taps;  // (3, 3, in, out)
  const float* mul;
  const float* add;
};

// kPixels neighbouring outputs of one row from `ow`, channels [c0, c0 + kVecs * lanes of V).
template <int kStride, bool kRelu6, int kPixels, int kVecs, typename V>
__attribute__((always_inline)) inline void Pixels(const Dense& l, const float* const rows[3],
                                                  int64_t ow, int64_t c0, float* __restrict out) {
  constexpr int64_t L = kLanes<V>;
  const int64_t Ci = l.in_channels, Co = l.out_channels;
  V acc[kPixels][kVecs] = {};
  for (int ky = 0; ky < 3; ++ky) {
    for (int kx = 0; kx < 3; ++kx) {
      const float* in = rows[ky] + (ow * kStride + kx) * Ci;
      const float* w = l.taps + (ky * 3 + kx) * Ci * Co + c0;
      for (int64_t ci = 0; ci < Ci; ++ci, w += Co) {
        V tap[kVecs];
        CA_FLAX_UNROLL for (int v = 0; v < kVecs; ++v) tap[v] = Load<V>(w + v * L);
        CA_FLAX_UNROLL for (int p = 0; p < kPixels; ++p) {
          const float value = in[p * kStride * Ci + ci];
          CA_FLAX_UNROLL for (int v = 0; v < kVecs; ++v) acc[p][v] += tap[v] * value;
        }
      }
    }
  }
  CA_FLAX_UNROLL for (int v = 0; v < kVecs; ++v) {
    const V mul = Load<V>(l.mul + c0 + v * L), add = Load<V>(l.add + c0 + v * L);
    CA_FLAX_UNROLL for (int p = 0; p < kPixels; ++p) {
      V y = acc[p][v] * mul + add;
      if constexpr (kRelu6) y = Relu6(y);
      Store<V>(out + (ow + p) * Co + c0 + v * L, y);
    }
  }
}

// One output row, channels [c0, c0 + kVecs * lanes of V): kPixels a step, then 4, then 1.
template <int kStride, bool kRelu6, int kPixels, int kVecs, typename V>
void Row(const Dense& l, const float* const rows[3], int64_t c0, float* out) {
  int64_t ow = 0;
  for (; ow + kPixels <= l.out_width; ow += kPixels) {
    Pixels<kStride, kRelu6, kPixels, kVecs, V>(l, rows, ow, c0, out);
  }
  if constexpr (kPixels > 4) {
    for (; ow + 4 <= l.out_width; ow += 4) {
      Pixels<kStride, kRelu6, 4, kVecs, V>(l, rows, ow, c0, out);
    }
  }
  for (; ow < l.out_width; ++ow) Pixels<kStride, kRelu6, 1, kVecs, V>(l, rows, ow, c0, out);
}

template <int kStride, bool kRelu6>
void Conv(const Dense& l, int64_t batch, const float* x, float* y) {
  const int64_t Ci = l.in_channels, Co = l.out_channels, padded = (l.width + 2) * Ci;
  std::vector<float> ring(3 * padded, 0.0f);  // row ih in slot (ih + 1) % 3, zero at both ends
  for (int64_t n = 0; n < batch; ++n) {
    const float* image = x + n * l.height * l.width * Ci;
    int64_t next = -1;  // the next input row to copy in
    for (int64_t oh = 0; oh < l.out_height; ++oh) {
      for (; next <= oh * kStride + 1; ++next) {
        float* row = ring.data() + ((next + 1) % 3) * padded + Ci;
        if (next < 0 || next >= l.height) {
          std::fill(row, row + l.width * Ci, 0.0f);
        } else {
          std::copy(image + next * l.width * Ci, image + (next + 1) * l.width * Ci, row);
        }
      }
      const float* rows[3];
      for (int k = 0; k < 3; ++k) rows[k] = ring.data() + ((oh * kStride + k) % 3) * padded;
      float* out = y + (n * l.out_height + oh) * l.out_width * Co;
      int64_t c0 = 0;
      if constexpr (kWide) {  // 8 x 2 accumulators of 16 lanes
        for (; c0 + 32 <= Co; c0 += 32) Row<kStride, kRelu6, 8, 2, f32x16>(l, rows, c0, out);
        for (; c0 + 16 <= Co; c0 += 16) Row<kStride, kRelu6, 8, 1, f32x16>(l, rows, c0, out);
      } else {  // 4 x 2 of 8 lanes: 16 registers (AVX2) hold no more
        for (; c0 + 16 <= Co; c0 += 16) Row<kStride, kRelu6, 4, 2, f32x8>(l, rows, c0, out);
      }
      for (; c0 + 8 <= Co; c0 += 8) Row<kStride, kRelu6, 8, 1, f32x8>(l, rows, c0, out);
      for (; c0 < Co; ++c0) Row<kStride, kRelu6, 8, 1, float>(l, rows, c0, out);
    }
  }
}

// Computes y for images [first, first + y's batch) of x, `first` clamped into range as
// lax.dynamic_slice clamps: a chunk of a batch read in place rather than copied out first.
ffi::Error Conv3x3(Tensor4 x, Int32 first, Tensor4 taps, Vector mul,
                   Vector add, ffi::Result<Tensor4> y, int64_t stride, bool relu6) {
  if (stride != 1 && stride != 2) return ffi::Error::InvalidArgument("stride must be 1 or 2");
  const auto d = x.dimensions(), td = taps.dimensions(), yd = y->dimensions();
  const int64_t Ci = d[3], Co = td[3];
  if (td[0] != 3 || td[1] != 3 || td[2] != Ci || mul.dimensions()[0] != Co ||
      add.dimensions()[0] != Co) {
    return ffi::Error::InvalidArgument("taps must be (3, 3, C_in, C_out) and mul, add (C_out,)");
  }
  const Dense l{d[1], d[2], Ci, Co, Strided(d[1], stride), Strided(d[2], stride),
                taps.typed_data(), mul.typed_data(), add.typed_data()};
  if (yd[0] > d[0] || yd[1] != l.out_height || yd[2] != l.out_width || yd[3] != Co) {
    return ffi::Error::InvalidArgument("output shape does not match the input, taps and stride");
  }
  const int64_t start = std::clamp<int64_t>(*first.typed_data(), 0, d[0] - yd[0]);
  const auto run = stride == 1 ? (relu6 ? Conv<1, true> : Conv<1, false>)
                               : (relu6 ? Conv<2, true> : Conv<2, false>);
  run(l, yd[0], x.typed_data() + start * d[1] * d[2] * Ci, y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Arg<Tensor4>()  // x
                                  .Arg<Int32>()    // first
                                  .Arg<Tensor4>()  // taps
                                  .Arg<Vector>()   // mul
                                  .Arg<Vector>()   // add
                                  .Ret<Tensor4>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("relu6"));
