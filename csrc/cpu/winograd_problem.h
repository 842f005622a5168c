// One winograd_conv3x3 call as the ISA-specific kernels see it: raw pointers and
// sizes only, so that those kernels include no ATen code.
#pragma once

#include <cstdint>

namespace resnet_fused {
namespace winograd {

// C (m x n, float) = A (m x k) @ B (k x n) (C += where accumulate), row-major, lda = k;
// B's rows ldb apart and C's ldc apart (a slice of columns of a wider matrix). A and B
// float, or bfloat16 with B in VNNI pairs (rows 2i and 2i+1 interleaved).
using GemmFn = void (*)(int64_t m, int64_t n, int64_t k, int64_t ldb, int64_t ldc, const void* a,
                        const void* b, float* c, bool accumulate);

struct Problem {
  // channels_last [N, C, H, W] input, [N, K, Ho, Wo] output/residual (padding 1),
  // float, or bfloat16 (raw bits) when `bf16`: then V and U are bfloat16 too (F(2x2)
  // at stride 1 on AVX-512 only, C and K multiples of 16).
  const void* input;
  const void* U;          // [points, K / u_panel, C, u_panel], resnet_fused.ops.winograd_weight
  const float* bias;      // [K] or null, float either way
  const void* residual;   // or null
  void* out;
  bool relu;
  bool bf16;
  int64_t H, W, C, K, Ho, Wo;
  int stride;                       // 1, or 2 (with tile 2)
  int tile;                         // 2: F(2x2, 3x3), 4: F(4x4, 3x3)
  int alpha;                        // input tile side: tile + 2 at stride 1, 5 at stride 2
  int64_t tiles_h, tiles_w, tiles;  // tile x tile output tiles
  int64_t block;                    // tiles per block
  int64_t u_panel;                  // output channels per panel of U
  int64_t k_slices;                 // a block's output channels cut into this many slices,
  int64_t k_slice;                  // each of k_slice channels, a multiple of u_panel
  int64_t m_cols;                   // columns of M: k_slice, or K with one slice
  int64_t v_stride, m_stride;       // floats between consecutive V[xi] / M[xi] in a block
  GemmFn gemm;
  // winograd_conv3d: the input's and output's N * T frames are images of one batch, and
  // output frame t of a clip sums `taps` (> 0) 2-D convs, tap j over input frame
  // t + j - taps / 2 of that clip (zeros outside it), in the Winograd domain (M) before
  // one output transform. U holds the taps' weights `u_tap` elements apart;
  // `frame_shift` is the tap being transformed's j - taps / 2.
  int64_t taps = 0, frames = 1, u_tap = 0, frame_shift = 0;
};

// Floats of V's part of the scratch (bfloat16 V takes half).
inline int64_t v_floats(const Problem& p) {
  const int64_t points = p.alpha * p.alpha;
  return p.bf16 ? (points * p.v_stride + 1) / 2 : points * p.v_stride;
}

// Per-thread scratch of run_blocks: V, M and a zero row for the image border.
inline int64_t scratch_floats(const Problem& p) {
  return v_floats(p) + p.alpha * p.alpha * p.m_stride + p.C;
}

// Items [first, last) of blocks x k_slices, block-major: block i / k_slices, output
// channels of slice i % k_slices.
void run_blocks_avx2(const Problem& p, int64_t first, int64_t last, float* scratch);
void run_blocks_avx512(const Problem& p, int64_t first, int64_t last, float* scratch);

}  // namespace winograd
}  // namespace resnet_fused
