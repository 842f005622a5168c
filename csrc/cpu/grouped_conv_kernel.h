// The direct kernel of grouped_conv3x3 (ResNeXt's grouped 3x3 convs), written once and
// templated on the vector type V (kernels_avx2.cpp, kernels_avx512.cpp instantiate it,
// each compiled for its ISA). No ATen here: this header is included inside a
// `#pragma GCC target` region.
//
// Per item, one output row of one weight block (L output channels), in runs of up to 7
// pixels whose sums stay in registers. A group of 16 or more output channels (a multiple
// of 16) takes vectors of its own outputs, each input channel broadcast to all lanes.
// Groups of 4 or 8 (Kg = Cg) share 16-channel blocks, a vector holding whole groups: each
// input pixel's vector is rotated within its groups (in-lane shuffles for 4, permutes for
// 8), every rotation times a weight vector. Taps outside the image read `zeros`, so the
// loops have no branches.
#pragma once

#include <utility>

#include "cpu/grouped_conv_problem.h"

namespace resnet_fused {
namespace grouped_conv {

// Where the run's pixels read their input at each kw: float offsets from their input
// row's start, channel c0 on, or -1 outside the image (and past the row's end, whose
// sums are never stored). Made once per run, used at each kh.
template <int R>
struct RunTaps {
  int64_t off[3][R];

  RunTaps(const Problem& p, int64_t ow0, int64_t count, int64_t c0) {
    for (int kw = 0; kw < 3; ++kw) {
      for (int r = 0; r < R; ++r) {
        const int64_t iw = (ow0 + r) * p.stride - 1 + kw;
        off[kw][r] = r < count && iw >= 0 && iw < p.W ? iw * p.C + c0 : -1;
      }
    }
  }

  // The input of each pixel at tap (kh, kw) of `row`, or zeros.
  void pixels(const Problem& p, const float* row, int kw, const float* (&px)[R]) const {
    for (int r = 0; r < R; ++r) px[r] = off[kw][r] >= 0 ? row + off[kw][r] : p.zeros;
  }
};

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
  const RunTaps<R> taps(p, ow0, count, c0);
  for (int kh = 0; kh < 3; ++kh) {
    if (!rows[kh]) continue;
    for (int kw = 0; kw < 3; ++kw) {
      const float* px[R];
      taps.pixels(p, rows[kh], kw, px);
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

template <class V, int kG, int... kJ>
inline void rotations(typename V::Reg x, typename V::Reg (&rot)[kG],
                      std::integer_sequence<int, kJ...>) {
  ((rot[kJ] = V::template rotate<kG, kJ>(x)), ...);
}

// One vector of kG-channel groups (Kg = Cg = kG), output channels k0 on, which are also
// its input channels; w: the block's weight at k0's lane, [tap][j][16] with lane l of
// rotation j holding the weight of input channel (l + j) mod kG of its group. Each
// input pixel of the run is loaded and rotated within its groups once per kh and then
// serves every output pixel that reads it (3 taps at stride 1, 1-2 at stride 2): the
// sum over its group's channels is kG products of a rotation and a weight vector.
template <class V, int R, int kG, int kS>
void shuffle_run(const Problem& p, const float* const (&rows)[3], int64_t n, int64_t oh,
                 int64_t ow0, int64_t count, int64_t k0, const float* w) {
  using Reg = typename V::Reg;
  constexpr int kSpan = (R - 1) * kS + 3;  // input pixels of the run's taps
  Reg acc[R][1];
  init_run<V, R, 1>(p, acc, k0);
  int64_t off[kSpan];  // from the row's start, or -1 outside the image
  for (int i = 0; i < kSpan; ++i) {
    const int64_t iw = ow0 * kS - 1 + i;
    off[i] = iw >= 0 && iw < p.W ? iw * p.C + k0 : -1;
  }
  for (int kh = 0; kh < 3; ++kh) {
    if (!rows[kh]) continue;
    const float* wk = w + kh * 3 * kG * kMinBlock;  // L = 16 for these groups
#pragma GCC unroll 16
    for (int i = 0; i < kSpan; ++i) {
      Reg rot[kG];
      rotations<V, kG>(V::load(off[i] >= 0 ? rows[kh] + off[i] : p.zeros, V::kLanes), rot,
                       std::make_integer_sequence<int, kG>{});
#pragma GCC unroll 3
      for (int kw = 0; kw < 3; ++kw) {
        const int r = (i - kw) / kS;
        if (i < kw || (i - kw) % kS != 0 || r >= R) continue;
#pragma GCC unroll 8
        for (int j = 0; j < kG; ++j) {
          acc[r][0] = V::fmadd(rot[j], V::load(wk + (kw * kG + j) * kMinBlock, V::kLanes),
                               acc[r][0]);
        }
      }
    }
  }
  store_run<V, R, 1>(p, acc, n, oh, ow0, count, k0);
}

// Calls run(ow0, count) for each run of R pixels of a row of width OW.
template <int R, class Run>
inline void for_each_run(int64_t OW, Run&& run) {
  for (int64_t ow0 = 0; ow0 < OW; ow0 += R) run(ow0, OW - ow0 < R ? OW - ow0 : R);
}

template <class V>
void run_rows(const Problem& p, int64_t first, int64_t last) {
  constexpr int64_t kL = V::kLanes;
  constexpr bool kWide = kL == 16;  // 32 vector registers (AVX-512), else 16
  // Runs as long as the registers allow: the sums of R pixels x NV vectors, the weight
  // vectors and the broadcast (or the kG rotations) in registers. Two vectors per run
  // where a group has an even number of them, each broadcast feeding two products.
  // (Groups of 8 with AVX2 hold 8 rotations and 7 sums: 22.9 G multiply-adds/s on one
  // thread against 21.8 in runs of 4, AMD EPYC Zen 4.)
  constexpr int kPairRun = kWide ? 7 : 4, kOneRun = 7, kShuffleRun = 7;
  const int64_t blocks = p.K / p.L;
  for (int64_t item = first; item < last; ++item) {
    const int64_t b = item % blocks, n = item / blocks / p.OH, oh = item / blocks % p.OH;
    const float* rows[3];
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ih = oh * p.stride - 1 + kh;
      rows[kh] = ih >= 0 && ih < p.H ? p.input + (n * p.H + ih) * p.W * p.C : nullptr;
    }
    const float* wb = p.weight + b * 9 * p.Cg * p.L;
    if (p.Kg >= kL && p.Kg % kMinBlock == 0) {
      for (int64_t q = 0; q < p.L / p.Kg; ++q) {  // the block's groups
        const int64_t c0 = (b * p.L / p.Kg + q) * p.Cg;
        const int64_t vectors = p.Kg / kL;
        int64_t j = 0;
        for (; j + 2 <= vectors; j += 2) {
          const int64_t off = q * p.Kg + j * kL;
          for_each_run<kPairRun>(p.OW, [&](int64_t ow0, int64_t count) {
            broadcast_run<V, kPairRun, 2>(p, rows, n, oh, ow0, count, c0, b * p.L + off, wb + off);
          });
        }
        for (; j < vectors; ++j) {
          const int64_t off = q * p.Kg + j * kL;
          for_each_run<kOneRun>(p.OW, [&](int64_t ow0, int64_t count) {
            broadcast_run<V, kOneRun, 1>(p, rows, n, oh, ow0, count, c0, b * p.L + off, wb + off);
          });
        }
      }
    } else {
      for (int64_t off = 0; off < p.L; off += kL) {
        const int64_t k0 = b * p.L + off;
        if (p.Kg == 4) {
          for_each_run<kShuffleRun>(p.OW, [&](int64_t ow0, int64_t count) {
            if (p.stride == 1) {
              shuffle_run<V, kShuffleRun, 4, 1>(p, rows, n, oh, ow0, count, k0, wb + off);
            } else {
              shuffle_run<V, kShuffleRun, 4, 2>(p, rows, n, oh, ow0, count, k0, wb + off);
            }
          });
        } else {
          for_each_run<kShuffleRun>(p.OW, [&](int64_t ow0, int64_t count) {
            if (p.stride == 1) {
              shuffle_run<V, kShuffleRun, 8, 1>(p, rows, n, oh, ow0, count, k0, wb + off);
            } else {
              shuffle_run<V, kShuffleRun, 8, 2>(p, rows, n, oh, ow0, count, k0, wb + off);
            }
          });
        }
      }
    }
  }
}

}  // namespace grouped_conv
}  // namespace resnet_fused
