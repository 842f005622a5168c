// The direct kernel of grouped_conv3x3 (ResNeXt's grouped 3x3 convs), written once and
// templated on the vector type V (kernels_avx2.cpp, kernels_avx512.cpp instantiate it,
// each compiled for its ISA). No ATen here: this header is included inside a
// `#pragma GCC target` region.
//
// Per item, one output row of one weight block (L output channels), in runs of kRun
// pixels whose sums stay in registers. A group of Kg >= V::kLanes output channels takes
// vectors of its own outputs, each input channel broadcast to all lanes; groups of 4 or
// 8 (Kg = Cg, fewer than a vector) share a vector, which loads the 16 / 8 input channels
// of its groups once per pixel and tap and broadcasts each within its group (an in-lane
// shuffle). Taps outside the image read `zeros`, so the loops have no branches.
#pragma once

#include <utility>

#include "cpu/grouped_conv_problem.h"

namespace resnet_fused {
namespace grouped_conv {

// Pixels per run: every ResNet width (7, 14, 28, 56 at stride 1, and their halves'
// ceilings at stride 2) is a multiple of 7 or just under one.
constexpr int kRun = 7;

// The input of the run's pixels at tap (kh, kw), channel c0 on: the pixel, or zeros
// outside the image (and past the row's end, whose sums are never stored).
template <int R>
inline void tap_pixels(const Problem& p, const float* row, int64_t ow0, int64_t count, int kw,
                       int64_t c0, const float* (&px)[R]) {
  for (int r = 0; r < R; ++r) {
    const int64_t iw = (ow0 + r) * p.stride - 1 + kw;
    px[r] = r < count && iw >= 0 && iw < p.W ? row + iw * p.C + c0 : p.zeros;
  }
}

// out = act(sum + bias [+ residual]) for the run's first `count` pixels, NV vectors
// from output channel k0 of row (n, oh).
template <class V, int R, int NV>
inline void store_run(const Problem& p, typename V::Reg (&acc)[R][NV], int64_t n, int64_t oh,
                      int64_t ow0, int64_t count, int64_t k0) {
  constexpr int64_t kL = V::kLanes;
  for (int r = 0; r < R && r < count; ++r) {
    const int64_t at = ((n * p.OH + oh) * p.OW + ow0 + r) * p.K + k0;
    for (int j = 0; j < NV; ++j) {
      typename V::Reg v = acc[r][j];
      if (p.residual) v = V::add(v, V::load(p.residual + at + j * kL, kL));
      if (p.relu) v = V::relu(v);
      V::store(p.out + at + j * kL, v, kL);
    }
  }
}

template <class V, int R, int NV>
inline void init_run(const Problem& p, typename V::Reg (&acc)[R][NV], int64_t k0) {
  for (int j = 0; j < NV; ++j) {
    const typename V::Reg b = p.bias ? V::load(p.bias + k0 + j * V::kLanes, V::kLanes) : V::zero();
    for (int r = 0; r < R; ++r) acc[r][j] = b;
  }
}

// NV vectors of one group's output channels (k0 on, its inputs from c0 on); w: the
// block's weight at k0's lane.
template <class V, int R, int NV>
void broadcast_run(const Problem& p, const float* const (&rows)[3], int64_t n, int64_t oh,
                   int64_t ow0, int64_t count, int64_t c0, int64_t k0, const float* w) {
  using Reg = typename V::Reg;
  Reg acc[R][NV];
  init_run<V, R, NV>(p, acc, k0);
  for (int kh = 0; kh < 3; ++kh) {
    if (!rows[kh]) continue;
    for (int kw = 0; kw < 3; ++kw) {
      const float* px[R];
      tap_pixels<R>(p, rows[kh], ow0, count, kw, c0, px);
      const float* wt = w + (kh * 3 + kw) * p.Cg * p.L;
      for (int64_t c = 0; c < p.Cg; ++c) {
        Reg wv[NV];
        for (int j = 0; j < NV; ++j) wv[j] = V::load(wt + c * p.L + j * V::kLanes, V::kLanes);
        for (int r = 0; r < R; ++r) {
          const Reg x = V::set1(px[r][c]);
          for (int j = 0; j < NV; ++j) acc[r][j] = V::fmadd(x, wv[j], acc[r][j]);
        }
      }
    }
  }
  store_run<V, R, NV>(p, acc, n, oh, ow0, count, k0);
}

// Input channel kC of each lane's group, times its weight vector (one per channel c).
template <class V, int R, int kG, int kC>
inline void shuffle_tap(typename V::Reg (&acc)[R][1], const typename V::Reg (&x)[R],
                        const float* wt, int64_t L) {
  const typename V::Reg wv = V::load(wt + kC * L, V::kLanes);
  for (int r = 0; r < R; ++r) acc[r][0] = V::fmadd(V::template in_group<kG, kC>(x[r]), wv, acc[r][0]);
}

template <class V, int R, int kG, int... kC>
inline void shuffle_taps(typename V::Reg (&acc)[R][1], const typename V::Reg (&x)[R],
                         const float* wt, int64_t L, std::integer_sequence<int, kC...>) {
  (shuffle_tap<V, R, kG, kC>(acc, x, wt, L), ...);
}

// One vector of kG-channel groups (Kg = Cg = kG), output channels k0 on, which are
// also its input channels; w: the block's weight at k0's lane.
template <class V, int R, int kG>
void shuffle_run(const Problem& p, const float* const (&rows)[3], int64_t n, int64_t oh,
                 int64_t ow0, int64_t count, int64_t k0, const float* w) {
  using Reg = typename V::Reg;
  Reg acc[R][1];
  init_run<V, R, 1>(p, acc, k0);
  for (int kh = 0; kh < 3; ++kh) {
    if (!rows[kh]) continue;
    for (int kw = 0; kw < 3; ++kw) {
      const float* px[R];
      tap_pixels<R>(p, rows[kh], ow0, count, kw, k0, px);
      Reg x[R];
      for (int r = 0; r < R; ++r) x[r] = V::load(px[r], V::kLanes);
      shuffle_taps<V, R, kG>(acc, x, w + (kh * 3 + kw) * kG * p.L, p.L,
                             std::make_integer_sequence<int, kG>{});
    }
  }
  store_run<V, R, 1>(p, acc, n, oh, ow0, count, k0);
}

template <class V>
void run_rows(const Problem& p, int64_t first, int64_t last) {
  constexpr int64_t kL = V::kLanes;
  // Two vectors per run where a group has an even number of them, each broadcast then
  // feeding two products: with AVX-512's 32 registers (AVX2's 16 would spill).
  constexpr int kPair = kL == 16 ? 2 : 1;
  for (int64_t item = first; item < last; ++item) {
    const int64_t blocks = p.K / p.L;
    const int64_t b = item % blocks, n = item / blocks / p.OH, oh = item / blocks % p.OH;
    const float* rows[3];
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ih = oh * p.stride - 1 + kh;
      rows[kh] = ih >= 0 && ih < p.H ? p.input + (n * p.H + ih) * p.W * p.C : nullptr;
    }
    const float* wb = p.weight + b * 9 * p.Cg * p.L;
    for (int64_t ow0 = 0; ow0 < p.OW; ow0 += kRun) {
      const int64_t count = p.OW - ow0 < kRun ? p.OW - ow0 : kRun;
      if (p.Kg >= kL) {
        for (int64_t q = 0; q < p.L / p.Kg; ++q) {  // the block's groups
          const int64_t c0 = (b * p.L / p.Kg + q) * p.Cg;
          const int64_t vectors = p.Kg / kL;
          int64_t j = 0;
          for (; j + kPair <= vectors; j += kPair) {
            const int64_t off = q * p.Kg + j * kL;
            broadcast_run<V, kRun, kPair>(p, rows, n, oh, ow0, count, c0, b * p.L + off, wb + off);
          }
          for (; j < vectors; ++j) {
            const int64_t off = q * p.Kg + j * kL;
            broadcast_run<V, kRun, 1>(p, rows, n, oh, ow0, count, c0, b * p.L + off, wb + off);
          }
        }
      } else {
        for (int64_t off = 0; off < p.L; off += kL) {
          if (p.Kg == 4) {
            shuffle_run<V, kRun, 4>(p, rows, n, oh, ow0, count, b * p.L + off, wb + off);
          } else {
            shuffle_run<V, kRun, 8>(p, rows, n, oh, ow0, count, b * p.L + off, wb + off);
          }
        }
      }
    }
  }
}

}  // namespace grouped_conv
}  // namespace resnet_fused
