// The F(2x2, 3x3) Winograd kernel of winograd_conv3x3, written once and
// templated on the vector type V (winograd_avx2.cpp, winograd_avx512.cpp
// instantiate it, each compiled for its ISA). No ATen here: this header is
// included inside a `#pragma GCC target` region.
//
// Per block of output tiles, on one thread:
//   1. the 4x4 input tiles are transformed (B^T d B) into 16 matrices V[xi] of
//      tiles x C, vectorized over channels (channels_last makes them contiguous);
//   2. M[xi] = V[xi] @ U[xi] with oneDNN's GEMM micro-kernel (ATen's cpublas::brgemm),
//      U = the weight pre-transformed (G g G^T) by resnet_fused.ops.winograd_weight;
//   3. M is transformed back (A^T m A) to 2x2 outputs, and bias, residual and
//      ReLU are applied before the one store.
// A block is sized so that V and M stay in L2.
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
  return {t / (p.tiles_w * p.tiles_h), 2 * ti, 2 * tj};
}

// V[xi][l][c] = (B^T d B)[xi] for the 4x4 input tile d of tile t0 + l, with
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]; pixels outside the image read
// from `zeros` (C floats), so the inner loop has no branches.
template <class V>
void transform_input(const Problem& p, const float* zeros, float* v, int64_t t0, int64_t count) {
  using Reg = typename V::Reg;
  for (int64_t l = 0; l < count; ++l) {
    const Tile t = tile_at(p, t0 + l);
    const float* px[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int64_t y = t.y - 1 + i, x = t.x - 1 + j;
        const bool inside = y >= 0 && y < p.H && x >= 0 && x < p.W;
        px[i][j] = inside ? p.input + ((t.n * p.H + y) * p.W + x) * p.C : zeros;
      }
    }
    float* dst = v + l * p.C;
    for (int64_t c = 0; c < p.C; c += V::kLanes) {
      const int64_t n = p.C - c;
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
        float* out = dst + c + 4 * i * p.v_stride;
        V::store(out, V::sub(r[0], r[2]), n);
        V::store(out + p.v_stride, V::add(r[1], r[2]), n);
        V::store(out + 2 * p.v_stride, V::sub(r[2], r[1]), n);
        V::store(out + 3 * p.v_stride, V::sub(r[1], r[3]), n);
      }
    }
  }
}

// out = act(A^T m A + bias [+ residual]) for each 2x2 output tile, with
// A^T = [1 1 1 0; 0 1 -1 -1].
template <class V>
void transform_output(const Problem& p, const float* m, int64_t t0, int64_t count) {
  using Reg = typename V::Reg;
  for (int64_t l = 0; l < count; ++l) {
    const Tile t = tile_at(p, t0 + l);
    const int rows = t.y + 1 < p.H ? 2 : 1, cols = t.x + 1 < p.W ? 2 : 1;
    for (int64_t k = 0; k < p.K; k += V::kLanes) {
      const int64_t n = p.K - k;
      const float* src = m + l * p.K + k;
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
        for (int e = 0; e < cols; ++e) {
          const int64_t off = ((t.n * p.H + t.y + a) * p.W + t.x + e) * p.K + k;
          Reg v = V::add(y[e], b);
          if (p.residual) v = V::add(v, V::load(p.residual + off, n));
          if (p.relu) v = V::relu(v);
          V::store(p.out + off, v, n);
        }
      }
    }
  }
}

// Blocks [first, last) of p.block tiles; `scratch` holds scratch_floats(p) floats.
template <class V>
void run_blocks(const Problem& p, int64_t first, int64_t last, float* scratch) {
  float* v = scratch;
  float* m = v + 16 * p.v_stride;
  float* zeros = m + 16 * p.m_stride;
  for (int64_t c = 0; c < p.C; ++c) zeros[c] = 0.0f;
  for (int64_t blk = first; blk < last; ++blk) {
    const int64_t t0 = blk * p.block;
    const int64_t count = p.tiles - t0 < p.block ? p.tiles - t0 : p.block;
    transform_input<V>(p, zeros, v, t0, count);
    for (int xi = 0; xi < 16; ++xi) {
      // M[xi] (count x K) = V[xi] (count x C) @ U[xi] (C x K), all row-major.
      p.gemm(count, p.K, p.C, v + xi * p.v_stride, p.U + xi * p.C * p.K, m + xi * p.m_stride);
    }
    transform_output<V>(p, m, t0, count);
  }
}

}  // namespace winograd
}  // namespace resnet_fused
