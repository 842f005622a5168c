// The direct kernel of stem_conv (ResNet's first conv: 3 input channels, 7x7, stride 2),
// written once and templated on the vector type V (kernels_avx2.cpp, kernels_avx512.cpp
// instantiate it, each compiled for its ISA). No ATen here: this header is included
// inside a `#pragma GCC target` region.
//
// A run is a few output pixels of one row times two vectors of output channels, its
// sums in registers. Each tap (kh, c, kw) loads the run's weight vectors once and
// broadcasts one input value per pixel: the input planes come padded, so a run takes no
// branch and its pixels' inputs sit at fixed offsets (stride * r + kw) from one pointer.
#pragma once

#include "cpu/stem_conv_problem.h"

namespace resnet_fused {
namespace stem_conv {

// A run's weight vectors and pixels (R): R * kVectors sums, kVectors weights and one
// broadcast in registers (AVX-512: 7 x 2 of 32; AVX2: 5 x 2 of 16).
constexpr int kVectors = 2;
template <class V>
constexpr int run_pixels() {
  return V::kLanes == 16 ? 7 : 5;
}

// Pixels [ow0, ow0 + R) of output row (n, oh), channels [k0, k0 + kVectors * lanes).
template <class V, int kStride, int R>
inline void run(const Problem& p, const float* image, int64_t n, int64_t oh, int64_t ow0,
                int64_t k0) {
  using Reg = typename V::Reg;
  constexpr int64_t kL = V::kLanes;
  constexpr int NV = kVectors;
  Reg acc[R][NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    const Reg b = p.bias ? V::load(p.bias + k0 + j * kL, kL) : V::zero();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][j] = b;
  }
  const int64_t plane = p.Hp * p.Wp;
  for (int64_t kh = 0; kh < p.R; ++kh) {
    for (int64_t c = 0; c < p.C; ++c) {
      const float* x = image + c * plane + (oh * kStride + kh) * p.Wp + ow0 * kStride;
      const float* w = p.weight + (kh * p.C + c) * p.S * p.K + k0;
      for (int64_t kw = 0; kw < p.S; ++kw, ++x, w += p.K) {
        // At stride 2, pixel r's tap kw + 2 is pixel r + 1's tap kw: GCC would carry
        // those broadcasts across iterations in registers the sums need, and spill.
        // The empty asm hides x's relation to its last value.
        asm("" : "+r"(x));
        Reg wv[NV];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) wv[j] = V::load(w + j * kL, kL);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const Reg xv = V::set1(x[kStride * r]);
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j) acc[r][j] = V::fmadd(wv[j], xv, acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t at = ((n * p.OH + oh) * p.OW + ow0 + r) * p.K + k0;
    for (int j = 0; j < NV; ++j) {
      Reg v = acc[r][j];
      if (p.residual) v = V::add(v, V::load(p.residual + at + j * kL, kL));
      if (p.relu) v = V::relu(v);
      V::store(p.out + at + j * kL, v, kL);
    }
  }
}

// The last `count` < R pixels of a row, from ow0: one run of exactly that many.
template <class V, int kStride, int R>
inline void run_tail(const Problem& p, const float* image, int64_t n, int64_t oh, int64_t ow0,
                     int64_t k0, int64_t count) {
  if constexpr (R > 1) {
    if (count == R - 1) {
      run<V, kStride, R - 1>(p, image, n, oh, ow0, k0);
    } else {
      run_tail<V, kStride, R - 1>(p, image, n, oh, ow0, k0, count);
    }
  }
}

template <class V, int kStride>
void run_rows_strided(const Problem& p, int64_t first, int64_t last) {
  constexpr int R = run_pixels<V>();
  for (int64_t item = first; item < last; ++item) {
    const int64_t n = item / p.OH, oh = item % p.OH;
    const float* image = p.input + n * p.C * p.Hp * p.Wp;
    for (int64_t k0 = 0; k0 < p.K; k0 += kVectors * V::kLanes) {
      int64_t ow0 = 0;
      for (; ow0 + R <= p.OW; ow0 += R) run<V, kStride, R>(p, image, n, oh, ow0, k0);
      if (ow0 < p.OW) run_tail<V, kStride, R>(p, image, n, oh, ow0, k0, p.OW - ow0);
    }
  }
}

template <class V>
void run_rows(const Problem& p, int64_t first, int64_t last) {
  if (p.stride == 1) {
    run_rows_strided<V, 1>(p, first, last);
  } else {
    run_rows_strided<V, 2>(p, first, last);
  }
}

}  // namespace stem_conv
}  // namespace resnet_fused
