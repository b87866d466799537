// Gradients of a depthwise 3x3 convolution (padding 1, stride 1 or 2) for CPU training, as XLA
// FFI handlers, each one pass over what it reads.
//
// Kernel gradient:
//   dk[i * 3 + j, c] = sum over n, yo, xo of x[n, yo * s + i - 1, xo * s + j - 1, c] * g[n, yo, xo, c]
// (zero outside the image). XLA:CPU runs these as nine reductions, each over a shifted copy of
// the input that it writes first (docs/cpu_backend.md). Here each output row of `g` is read
// once and multiplied into nine vector accumulators per group of channels, with its three input
// rows in cache.
// Each row's partial sums (at most W terms) are added into double totals, so the result does
// not depend on how many rows there are.
//
// Input gradient at stride 2:
//   dx[n, y, x, c] = sum over taps (i, j) with y + 1 - i and x + 1 - j even of
//                    g[n, (y + 1 - i) / 2, (x + 1 - j) / 2, c] * k[i * 3 + j, c]
// Autodiff transposes the strided windows into nine zero-interleaved pads, which XLA:CPU fuses
// with the BatchNorm and ReLU6 gradients around them into one loop, slower than the pads' sum
// alone (docs/cpu_backend.md); here each input pixel sums the one, two or four taps that reach
// it.
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace ca_flax;

struct Shape {
  int64_t height, width, channels, out_height, out_width, stride;
};

// Whether `g` is the output gradient (N, H_out, W_out, C) of `batch` inputs of shape `s` and
// `taps` a (9, C) matrix beside it: the two handlers' shared check of their operands.
inline bool Fits(const Shape& s, int64_t batch, ffi::Span<const int64_t> g,
                 ffi::Span<const int64_t> taps) {
  return g[0] == batch && g[1] == s.out_height && g[2] == s.out_width && g[3] == s.channels &&
         taps[0] == 9 && taps[1] == s.channels;
}

// Calls body(V{}, c) for each group of channels [c, c + kLanes<V>): 16-lane vectors where the
// target has AVX-512, then 8 lanes, then single floats for what is left.
template <typename Body>
inline void ForChannelGroups(int64_t channels, Body body) {
  int64_t c = 0;
  if constexpr (kWide) {
    for (; c + 16 <= channels; c += 16) body(f32x16{}, c);
  }
  for (; c + 8 <= channels; c += 8) body(f32x8{}, c);
  for (; c < channels; ++c) body(0.0f, c);
}

// Adds one output row's products for the channels [c, c + kLanes<V>) into `total` (9, C):
// `rows` are the three input rows the windows cover (a zero row outside the image).
template <typename V>
inline void RowTaps(const Shape& s, const float* const rows[3], const float* g, int64_t c,
                    double* total) {
  V acc[9] = {};
  for (int64_t xo = 0; xo < s.out_width; ++xo) {
    const V gv = Load<V>(g + xo * s.channels + c);
    const int64_t x0 = xo * s.stride - 1;
    const bool inside = x0 >= 0 && x0 + 2 < s.width;
    CA_FLAX_UNROLL for (int j = 0; j < 3; ++j) {
      const int64_t xi = x0 + j;
      if (!inside && (xi < 0 || xi >= s.width)) continue;
      CA_FLAX_UNROLL for (int i = 0; i < 3; ++i) {
        acc[i * 3 + j] += Load<V>(rows[i] + xi * s.channels + c) * gv;
      }
    }
  }
  constexpr int64_t L = kLanes<V>;
  for (int t = 0; t < 9; ++t) {
    float lanes[L];
    Store<V>(lanes, acc[t]);
    for (int64_t l = 0; l < L; ++l) total[t * s.channels + c + l] += lanes[l];
  }
}

void KernelGrad(const Shape& s, int64_t batch, const float* x, const float* g, float* dk) {
  const int64_t C = s.channels, row = s.width * C;
  const std::vector<float> zeros(row, 0.0f);
  std::vector<double> total(9 * C, 0.0);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t yo = 0; yo < s.out_height; ++yo) {
      const float* rows[3];
      for (int i = 0; i < 3; ++i) {
        const int64_t yi = yo * s.stride + i - 1;
        rows[i] = yi >= 0 && yi < s.height ? x + (n * s.height + yi) * row : zeros.data();
      }
      const float* grow = g + (n * s.out_height + yo) * s.out_width * C;
      ForChannelGroups(C, [&](auto lanes, int64_t c) {
        RowTaps<decltype(lanes)>(s, rows, grow, c, total.data());
      });
    }
  }
  for (int64_t k = 0; k < 9 * C; ++k) dk[k] = static_cast<float>(total[k]);
}

ffi::Error DepthwiseKernelGrad(Tensor4 x, Tensor4 g, ffi::Result<Matrix> dk, int64_t stride) {
  const auto d = x.dimensions();
  if (stride != 1 && stride != 2) return ffi::Error::InvalidArgument("stride must be 1 or 2");
  const Shape s{d[1], d[2], d[3], Strided(d[1], stride), Strided(d[2], stride), stride};
  if (!Fits(s, d[0], g.dimensions(), dk->dimensions())) {
    return ffi::Error::InvalidArgument(
        "g must be (N, H_out, W_out, C) for x at the stride, and the gradient (9, C)");
  }
  KernelGrad(s, d[0], x.typed_data(), g.typed_data(), dk->typed_data());
  return ffi::Error::Success();
}

// One input-gradient row: dx[y, :, c..c + kLanes<V>) from the output-gradient rows that reach
// it (`rows[i]`, null where tap row i does not) at stride 2. Input column 2 * xo takes output
// column xo through the middle taps; column 2 * xo + 1 takes xo through the right taps and
// xo + 1 through the left ones.
template <typename V>
inline void InputGradRow(const Shape& s, const float* const rows[3], const float* taps, int64_t c,
                         float* dx) {
  const int64_t C = s.channels;
  V k[9];
  CA_FLAX_UNROLL for (int t = 0; t < 9; ++t) k[t] = Load<V>(taps + t * C + c);
  auto tap = [&](int64_t xo, int j) {
    V acc = {};
    CA_FLAX_UNROLL for (int i = 0; i < 3; ++i) {
      if (rows[i] != nullptr) acc += Load<V>(rows[i] + xo * C + c) * k[i * 3 + j];
    }
    return acc;
  };
  for (int64_t xo = 0; xo < s.out_width; ++xo) {
    Store<V>(dx + 2 * xo * C + c, tap(xo, 1));
    if (2 * xo + 1 < s.width) {
      const V right = tap(xo, 2);
      Store<V>(dx + (2 * xo + 1) * C + c, xo + 1 < s.out_width ? right + tap(xo + 1, 0) : right);
    }
  }
}

void InputGradStride2(const Shape& s, int64_t batch, const float* g, const float* taps,
                      float* dx) {
  const int64_t C = s.channels;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t y = 0; y < s.height; ++y) {
      const float* rows[3];
      for (int i = 0; i < 3; ++i) {
        const int64_t t = y + 1 - i;
        const bool reaches = t >= 0 && t % 2 == 0 && t / 2 < s.out_height;
        rows[i] = reaches ? g + (n * s.out_height + t / 2) * s.out_width * C : nullptr;
      }
      float* out = dx + (n * s.height + y) * s.width * C;
      ForChannelGroups(C, [&](auto lanes, int64_t c) {
        InputGradRow<decltype(lanes)>(s, rows, taps, c, out);
      });
    }
  }
}

ffi::Error DepthwiseInputGrad(Tensor4 g, Matrix taps, ffi::Result<Tensor4> dx) {
  const auto d = dx->dimensions();
  const Shape s{d[1], d[2], d[3], Strided(d[1], 2), Strided(d[2], 2), 2};
  if (!Fits(s, d[0], g.dimensions(), taps.dimensions())) {
    return ffi::Error::InvalidArgument(
        "g must be (N, H_out, W_out, C) for the input gradient at stride 2, and the taps (9, C)");
  }
  InputGradStride2(s, d[0], g.typed_data(), taps.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<Tensor4>()  // x
                                  .Arg<Tensor4>()  // g, the output's gradient
                                  .Ret<Matrix>()   // (9, C)
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxDepthwiseInputGrad, DepthwiseInputGrad,
                              ffi::Ffi::Bind()
                                  .Arg<Tensor4>()   // g, the output's gradient
                                  .Arg<Matrix>()    // taps (9, C)
                                  .Ret<Tensor4>());  // (N, H, W, C)
