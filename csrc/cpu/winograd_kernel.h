// The Winograd kernels of winograd_conv3x3, F(2x2, 3x3) and F(4x4, 3x3) at stride 1
// and F(2x2, 3x3) at stride 2, and of winograd_conv3d (run_taps: a 3-D conv's temporal
// taps summed in M), written once and templated on the vector type V
// (kernels_avx2.cpp, kernels_avx512.cpp instantiate them, each compiled for its
// ISA). No ATen here: this header is included inside a `#pragma GCC target` region.
//
// F(m x m, 3x3) works on alpha x alpha input tiles, alpha = m + 2 at stride 1 and
// 2m + 1 at stride 2. Per block of output tiles, on one thread:
//   1. the input tiles are transformed (B^T d B) into alpha^2 matrices V[xi] of
//      tiles x C, vectorized over channels (channels_last makes them contiguous),
//      in fp32 and stored in the element type (bfloat16 input: rounded to bfloat16);
//   2. M[xi] = V[xi] @ U[xi] with oneDNN's GEMM micro-kernel (ATen's cpublas::brgemm,
//      summing in fp32), U = the weight pre-transformed (G g G^T) by
//      resnet_fused.ops.winograd_weight, in panels of output channels; where U is
//      larger than the block's V and M, the block's output channels are cut into
//      slices for several threads (winograd.cpp);
//   3. M is transformed back (A^T m A) to m x m outputs, and bias, residual and
//      ReLU are applied before the one store.
#pragma once

#include "cpu/winograd_problem.h"

namespace resnet_fused {
namespace winograd {

// Tile t of the output: image n, top-left output pixel (y, x).
struct Tile {
  int64_t n, y, x;
};

inline Tile tile_at(const Problem& p, int64_t t) {
  const int64_t tj = t % p.tiles_w, ti = (t / p.tiles_w) % p.tiles_h;
  return {t / (p.tiles_w * p.tiles_h), p.tile * ti, p.tile * tj};
}

// px[i][j]: input pixel (s * y - 1 + i, s * x - 1 + j) of tile t (stride s), or
// `zeros` (C elements) outside the image, so the inner loops have no branches. T is
// the element type of the input and output: float, or uint16_t holding bfloat16.
template <int kAlpha, class T>
void tile_pixels(const Problem& p, const Tile& t, const T* zeros,
                 const T* (&px)[kAlpha][kAlpha]) {
  const T* input = static_cast<const T*>(p.input);
  // A 3-D conv's tap reads another frame of the clip, or the zero padding past its ends.
  const int64_t n = t.n + p.frame_shift, in_clip = t.n % p.frames + p.frame_shift;
  const bool frame_inside = in_clip >= 0 && in_clip < p.frames;
  for (int i = 0; i < kAlpha; ++i) {
    for (int j = 0; j < kAlpha; ++j) {
      const int64_t y = p.stride * t.y - 1 + i, x = p.stride * t.x - 1 + j;
      const bool inside = frame_inside && y >= 0 && y < p.H && x >= 0 && x < p.W;
      px[i][j] = inside ? input + ((n * p.H + y) * p.W + x) * p.C : zeros;
    }
  }
}

// Calls body(px, dst, c, n) for input tile t0 + l (l < count) and its channels
// [c, c + n): px as tile_pixels gives it, dst = V's row of that tile at channel c.
template <class V, int kAlpha, class T, class Body>
inline void for_each_input_chunk(const Problem& p, const T* zeros, T* v, int64_t t0,
                                 int64_t count, Body&& body) {
  for (int64_t l = 0; l < count; ++l) {
    const T* px[kAlpha][kAlpha];
    tile_pixels<kAlpha, T>(p, tile_at(p, t0 + l), zeros, px);
    for (int64_t c = 0; c < p.C; c += V::kLanes) body(px, v + l * p.C + c, c, p.C - c);
  }
}

// Stores act(y + bias [+ residual]) at output pixel (y + a, x + e) of tile t, channels [k, k + n).
template <class V, class T>
inline void store_output(const Problem& p, const Tile& t, int a, int e, int64_t k, int64_t n,
                         typename V::Reg y, typename V::Reg b) {
  const int64_t off = ((t.n * p.Ho + t.y + a) * p.Wo + t.x + e) * p.K + k;
  typename V::Reg v = V::add(y, b);
  if (p.residual) v = V::add(v, V::load(static_cast<const T*>(p.residual) + off, n));
  if (p.relu) v = V::relu(v);
  V::store(static_cast<T*>(p.out) + off, v, n);
}

// ---- F(2x2, 3x3) --------------------------------------------------------------

// V[xi][l][c] = (B^T d B)[xi] for the 4x4 input tile d of tile t0 + l, with
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
template <class V, class T>
void transform_input_f2(const Problem& p, const T* zeros, T* v, int64_t t0, int64_t count) {
  using Reg = typename V::Reg;
  for_each_input_chunk<V, 4>(p, zeros, v, t0, count, [&](const T* (&px)[4][4], T* dst,
                                                        int64_t c, int64_t n) {
    // One row of B^T d at a time keeps 4 registers live instead of 16 (AVX2 has 16).
    for (int i = 0; i < 4; ++i) {
      Reg r[4];
      for (int j = 0; j < 4; ++j) {
        switch (i) {
          case 0: r[j] = V::sub(V::load(px[0][j] + c, n), V::load(px[2][j] + c, n)); break;
          case 1: r[j] = V::add(V::load(px[1][j] + c, n), V::load(px[2][j] + c, n)); break;
          case 2: r[j] = V::sub(V::load(px[2][j] + c, n), V::load(px[1][j] + c, n)); break;
          default: r[j] = V::sub(V::load(px[1][j] + c, n), V::load(px[3][j] + c, n)); break;
        }
      }
      T* out = dst + 4 * i * p.v_stride;
      V::store(out, V::sub(r[0], r[2]), n);
      V::store(out + p.v_stride, V::add(r[1], r[2]), n);
      V::store(out + 2 * p.v_stride, V::sub(r[2], r[1]), n);
      V::store(out + 3 * p.v_stride, V::sub(r[1], r[3]), n);
    }
  });
}

// out = act(A^T m A + bias [+ residual]) for each 2x2 output tile and output
// channels [k0, k1) (m holds those columns, rows m_cols apart), with
// A^T = [1 1 1 0; 0 1 -1 -1].
template <class V, class T>
void transform_output_f2(const Problem& p, const float* m, int64_t t0, int64_t count,
                         int64_t k0, int64_t k1) {
  using Reg = typename V::Reg;
  for (int64_t l = 0; l < count; ++l) {
    const Tile t = tile_at(p, t0 + l);
    const int rows = t.y + 1 < p.Ho ? 2 : 1, cols = t.x + 1 < p.Wo ? 2 : 1;
    for (int64_t k = k0; k < k1; k += V::kLanes) {
      const int64_t n = k1 - k;
      const float* src = m + l * p.m_cols + (k - k0);
      Reg q[2][4];  // A^T m
      for (int j = 0; j < 4; ++j) {
        const Reg m0 = V::load(src + j * p.m_stride, n);
        const Reg m1 = V::load(src + (4 + j) * p.m_stride, n);
        const Reg m2 = V::load(src + (8 + j) * p.m_stride, n);
        const Reg m3 = V::load(src + (12 + j) * p.m_stride, n);
        q[0][j] = V::add(V::add(m0, m1), m2);
        q[1][j] = V::sub(V::sub(m1, m2), m3);
      }
      const Reg b = p.bias ? V::load(p.bias + k, n) : V::zero();
      for (int a = 0; a < rows; ++a) {
        const Reg y[2] = {V::add(V::add(q[a][0], q[a][1]), q[a][2]),   // (A^T m) A
                          V::sub(V::sub(q[a][1], q[a][2]), q[a][3])};
        for (int e = 0; e < cols; ++e) store_output<V, T>(p, t, a, e, k, n, y[e], b);
      }
    }
  }
}

// ---- separable transforms, as F(4x4) and stride 2 use them -----------------------

// V[xi][l][c] = (B^T d B)[xi] for the kAlpha x kAlpha input tile d of tile t0 + l, with
// bt(d, r) computing r = B^T d for one column of kAlpha: on the columns into a block of
// registers (spilled to L1 where the ISA has too few), then on its rows.
template <class V, int kAlpha, class Bt>
void transform_input(const Problem& p, const float* zeros, float* v, int64_t t0, int64_t count,
                     Bt bt) {
  using Reg = typename V::Reg;
  for_each_input_chunk<V, kAlpha, float>(
      p, zeros, v, t0, count,
      [&](const float* (&px)[kAlpha][kAlpha], float* dst, int64_t c, int64_t n) {
        Reg bd[kAlpha][kAlpha];  // bd[i][j] = (B^T d)[i][j]
        for (int j = 0; j < kAlpha; ++j) {
          Reg col[kAlpha], r[kAlpha];
          for (int i = 0; i < kAlpha; ++i) col[i] = V::load(px[i][j] + c, n);
          bt(col, r);
          for (int i = 0; i < kAlpha; ++i) bd[i][j] = r[i];
        }
        for (int i = 0; i < kAlpha; ++i) {
          Reg r[kAlpha];
          bt(bd[i], r);
          for (int j = 0; j < kAlpha; ++j) V::store(dst + (kAlpha * i + j) * p.v_stride, r[j], n);
        }
      });
}

// out = act(A^T m A + bias [+ residual]) for each kTile x kTile output tile (clipped at
// the output's bottom and right edges) and output channels [k0, k1) (m holds those
// columns, rows m_cols apart), with at(m, y) computing y = A^T m for one column of kAlpha.
template <class V, int kAlpha, int kTile, class At>
void transform_output(const Problem& p, const float* m, int64_t t0, int64_t count, int64_t k0,
                      int64_t k1, At at) {
  using Reg = typename V::Reg;
  for (int64_t l = 0; l < count; ++l) {
    const Tile t = tile_at(p, t0 + l);
    const int rows = p.Ho - t.y < kTile ? static_cast<int>(p.Ho - t.y) : kTile;
    const int cols = p.Wo - t.x < kTile ? static_cast<int>(p.Wo - t.x) : kTile;
    for (int64_t k = k0; k < k1; k += V::kLanes) {
      const int64_t n = k1 - k;
      const float* src = m + l * p.m_cols + (k - k0);
      Reg q[kAlpha][kTile];  // q[j] = (A^T m)[:, j], column j of kAlpha
      for (int j = 0; j < kAlpha; ++j) {
        Reg col[kAlpha];
        for (int i = 0; i < kAlpha; ++i) col[i] = V::load(src + (kAlpha * i + j) * p.m_stride, n);
        at(col, q[j]);
      }
      const Reg b = p.bias ? V::load(p.bias + k, n) : V::zero();
      for (int a = 0; a < rows; ++a) {
        Reg row[kAlpha];
        for (int j = 0; j < kAlpha; ++j) row[j] = q[j][a];
        Reg y[kTile];  // (A^T m A)[a]
        at(row, y);
        for (int e = 0; e < cols; ++e) store_output<V, float>(p, t, a, e, k, n, y[e], b);
      }
    }
  }
}

// ---- F(4x4, 3x3) --------------------------------------------------------------
// Interpolation points 0, 1/2, -1/2, 2, -2 and infinity. Against the usual 0,
// +-1, +-2 they halve the error (B^T's entries shrink from 5 to 4.25 and its
// largest products cancel less), which brings F(4x4) within the tolerance rule
// of tests/common_utils.py with room to spare. B^T and A^T hold dyadic numbers
// (exact in fp32); the Lagrange denominators are all in G, applied to the
// weight in float64 (ops.winograd_weight).

// r = B^T d for one column d of 6, with
// B^T = [1  0    -17/4  0    1 0;
//        0 -2    -4     1/2  1 0;
//        0  2    -4    -1/2  1 0;
//        0 -1/2  -1/4   2    1 0;
//        0  1/2  -1/4  -2    1 0;
//        0  1     0   -17/4  0 1]
// by sharing the terms of rows 1/2 and 3/4.
template <class V>
inline void bt6(const typename V::Reg (&d)[6], typename V::Reg (&r)[6]) {
  using Reg = typename V::Reg;
  const Reg m17_4 = V::set1(-4.25f), mfour = V::set1(-4.0f), mquarter = V::set1(-0.25f),
            half = V::set1(0.5f), mhalf = V::set1(-0.5f), two = V::set1(2.0f),
            mtwo = V::set1(-2.0f);
  r[0] = V::fmadd(m17_4, d[2], V::add(d[0], d[4]));
  const Reg a = V::fmadd(mfour, d[2], d[4]), b = V::fmadd(mtwo, d[1], V::mul(half, d[3]));
  r[1] = V::add(a, b);
  r[2] = V::sub(a, b);
  const Reg c = V::fmadd(mquarter, d[2], d[4]), e = V::fmadd(two, d[3], V::mul(mhalf, d[1]));
  r[3] = V::add(c, e);
  r[4] = V::sub(c, e);
  r[5] = V::fmadd(m17_4, d[3], V::add(d[1], d[5]));
}

// y = A^T m for one column m of 6, with
// A^T = [1 1    1    1  1 0;
//        0 1/2 -1/2  2 -2 0;
//        0 1/4  1/4  4  4 0;
//        0 1/8 -1/8  8 -8 1].
template <class V>
inline void at6(const typename V::Reg (&m)[6], typename V::Reg (&y)[4]) {
  using Reg = typename V::Reg;
  const Reg s = V::add(m[1], m[2]), d = V::sub(m[1], m[2]);
  const Reg s2 = V::add(m[3], m[4]), d2 = V::sub(m[3], m[4]);
  y[0] = V::add(V::add(m[0], s), s2);
  y[1] = V::fmadd(V::set1(2.0f), d2, V::mul(V::set1(0.5f), d));
  y[2] = V::fmadd(V::set1(4.0f), s2, V::mul(V::set1(0.25f), s));
  y[3] = V::add(V::fmadd(V::set1(8.0f), d2, V::mul(V::set1(0.125f), d)), m[5]);
}

// ---- F(2x2, 3x3) at stride 2 ----------------------------------------------------
// Along each axis the stride-2 filter (g0, g1, g2) splits by input parity: g1 meets
// the odd samples d1, d3 of the 5-sample tile d0..d4 (one tap each: no transform),
// (g0, g2) the even ones d0, d2, d4, a 2-tap filter that F(2, 2) computes with 3
// multiplies. So 5 transformed values per axis: 25 per 2x2 output tile instead of
// 36 multiplies, with
//   B^T = [0 1 0 0 0; 0 0 0 1 0; 1 0 -1 0 0; 0 0 1 0 0; 0 0 -1 0 1],
//   G   = [g1; g1; g0; g0 + g2; g2],
//   A^T = [1 0 1 1 0; 0 1 0 1 1],
// all entries 0 and +-1, so the transforms round nothing. G's first two rows are
// equal: U holds its 4 x 4 distinct matrices, and the 25 products read them through
// kS2Row.
constexpr int kS2Row[5] = {0, 0, 1, 2, 3};

template <class V>
inline void bt5(const typename V::Reg (&d)[5], typename V::Reg (&r)[5]) {
  r[0] = d[1];
  r[1] = d[3];
  r[2] = V::sub(d[0], d[2]);
  r[3] = d[2];
  r[4] = V::sub(d[4], d[2]);
}

template <class V>
inline void at5(const typename V::Reg (&m)[5], typename V::Reg (&y)[2]) {
  y[0] = V::add(V::add(m[0], m[2]), m[3]);
  y[1] = V::add(V::add(m[1], m[3]), m[4]);
}

// ---- the driver -----------------------------------------------------------------

// A thread's scratch: V, then M, then C zeros (the image border's pixels).
template <class T, int kXi>
struct Scratch {
  T* v;
  float* m;
  T* zeros;
  Scratch(const Problem& p, float* scratch)
      : v(reinterpret_cast<T*>(scratch)), m(scratch + v_floats(p)),
        zeros(reinterpret_cast<T*>(m + kXi * p.m_stride)) {
    for (int64_t c = 0; c < p.C; ++c) zeros[c] = T(0);  // +0.0 in float and in bfloat16
  }
};

// Item `item` of blocks x k_slices, block-major: its tiles [t0, t0 + count) and output
// channels [k0, k1) (empty where the last slice has none).
struct Item {
  int64_t t0, count, k0, k1;
  Item(const Problem& p, int64_t item)
      : t0(item / p.k_slices * p.block),
        count(p.tiles - t0 < p.block ? p.tiles - t0 : p.block),
        k0(item % p.k_slices * p.k_slice),
        k1(k0 + p.k_slice < p.K ? k0 + p.k_slice : p.K) {}
};

// Items [first, last) (run_blocks_avx512 says which) of p.block tiles of kTile x kTile
// outputs at stride kStride with elements of type T; `scratch` holds
// scratch_floats(p) floats. A thread with several slices of one block transforms its
// input once.
template <class V, int kTile, int kStride, class T>
void run_tiles(const Problem& p, int64_t first, int64_t last, float* scratch) {
  constexpr int kAlpha = kStride == 1 ? kTile + 2 : 2 * kTile + 1;
  constexpr int kXi = kAlpha * kAlpha;
  const Scratch<T, kXi> s(p, scratch);
  T* v = s.v;
  float* m = s.m;
  const T* zeros = s.zeros;
  int64_t transformed = -1;  // the block whose input V holds
  for (int64_t item = first; item < last; ++item) {
    const int64_t blk = item / p.k_slices;
    const auto [t0, count, k0, k1] = Item(p, item);
    if (k0 >= k1) continue;
    if (blk != transformed) {
      if constexpr (kStride == 2) {
        transform_input<V, 5>(p, zeros, v, t0, count,
                              [](const auto& d, auto& r) { bt5<V>(d, r); });
      } else if constexpr (kTile == 4) {
        transform_input<V, 6>(p, zeros, v, t0, count,
                              [](const auto& d, auto& r) { bt6<V>(d, r); });
      } else {
        transform_input_f2<V, T>(p, zeros, v, t0, count);
      }
      transformed = blk;
    }
    // M[xi] (count x (k1 - k0), rows m_cols apart) = V[xi] (count x C) @ U[xi][:, k0:k1],
    // one product per weight panel (the panel at k: C x u_panel, k * C into U[xi]).
    for (int xi = 0; xi < kXi; ++xi) {
      const int64_t u_xi = kStride == 1 ? xi : 4 * kS2Row[xi / 5] + kS2Row[xi % 5];
      const T* u = static_cast<const T*>(p.U) + u_xi * p.C * p.K;
      for (int64_t k = k0; k < k1; k += p.u_panel) {
        p.gemm(count, p.u_panel, p.C, p.u_panel, p.m_cols, v + xi * p.v_stride, u + k * p.C,
               m + xi * p.m_stride + (k - k0), false);
      }
    }
    if constexpr (kStride == 2) {
      transform_output<V, 5, 2>(p, m, t0, count, k0, k1,
                                [](const auto& q, auto& y) { at5<V>(q, y); });
    } else if constexpr (kTile == 4) {
      transform_output<V, 6, 4>(p, m, t0, count, k0, k1,
                                [](const auto& q, auto& y) { at6<V>(q, y); });
    } else {
      transform_output_f2<V, T>(p, m, t0, count, k0, k1);
    }
  }
}

// winograd_conv3d's items [first, last), as run_tiles' (stride 1): per block, the centre
// tap transforms the block's tiles into V and sets M = V @ U_centre; each other tap then
// does the same for the runs of tiles whose input frame (the tile's frame shifted by the
// tap) lies in their clip, adding into those rows of M; one output transform stores the
// sum. No tap multiplies the zero padding past a clip's ends.
template <class V, int kTile, class T>
void run_taps(const Problem& p, int64_t first, int64_t last, float* scratch) {
  constexpr int kAlpha = kTile + 2;
  constexpr int kXi = kAlpha * kAlpha;
  const Scratch<T, kXi> s(p, scratch);
  T* v = s.v;
  float* m = s.m;
  const T* zeros = s.zeros;
  const int64_t frame_tiles = p.tiles_h * p.tiles_w, centre = p.taps / 2;
  for (int64_t item = first; item < last; ++item) {
    const auto [t0, count, k0, k1] = Item(p, item);
    if (k0 >= k1) continue;
    for (int64_t i = 0; i < p.taps; ++i) {
      const int64_t j = i == 0 ? centre : i <= centre ? i - 1 : i;  // the centre first
      Problem q = p;
      q.frame_shift = j - centre;
      const T* u_tap = static_cast<const T*>(p.U) + j * p.u_tap;
      // Runs [r0, r1) of the block's tiles, frame by frame, merged while the tap reaches.
      int64_t r0 = t0;
      while (r0 < t0 + count) {
        const int64_t frame = r0 / frame_tiles, t = frame % p.frames + q.frame_shift;
        const int64_t end = t0 + count;
        int64_t r1 = (frame + 1) * frame_tiles < end ? (frame + 1) * frame_tiles : end;
        if (t < 0 || t >= p.frames) {
          r0 = r1;
          continue;
        }
        while (r1 < end) {
          const int64_t next = (r1 / frame_tiles) % p.frames + q.frame_shift;
          if (next < 0 || next >= p.frames) break;
          r1 = (r1 / frame_tiles + 1) * frame_tiles < end ? (r1 / frame_tiles + 1) * frame_tiles
                                                           : end;
        }
        if constexpr (kTile == 4) {
          transform_input<V, 6>(q, zeros, v, r0, r1 - r0,
                                [](const auto& d, auto& r) { bt6<V>(d, r); });
        } else {
          transform_input_f2<V, T>(q, zeros, v, r0, r1 - r0);
        }
        for (int xi = 0; xi < kXi; ++xi) {
          const T* u = u_tap + xi * p.C * p.K;
          for (int64_t k = k0; k < k1; k += p.u_panel) {
            p.gemm(r1 - r0, p.u_panel, p.C, p.u_panel, p.m_cols, v + xi * p.v_stride,
                   u + k * p.C, m + xi * p.m_stride + (r0 - t0) * p.m_cols + (k - k0), i > 0);
          }
        }
        r0 = r1;
      }
    }
    if constexpr (kTile == 4) {
      transform_output<V, 6, 4>(p, m, t0, count, k0, k1,
                                [](const auto& q, auto& y) { at6<V>(q, y); });
    } else {
      transform_output_f2<V, T>(p, m, t0, count, k0, k1);
    }
  }
}

template <class V>
void run_blocks(const Problem& p, int64_t first, int64_t last, float* scratch) {
  if (p.taps > 0) {  // winograd_conv3d
    if constexpr (V::kBf16) {
      if (p.bf16) return run_taps<V, 2, uint16_t>(p, first, last, scratch);
    }
    if (p.tile == 4) return run_taps<V, 4, float>(p, first, last, scratch);
    return run_taps<V, 2, float>(p, first, last, scratch);
  }
  if constexpr (V::kBf16) {
    if (p.bf16) return run_tiles<V, 2, 1, uint16_t>(p, first, last, scratch);
  }
  if (p.stride == 2) {
    run_tiles<V, 2, 2, float>(p, first, last, scratch);
  } else if (p.tile == 4) {
    run_tiles<V, 4, 1, float>(p, first, last, scratch);
  } else {
    run_tiles<V, 2, 1, float>(p, first, last, scratch);
  }
}

}  // namespace winograd
}  // namespace resnet_fused
