// Depthwise 3x3 convolution (padding 1, stride 1 or 2) of an NHWC float32 tensor with
// BatchNorm folded in, as one pass: an XLA FFI handler for CPU inference.
//
//   out = act(conv(pre(x)) * mul + add) + residual
//
// where pre(x) = ReLU6(x * in_mul + in_add) when `input_bn_relu6` (the BatchNorm and ReLU6 of
// the 1x1 convolution that feeds the layer) and x otherwise, act is ReLU6 when `relu6`, and
// `residual` (the block's input) is added when given. XLA:CPU would run these as separate
// elementwise passes over padded copies; here each output vector of channels is written once.
// Given `expand` (K x C), x has K channels and pre(x) = ReLU6(x @ expand + in_add) (the 1x1
// conv itself, its BatchNorm's scale folded into `expand`): the C-wide tensor, 4.8 MB per image
// in the networks' first blocks, is then never written, each input row being expanded into the
// ring as it is needed (8 pixels at a time, their inputs broadcast against a row of weights).
// Given `row_sums` and `col_sums`, the output is also summed over each row and each column as it
// is written: Coordinate Attention's pooling of it, where XLA:CPU reads the whole output again
// in two reductions.
//
// The work goes one group of 32 (then 16, 8, single; 8 first without AVX-512) channels at a
// time through a whole image:
// the group's input rows go once through `pre` into a zero-bordered ring of three rows that is
// a few KB (it stays in L1 however many channels the layer has), and each step computes a few
// neighbouring output pixels of one vector of channels whose windows share input columns, with
// the nine tap vectors in registers. A row-at-a-time order over all channels instead would
// need a ring that outgrows L1 on the wide layers. Groups of two vectors rather than one: the
// `expand` step does 16 FMAs per 10 loads instead of 8 per 9 (measurements of both choices:
// docs/cpu_backend.md).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace ca_flax;

struct Layer {
  int64_t height, width, channels, out_height, out_width;
  const float* taps;  // (9, C)
  const float* mul;
  const float* add;
  const float* in_mul;  // null: no input BatchNorm + ReLU6
  const float* in_add;
  bool relu6;
  int64_t in_channels = 0;  // of the input: `channels`, or K for `expand`
  const float* expand = nullptr;  // (K, C), the input BatchNorm's scale folded in; null: none
  float* row_sums = nullptr;  // (N, out_height, C): the output summed over each row; null: none
  float* col_sums = nullptr;  // (N, out_width, C): ... over each column
};

// The three input rows one output row needs, for one group of kSub vectors of channels: each
// row holds, per vector, `width + 2` pixels of kLanes<V> contiguous channels with a zero pixel
// at both ends, and a row outside the image is all zeros. Row `ih` lives in slot (ih + 1) % 3.
template <typename V, int kSub>
class RowRing {
 public:
  static constexpr int64_t L = kLanes<V>;

  // Rows start on 64-byte boundaries (as XLA's buffers do): a 16-lane load that straddled two
  // cache lines would cost two.
  explicit RowRing(const Layer& l)
      : l_(l), stride_(((l.width + 2) * L + 15) / 16 * 16), storage_(3 * kSub * stride_ + 16) {
    const auto address = reinterpret_cast<std::uintptr_t>(storage_.data());
    data_ = storage_.data() + (-address / sizeof(float)) % 16;
    std::fill(storage_.begin(), storage_.end(), 0.0f);
  }

  // Start on channels [c0, c0 + kSub * L) of `image`, holding no rows yet.
  void Start(const float* image, int64_t c0) {
    image_ = l_.expand == nullptr ? image + c0 : image;
    c0_ = c0;
    next_ = -1;
  }

  // Fill the slots up to input row `last`; rows are asked for in increasing order.
  void Hold(int64_t last) {
    for (; next_ <= last; ++next_) {
      float* row = data_ + ((next_ + 1) % 3) * kSub * stride_ + L;  // past the left zero pixel
      if (next_ < 0 || next_ >= l_.height) {
        for (int s = 0; s < kSub; ++s) {
          std::fill(row + s * stride_, row + s * stride_ + l_.width * L, 0.0f);
        }
      } else {
        const float* in = image_ + next_ * l_.width * l_.in_channels;
        if (l_.expand == nullptr) {
          Convert(in, row);
        } else {
          Expand(in, row);
        }
      }
    }
  }

  // Vector `s` of the group's row `ih`, from its left zero pixel.
  const float* Row(int64_t ih, int s) const {
    return data_ + (((ih + 1) % 3) * kSub + s) * stride_;
  }

 private:
  void Convert(const float* in, float* out) const {
    const int64_t C = l_.channels;
    for (int s = 0; s < kSub; ++s) {
      const float* x = in + s * L;
      float* y = out + s * stride_;
      if (l_.in_mul == nullptr) {
        for (int64_t p = 0; p < l_.width; ++p) Store<V>(y + p * L, Load<V>(x + p * C));
        continue;
      }
      const V mul = Load<V>(l_.in_mul + c0_ + s * L), add = Load<V>(l_.in_add + c0_ + s * L);
      for (int64_t p = 0; p < l_.width; ++p) {
        Store<V>(y + p * L, Relu6(Load<V>(x + p * C) * mul + add));
      }
    }
  }

  // relu6(in @ expand[:, group] + in_add) for each pixel of a row of K-channel inputs: the
  // expanding 1x1 conv with its BatchNorm and ReLU6, so the wide tensor is never written. Each
  // step broadcasts the inputs of kPixels pixels against a row of kSub weight vectors: with two
  // vectors, 16 FMAs per 10 loads, where one vector's 8 FMAs take 9 and wait on the loads.
  void Expand(const float* in, float* out) const {
    constexpr int kPixels = 8;
    int64_t p = 0;
    for (; p + kPixels <= l_.width; p += kPixels) ExpandPixels<kPixels>(in, p, out);
    // The rest as one step: a step of one pixel would wait on a single chain of FMAs.
    switch (l_.width - p) {
      case 7: return ExpandPixels<7>(in, p, out);
      case 6: return ExpandPixels<6>(in, p, out);
      case 5: return ExpandPixels<5>(in, p, out);
      case 4: return ExpandPixels<4>(in, p, out);
      case 3: return ExpandPixels<3>(in, p, out);
      case 2: return ExpandPixels<2>(in, p, out);
      case 1: return ExpandPixels<1>(in, p, out);
    }
  }

  template <int kPixels>
  __attribute__((always_inline)) inline void ExpandPixels(const float* in, int64_t p,
                                                          float* out) const {
    const int64_t K = l_.in_channels, C = l_.channels;
    const float* x = in + p * K;
    const float* w = l_.expand + c0_;
    V acc[kPixels][kSub];
    CA_FLAX_UNROLL for (int s = 0; s < kSub; ++s) {
      const V add = Load<V>(l_.in_add + c0_ + s * L);
      CA_FLAX_UNROLL for (int j = 0; j < kPixels; ++j) acc[j][s] = add;
    }
    for (int64_t k = 0; k < K; ++k, w += C) {
      V weights[kSub];
      CA_FLAX_UNROLL for (int s = 0; s < kSub; ++s) weights[s] = Load<V>(w + s * L);
      CA_FLAX_UNROLL for (int j = 0; j < kPixels; ++j) {
        const float value = x[j * K + k];
        CA_FLAX_UNROLL for (int s = 0; s < kSub; ++s) acc[j][s] += weights[s] * value;
      }
    }
    CA_FLAX_UNROLL for (int s = 0; s < kSub; ++s) {
      CA_FLAX_UNROLL for (int j = 0; j < kPixels; ++j) {
        Store<V>(out + s * stride_ + (p + j) * L, Relu6(acc[j][s]));
      }
    }
  }

  const Layer& l_;
  int64_t stride_;  // floats from one vector's row to the next
  std::vector<float> storage_;
  float* data_;
  const float* image_ = nullptr;
  int64_t c0_ = 0;
  int64_t next_ = -1;
};

// kBlock neighbouring outputs from `ow` of one output row, whose windows share the kCols
// bordered input columns they read from each of the three rows.
// With kSums, each output is also added to `row_sum` and to its column's vector in `col_sums`.
template <int kBlock, int kStride, bool kRelu6, bool kResidual, bool kSums, typename V>
inline void Block(const Layer& l, const float* const rows[3], const V w[9], V mul, V add,
                  int64_t ow, const float* __restrict residual, float* __restrict out,
                  V& row_sum, float* __restrict col_sums) {
  constexpr int64_t L = kLanes<V>;
  constexpr int kCols = (kBlock - 1) * kStride + 3;
  V part[3][kBlock];
  for (int k = 0; k < 3; ++k) {
    const float* p = rows[k] + ow * kStride * L;
    V col[kCols];
    for (int j = 0; j < kCols; ++j) col[j] = Load<V>(p + j * L);
    for (int b = 0; b < kBlock; ++b) part[k][b] = col[b * kStride] * w[3 * k];
    for (int j = 1; j < 3; ++j) {
      for (int b = 0; b < kBlock; ++b) part[k][b] += col[b * kStride + j] * w[3 * k + j];
    }
  }
  V acc[kBlock];
  for (int b = 0; b < kBlock; ++b) acc[b] = part[0][b] + part[1][b] + part[2][b];
  const int64_t C = l.channels;
  for (int b = 0; b < kBlock; ++b) {
    V y = acc[b] * mul + add;
    if constexpr (kRelu6) y = Relu6(y);
    if constexpr (kResidual) y += Load<V>(residual + (ow + b) * C);
    Store<V>(out + (ow + b) * C, y);
    if constexpr (kSums) {
      row_sum += y;
      float* col = col_sums + (ow + b) * L;
      Store<V>(col, Load<V>(col) + y);
    }
  }
}

// Channels [c0, c0 + kSub * lanes) of one image, row by row through the group's ring, one
// vector of channels after the other within each output row.
template <int kStride, bool kRelu6, bool kResidual, bool kSums, typename V, int kSub>
void Group(const Layer& l, RowRing<V, kSub>& ring, const float* image, int64_t c0,
           const float* __restrict residual, float* __restrict out, int64_t n,
           std::vector<float>& col_sums) {
  constexpr int64_t L = kLanes<V>;
  constexpr int kBlock = kStride == 1 ? 4 : 2;
  const int64_t C = l.channels, out_width = l.out_width;
  if constexpr (kSums) std::fill(col_sums.begin(), col_sums.end(), 0.0f);
  ring.Start(image, c0);
  for (int64_t oh = 0; oh < l.out_height; ++oh) {
    ring.Hold(oh * kStride + 1);
    for (int s = 0; s < kSub; ++s) {
      const int64_t c = c0 + s * L;
      V w[9];
      for (int t = 0; t < 9; ++t) w[t] = Load<V>(l.taps + t * C + c);
      const V mul = Load<V>(l.mul + c), add = Load<V>(l.add + c);
      const float* rows[3];
      for (int k = 0; k < 3; ++k) rows[k] = ring.Row(oh * kStride - 1 + k, s);
      const int64_t at = oh * out_width * C + c;
      const float* res = kResidual ? residual + at : nullptr;
      float* o = out + at;
      V row_sum = {};
      float* cols = kSums ? col_sums.data() + s * out_width * L : nullptr;
      int64_t ow = 0;
      for (; ow + kBlock <= out_width; ow += kBlock) {
        Block<kBlock, kStride, kRelu6, kResidual, kSums>(l, rows, w, mul, add, ow, res, o,
                                                         row_sum, cols);
      }
      if constexpr (kBlock == 4) {
        if (ow + 2 <= out_width) {
          Block<2, kStride, kRelu6, kResidual, kSums>(l, rows, w, mul, add, ow, res, o, row_sum,
                                                      cols);
          ow += 2;
        }
      }
      if (ow < out_width) {
        Block<1, kStride, kRelu6, kResidual, kSums>(l, rows, w, mul, add, ow, res, o, row_sum,
                                                    cols);
      }
      if constexpr (kSums) Store<V>(l.row_sums + (n * l.out_height + oh) * C + c, row_sum);
    }
  }
  if constexpr (kSums) {
    for (int s = 0; s < kSub; ++s) {
      for (int64_t ow = 0; ow < out_width; ++ow) {
        const float* col = col_sums.data() + (s * out_width + ow) * L;
        Store<V>(l.col_sums + (n * out_width + ow) * C + c0 + s * L, Load<V>(col));
      }
    }
  }
}

template <int kStride, bool kRelu6, bool kResidual, bool kSums = false>
void Depthwise(const Layer& l, int64_t batch, const float* x, const float* residual, float* y) {
  const int64_t C = l.channels, in_image = l.height * l.width * l.in_channels;
  const int64_t out_image = l.out_height * l.out_width * C;
  RowRing<f32x16, 2> ring32(l);
  RowRing<f32x16, 1> ring16(l);
  RowRing<f32x8, 1> ring8(l);
  RowRing<float, 1> ring1(l);
  // One group's column sums, vector by vector (a few KB: in L1 with the ring).
  std::vector<float> cols(kSums ? 32 * l.out_width : 0);
  for (int64_t n = 0; n < batch; ++n) {
    const float* image = x + n * in_image;
    const float* res = kResidual ? residual + n * out_image : nullptr;
    float* out = y + n * out_image;
    int64_t c0 = 0;
    auto group = [&](auto& ring) {
      Group<kStride, kRelu6, kResidual, kSums>(l, ring, image, c0, res, out, n, cols);
    };
    if constexpr (kWide) {
      for (; c0 + 32 <= C; c0 += 32) group(ring32);
      for (; c0 + 16 <= C; c0 += 16) group(ring16);
    }
    for (; c0 + 8 <= C; c0 += 8) group(ring8);
    for (; c0 < C; ++c0) group(ring1);
  }
}

// Depthwise<stride, relu6, residual>, with the flags known at compile time in the inner loops.
void Dispatch(const Layer& l, int64_t batch, const float* x, const float* residual, float* y,
              int64_t stride) {
  const bool r = residual != nullptr;
  if (l.row_sums != nullptr) {  // with ReLU6 and no residual only (see Depthwise3x3)
    if (stride == 1) return Depthwise<1, true, false, true>(l, batch, x, residual, y);
    return Depthwise<2, true, false, true>(l, batch, x, residual, y);
  }
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
                        Vector in_add, Matrix expand, Tensor4 residual, ffi::Result<Tensor4> y,
                        ffi::Result<Tensor3> row_sums, ffi::Result<Tensor3> col_sums,
                        int64_t stride, bool relu6, bool input_bn_relu6) {
  if (stride != 1 && stride != 2) return ffi::Error::InvalidArgument("stride must be 1 or 2");
  const auto d = x.dimensions();
  const int64_t C = taps.dimensions()[1];
  const bool has_expand = expand.element_count() > 0;
  Layer l{d[1], d[2], C, Strided(d[1], stride), Strided(d[2], stride),
          taps.typed_data(), mul.typed_data(), add.typed_data(),
          input_bn_relu6 ? in_mul.typed_data() : nullptr, in_add.typed_data(), relu6};
  l.in_channels = d[3];
  if (has_expand) {
    if (!input_bn_relu6 || expand.dimensions()[0] != d[3] || expand.dimensions()[1] != C) {
      return ffi::Error::InvalidArgument(
          "expand must be (C_in, C) for C_in input channels, with the input BatchNorm + ReLU6");
    }
    l.expand = expand.typed_data();
  } else if (d[3] != C) {
    return ffi::Error::InvalidArgument("taps must be (9, C) for C input channels");
  }
  if (taps.dimensions()[0] != 9 || mul.dimensions()[0] != C ||
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
  if (row_sums->element_count() > 0) {  // the sums asked for: both, of the output's shape
    const auto hd = row_sums->dimensions(), wd = col_sums->dimensions();
    if (hd[0] != yd[0] || hd[1] != yd[1] || hd[2] != C || wd[0] != yd[0] || wd[1] != yd[2] ||
        wd[2] != C || !relu6 || has_residual) {
      return ffi::Error::InvalidArgument(
          "row_sums must be (N, H_out, C) and col_sums (N, W_out, C), with relu6, no residual");
    }
    l.row_sums = row_sums->typed_data();
    l.col_sums = col_sums->typed_data();
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
                                  .Arg<Matrix>()   // expand, or empty
                                  .Arg<Tensor4>()  // residual, or empty
                                  .Ret<Tensor4>()
                                  .Ret<Tensor3>()  // row_sums, or empty
                                  .Ret<Tensor3>()  // col_sums, or empty
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("relu6")
                                  .Attr<bool>("input_bn_relu6"));
