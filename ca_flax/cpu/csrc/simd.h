// What the kernels share: the FFI buffer types, vectors of floats as GCC/Clang vector
// extensions (one source for AVX-512, AVX2, NEON ... via -march=native), unaligned loads and
// stores, and ReLU6.
#ifndef CA_FLAX_CSRC_SIMD_H_
#define CA_FLAX_CSRC_SIMD_H_

#include <algorithm>
#include <cstdint>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace ca_flax {
namespace {  // each kernel file keeps its own copy: no symbols shared between them

// Buffer types by rank (named, since a comma inside the handler macro would split its argument).
using Tensor4 = ffi::Buffer<ffi::F32, 4>;
using Tensor3 = ffi::Buffer<ffi::F32, 3>;
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Vector = ffi::Buffer<ffi::F32, 1>;
using Int32 = ffi::Buffer<ffi::S32, 0>;  // a scalar

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

// min/max instructions where the target has them: the generic form above compiles to
// compares and blends, twice the instructions. Operand order keeps NaN propagating as above.
#if defined(__AVX512F__)
inline f32x16 Relu6(f32x16 v) {
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
  const __m512 max = _mm512_max_ps(zero, reinterpret_cast<__m512>(v));
  return reinterpret_cast<f32x16>(_mm512_min_ps(six, max));
}
#endif
#if defined(__AVX__)
inline f32x8 Relu6(f32x8 v) {
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
  const __m256 max = _mm256_max_ps(zero, reinterpret_cast<__m256>(v));
  return reinterpret_cast<f32x8>(_mm256_min_ps(six, max));
}
#endif

// Unrolls a loop over a small array of vector accumulators completely, so that they stay in
// registers: left to itself GCC kept them on the stack around the inner loop, which slowed the
// fused 1x1 conv (docs/cpu_backend.md).
#define CA_FLAX_UNROLL _Pragma("GCC unroll 16")

template <typename V>
constexpr int64_t kLanes = sizeof(V) / sizeof(float);

// 16-lane vectors where the target has 32 registers of that width (AVX-512); elsewhere one takes
// two or four registers, more than the kernels' register blocking leaves, so they use 8 lanes.
#if defined(__AVX512F__)
constexpr bool kWide = true;
#else
constexpr bool kWide = false;
#endif

// Outputs of a 3x3 window with padding 1 at `stride` over `size` inputs, as Python's `strided`.
inline int64_t Strided(int64_t size, int64_t stride) {
  return size == 0 ? 0 : (size - 1) / stride + 1;
}

}  // namespace
}  // namespace ca_flax

#endif  // CA_FLAX_CSRC_SIMD_H_
