// Depthwise 3x3 convolution (padding 1, stride 1 or 2) of an NHWC float32 tensor with
// BatchNorm folded in, as one pass: an XLA FFI handler for CPU inference.
//
//   out = act(conv(pre(x)) * mul + add) + residual
//
// where pre(x) = ReLU6(x * in_mul + in_add) when `input_bn_relu6` (the BatchNorm and ReLU6 of
// the 1x1 convolution that feeds the layer) and x otherwise, act is ReLU6 when `relu6`, and
// `residual` (the block's input) is added when given. XLA:CPU would run these as separate
// elementwise passes over padded copies; here each input row goes once through `pre` into a
// zero-bordered ring of three rows that stays in cache, and each output vector of channels is
// written once. Channels are contiguous, so one step computes 16 (then 8, then single) channels
// for a few neighbouring output pixels whose windows share input columns, with the nine tap
// vectors held in registers along the row.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Buffer types by rank (named, since a comma inside the handler macro would split its argument).
using Tensor4 = ffi::Buffer<ffi::F32, 4>;
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Vector = ffi::Buffer<ffi::F32, 1>;

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));

template <typename V>
inline V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void Store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

template <typename V>
inline V Relu6(V v) {
  const V zero = {};
  const V six = zero + 6.0f;
  v = v < zero ? zero : v;
  return v > six ? six : v;
}

inline float Relu6(float v) { return std::min(std::max(v, 0.0f), 6.0f); }

struct Layer {
  int64_t height, width, channels, out_height, out_width;
  const float* taps;  // (9, C)
  const float* mul;
  const float* add;
  const float* in_mul;  // null: no input BatchNorm + ReLU6
  const float* in_add;
  bool relu6;
};

// Three input rows, each `width + 2` pixels with a zero pixel at both ends; a row outside the
// image is all zeros. Row `ih` lives in slot (ih + 1) % 3.
class RowRing {
 public:
  // Slots start on 64-byte boundaries (as XLA's buffers do): a 16-lane load that straddled two
  // cache lines would cost two.
  explicit RowRing(const Layer& l)
      : l_(l), stride_(((l.width + 2) * l.channels + 15) / 16 * 16), storage_(3 * stride_ + 16) {
    const auto address = reinterpret_cast<std::uintptr_t>(storage_.data());
    data_ = storage_.data() + (-address / sizeof(float)) % 16;
    std::fill(storage_.begin(), storage_.end(), 0.0f);
  }

  // Fill the slots for input rows ih0 .. ih0 + 2 of `image`, converting only rows not held.
  void Hold(const float* image, int64_t ih0) {
    for (int64_t ih = ih0; ih < ih0 + 3; ++ih) {
      const int64_t slot = (ih + 1) % 3;
      if (held_[slot] == ih) continue;
      held_[slot] = ih;
      float* row = data_ + slot * stride_ + l_.channels;  // past the left zero pixel
      if (ih < 0 || ih >= l_.height) {
        std::fill(row, row + l_.width * l_.channels, 0.0f);
      } else {
        Convert(image + ih * l_.width * l_.channels, row);
      }
    }
  }

  // Forget the rows held: the next image's rows have the same numbers.
  void Reset() { std::fill(held_, held_ + 3, int64_t{-9}); }

  const float* Row(int64_t ih) const { return data_ + ((ih + 1) % 3) * stride_; }

 private:
  void Convert(const float* in, float* out) const {
    const int64_t n = l_.width * l_.channels, C = l_.channels;
    if (l_.in_mul == nullptr) {
      std::copy(in, in + n, out);
      return;
    }
    for (int64_t p = 0; p < n; p += C) {
      for (int64_t c = 0; c < C; ++c) out[p + c] = Relu6(in[p + c] * l_.in_mul[c] + l_.in_add[c]);
    }
  }

  const Layer& l_;
  int64_t stride_;
  std::vector<float> storage_;
  float* data_;
  int64_t held_[3] = {-9, -9, -9};
};

// One output row, channels [c0, c0 + lanes of V), from the ring's zero-bordered rows.
template <int kStride, bool kRelu6, bool kResidual, typename V>
void RowVector(const Layer& l, const RowRing& ring, int64_t oh, int64_t c0,
               const float* __restrict residual, float* __restrict out) {
  const int64_t C = l.channels, out_width = l.out_width;
  V w[9];
  for (int t = 0; t < 9; ++t) w[t] = Load<V>(l.taps + t * C + c0);
  const V mul = Load<V>(l.mul + c0), add = Load<V>(l.add + c0);
  const float* rows[3];
  for (int k = 0; k < 3; ++k) rows[k] = ring.Row(oh * kStride - 1 + k) + c0;
  auto finish = [&](V acc, int64_t ow) {
    V y = acc * mul + add;
    if constexpr (kRelu6) y = Relu6(y);
    if constexpr (kResidual) y += Load<V>(residual + ow * C + c0);
    Store<V>(out + ow * C + c0, y);
  };
  // kBlock outputs per step read the kCols bordered input columns their windows cover.
  constexpr int kBlock = kStride == 1 ? 4 : 2;
  constexpr int kCols = (kBlock - 1) * kStride + 3;
  int64_t ow = 0;
  for (; ow + kBlock <= out_width; ow += kBlock) {
    V acc[kBlock] = {};
    for (int k = 0; k < 3; ++k) {
      const float* p = rows[k] + ow * kStride * C;
      V col[kCols];
      for (int j = 0; j < kCols; ++j) col[j] = Load<V>(p + j * C);
      for (int b = 0; b < kBlock; ++b) {
        acc[b] += col[b * kStride] * w[3 * k] + col[b * kStride + 1] * w[3 * k + 1] +
                  col[b * kStride + 2] * w[3 * k + 2];
      }
    }
    for (int b = 0; b < kBlock; ++b) finish(acc[b], ow + b);
  }
  for (; ow < out_width; ++ow) {
    V acc = {};
    for (int k = 0; k < 3; ++k) {
      const float* p = rows[k] + ow * kStride * C;
      acc += Load<V>(p) * w[3 * k] + Load<V>(p + C) * w[3 * k + 1] + Load<V>(p + 2 * C) * w[3 * k + 2];
    }
    finish(acc, ow);
  }
}

// Single lanes, for the channels left over after the vectors.
template <int kStride>
void RowScalar(const Layer& l, const RowRing& ring, int64_t oh, int64_t c0, const float* residual,
               float* out) {
  const int64_t C = l.channels;
  for (int64_t ow = 0; ow < l.out_width; ++ow) {
    for (int64_t c = c0; c < C; ++c) {
      float acc = 0.0f;
      for (int k = 0; k < 3; ++k) {
        const float* p = ring.Row(oh * kStride - 1 + k) + ow * kStride * C + c;
        for (int j = 0; j < 3; ++j) acc += p[j * C] * l.taps[(3 * k + j) * C + c];
      }
      float y = acc * l.mul[c] + l.add[c];
      if (l.relu6) y = Relu6(y);
      if (residual != nullptr) y += residual[ow * C + c];
      out[ow * C + c] = y;
    }
  }
}

template <int kStride, bool kRelu6, bool kResidual>
void Depthwise(const Layer& l, int64_t batch, const float* x, const float* residual, float* y) {
  const int64_t C = l.channels, in_image = l.height * l.width * C;
  const int64_t out_row = l.out_width * C;
  RowRing ring(l);
  for (int64_t n = 0; n < batch; ++n) {
    ring.Reset();
    for (int64_t oh = 0; oh < l.out_height; ++oh) {
      ring.Hold(x + n * in_image, oh * kStride - 1);
      const int64_t at = (n * l.out_height + oh) * out_row;
      const float* res = residual != nullptr ? residual + at : nullptr;
      int64_t c0 = 0;
      for (; c0 + 16 <= C; c0 += 16) {
        RowVector<kStride, kRelu6, kResidual, f32x16>(l, ring, oh, c0, res, y + at);
      }
      for (; c0 + 8 <= C; c0 += 8) {
        RowVector<kStride, kRelu6, kResidual, f32x8>(l, ring, oh, c0, res, y + at);
      }
      if (c0 < C) RowScalar<kStride>(l, ring, oh, c0, res, y + at);
    }
  }
}

// Depthwise<stride, relu6, residual>, with the flags known at compile time in the inner loops.
void Dispatch(const Layer& l, int64_t batch, const float* x, const float* residual, float* y,
              int64_t stride) {
  const bool r = residual != nullptr;
  if (stride == 1 && l.relu6 && r) return Depthwise<1, true, true>(l, batch, x, residual, y);
  if (stride == 1 && l.relu6) return Depthwise<1, true, false>(l, batch, x, residual, y);
  if (stride == 1 && r) return Depthwise<1, false, true>(l, batch, x, residual, y);
  if (stride == 1) return Depthwise<1, false, false>(l, batch, x, residual, y);
  if (l.relu6 && r) return Depthwise<2, true, true>(l, batch, x, residual, y);
  if (l.relu6) return Depthwise<2, true, false>(l, batch, x, residual, y);
  if (r) return Depthwise<2, false, true>(l, batch, x, residual, y);
  return Depthwise<2, false, false>(l, batch, x, residual, y);
}

ffi::Error Depthwise3x3(Tensor4 x, Matrix taps, Vector mul, Vector add, Vector in_mul,
                        Vector in_add, Tensor4 residual, ffi::Result<Tensor4> y, int64_t stride,
                        bool relu6, bool input_bn_relu6) {
  if (stride != 1 && stride != 2) return ffi::Error::InvalidArgument("stride must be 1 or 2");
  const auto d = x.dimensions();
  const int64_t C = d[3];
  const Layer l{d[1], d[2], C, (d[1] - 1) / stride + 1, (d[2] - 1) / stride + 1,
                taps.typed_data(), mul.typed_data(), add.typed_data(),
                input_bn_relu6 ? in_mul.typed_data() : nullptr, in_add.typed_data(), relu6};
  if (taps.dimensions()[0] != 9 || taps.dimensions()[1] != C || mul.dimensions()[0] != C ||
      add.dimensions()[0] != C ||
      (input_bn_relu6 && (in_mul.dimensions()[0] != C || in_add.dimensions()[0] != C))) {
    return ffi::Error::InvalidArgument("taps must be (9, C) and mul, add (C,) for C channels");
  }
  const auto yd = y->dimensions();
  if (yd[0] != d[0] || yd[1] != l.out_height || yd[2] != l.out_width || yd[3] != C) {
    return ffi::Error::InvalidArgument("output shape does not match the input and stride");
  }
  const bool has_residual = residual.element_count() > 0;
  const auto rd = residual.dimensions();
  if (has_residual && !std::equal(rd.begin(), rd.end(), yd.begin(), yd.end())) {
    return ffi::Error::InvalidArgument("residual must be shaped like the output");
  }
  Dispatch(l, d[0], x.typed_data(), has_residual ? residual.typed_data() : nullptr,
           y->typed_data(), stride);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxDepthwise3x3, Depthwise3x3,
                              ffi::Ffi::Bind()
                                  .Arg<Tensor4>()  // x
                                  .Arg<Matrix>()   // taps
                                  .Arg<Vector>()   // mul
                                  .Arg<Vector>()   // add
                                  .Arg<Vector>()   // in_mul
                                  .Arg<Vector>()   // in_add
                                  .Arg<Tensor4>()  // residual, or empty
                                  .Ret<Tensor4>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("relu6")
                                  .Attr<bool>("input_bn_relu6"));
