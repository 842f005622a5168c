// CPU winograd_conv3x3: 3x3, stride-1, padding-1 convolutions (ResNet's 3x3 convs
// outside the stage transitions) by Winograd's minimal filtering F(2x2, 3x3).
// Each 2x2 output tile costs 16 multiply-adds per channel pair instead of 36, so
// these convs do 2.25x less arithmetic than oneDNN's direct kernel.
//
// Per block of output tiles, on one thread:
//   1. the 4x4 input tiles are transformed (B^T d B) into 16 matrices V[xi] of
//      tiles x C, vectorized over channels (channels_last makes them contiguous);
//   2. M[xi] = V[xi] @ U[xi], U = the weight pre-transformed (G g G^T) by
//      resnet_fused.ops.winograd_weight, with oneDNN's GEMM micro-kernel reached
//      through ATen's cpublas::brgemm;
//   3. M is transformed back (A^T m A) to 2x2 outputs, and bias, residual and
//      ReLU are applied before the one store.
// The blocks are sized to stay in L2, so V and M never travel to memory.
//
// Needs AVX-512 (the transforms) and a torch whose cpublas has an fp32 brgemm;
// elsewhere, and for NaN/Inf operands (whose transforms would turn an Inf into
// NaN where a direct convolution keeps it), the call goes to conv_bias_act.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/avx512.h"
#include "cpu/conv_bias_act.h"
#include "cpu/finite.h"

namespace resnet_fused {

using at::Tensor;
using c10::optional;

#ifdef RESNET_FUSED_AVX512_KERNELS

bool avx512_kernels_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

namespace {

#define AVX512 RESNET_FUSED_AVX512

struct Geometry {
  int64_t H, W, C, K;  // input and output are H x W (stride 1, padding 1)
  int64_t tiles_h, tiles_w;
  int64_t v_stride, m_stride;  // floats between consecutive V[xi] / M[xi] in a block
};

// V[xi][l][c] = (B^T d B)[xi] for the 4x4 input tile d of tile t0 + l, with
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1] and zeros outside the image.
AVX512 void transform_input(const float* in, float* V, int64_t t0, int64_t count,
                            const Geometry& g) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t l = 0; l < count; ++l) {
    const int64_t t = t0 + l;
    const int64_t tj = t % g.tiles_w, ti = (t / g.tiles_w) % g.tiles_h;
    const int64_t n = t / (g.tiles_w * g.tiles_h);
    const int64_t y0 = 2 * ti - 1, x0 = 2 * tj - 1;
    bool inside[4][4];
    const float* px[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int64_t y = y0 + i, x = x0 + j;
        inside[i][j] = y >= 0 && y < g.H && x >= 0 && x < g.W;
        px[i][j] = inside[i][j] ? in + ((n * g.H + y) * g.W + x) * g.C : nullptr;
      }
    }
    for (int64_t c = 0; c < g.C; c += 16) {
      const __mmask16 m = lanes(c, g.C);
      __m512 d[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          d[i][j] = inside[i][j] ? _mm512_maskz_loadu_ps(m, px[i][j] + c) : zero;
      __m512 r[4][4];  // B^T d
      for (int j = 0; j < 4; ++j) {
        r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
        r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
        r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
        r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
      }
      float* out = V + l * g.C + c;
      for (int i = 0; i < 4; ++i) {  // (B^T d) B
        _mm512_mask_storeu_ps(out + (4 * i + 0) * g.v_stride, m, _mm512_sub_ps(r[i][0], r[i][2]));
        _mm512_mask_storeu_ps(out + (4 * i + 1) * g.v_stride, m, _mm512_add_ps(r[i][1], r[i][2]));
        _mm512_mask_storeu_ps(out + (4 * i + 2) * g.v_stride, m, _mm512_sub_ps(r[i][2], r[i][1]));
        _mm512_mask_storeu_ps(out + (4 * i + 3) * g.v_stride, m, _mm512_sub_ps(r[i][1], r[i][3]));
      }
    }
  }
}

// out = act(A^T m A + bias [+ residual]) for each 2x2 output tile, with
// A^T = [1 1 1 0; 0 1 -1 -1].
AVX512 void transform_output(const float* M, const float* bias, const float* residual,
                             float* out, bool relu, int64_t t0, int64_t count, const Geometry& g) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t l = 0; l < count; ++l) {
    const int64_t t = t0 + l;
    const int64_t tj = t % g.tiles_w, ti = (t / g.tiles_w) % g.tiles_h;
    const int64_t n = t / (g.tiles_w * g.tiles_h);
    const int64_t y0 = 2 * ti, x0 = 2 * tj;
    for (int64_t k = 0; k < g.K; k += 16) {
      const __mmask16 m = lanes(k, g.K);
      const float* src = M + l * g.K + k;
      __m512 q[2][4];  // A^T m
      for (int j = 0; j < 4; ++j) {
        const __m512 m0 = _mm512_maskz_loadu_ps(m, src + (0 + j) * g.m_stride);
        const __m512 m1 = _mm512_maskz_loadu_ps(m, src + (4 + j) * g.m_stride);
        const __m512 m2 = _mm512_maskz_loadu_ps(m, src + (8 + j) * g.m_stride);
        const __m512 m3 = _mm512_maskz_loadu_ps(m, src + (12 + j) * g.m_stride);
        q[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
        q[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
      }
      const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + k) : zero;
      for (int a = 0; a < 2 && y0 + a < g.H; ++a) {
        __m512 y[2];  // (A^T m) A
        y[0] = _mm512_add_ps(_mm512_add_ps(q[a][0], q[a][1]), q[a][2]);
        y[1] = _mm512_sub_ps(_mm512_sub_ps(q[a][1], q[a][2]), q[a][3]);
        for (int e = 0; e < 2 && x0 + e < g.W; ++e) {
          const int64_t off = ((n * g.H + y0 + a) * g.W + x0 + e) * g.K + k;
          __m512 v = _mm512_add_ps(y[e], b);
          if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, residual + off));
          // max(0, v) returns its second operand for a NaN: NaN propagates as in
          // torch.relu. (The maskz form: GCC 12 warns on the plain one's internals.)
          if (relu) v = _mm512_maskz_max_ps(0xFFFF, zero, v);
          _mm512_mask_storeu_ps(out + off, m, v);
        }
      }
    }
  }
}

#undef AVX512

// Tiles per block: enough rows for the GEMM micro-kernel to run at full speed
// (measured best at 64-128 on ResNet's shapes), and a multiple of the thread
// count in blocks so no thread idles at the end.
int64_t tiles_per_block(int64_t tiles, int64_t threads) {
  constexpr int64_t kMaxTiles = 96;
  const int64_t rounds = (tiles + threads * kMaxTiles - 1) / (threads * kMaxTiles);
  return std::max<int64_t>(1, (tiles + threads * rounds - 1) / (threads * rounds));
}

// Both channels_last-contiguous float32 [N, C, H, W] / [N, K, H, W]; residual may be out.
void winograd_run(const Tensor& input, const Tensor& U, const optional<Tensor>& bias,
                  const float* residual, Tensor& out, bool relu) {
  Geometry g;
  g.H = input.size(2);
  g.W = input.size(3);
  g.C = input.size(1);
  g.K = out.size(1);
  g.tiles_h = (g.H + 1) / 2;
  g.tiles_w = (g.W + 1) / 2;
  const int64_t tiles = input.size(0) * g.tiles_h * g.tiles_w;
  const int64_t block = tiles_per_block(tiles, at::get_num_threads());
  // A padded stride keeps the 16 slabs of a tile off the same L1 sets (16 KiB
  // apart they all collided: measured 3x slower transforms).
  auto padded = [](int64_t n) { return (n + 15) / 16 * 16 + 16; };
  g.v_stride = padded(block * g.C);
  g.m_stride = padded(block * g.K);
  const int64_t scratch = 16 * (g.v_stride + g.m_stride);

  const float* in = input.const_data_ptr<float>();
  const float* u = U.const_data_ptr<float>();
  const float* b = bias ? bias->const_data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t blocks = (tiles + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    // Per-thread scratch, kept between calls: a few MB at most for ResNet's shapes.
    thread_local std::vector<float> buffer;
    if (static_cast<int64_t>(buffer.size()) < scratch) buffer.resize(scratch);
    float* V = buffer.data();
    float* M = V + 16 * g.v_stride;
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t t0 = blk * block, count = std::min(block, tiles - t0);
      transform_input(in, V, t0, count, g);
      for (int xi = 0; xi < 16; ++xi) {
        // M[xi] (count x K) = V[xi] (count x C) @ U[xi] (C x K), all row-major.
        gemm_f32(count, g.K, g.C, V + xi * g.v_stride, g.C, u + xi * g.C * g.K, g.K,
                 M + xi * g.m_stride, g.K);
      }
      transform_output(M, b, residual, o, relu, t0, count, g);
    }
  });
}

}  // namespace

#else  // no AVX-512 build support or no fp32 brgemm in this torch

bool avx512_kernels_supported() { return false; }

#endif

namespace {

void check_winograd_args(const Tensor& input, const Tensor& weight, const Tensor& U,
                         const optional<Tensor>& bias, const optional<Tensor>& residual) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_conv3x3: expected a 3x3 weight (K, C, 3, 3), got shape ", weight.sizes());
  check_conv_bias_act_args(input, weight, bias, residual, {1, 1}, {1, 1}, {1, 1}, 1,
                           "winograd_conv3x3");
  TORCH_CHECK(input.device().is_cpu(), "winograd_conv3x3: expected input on cpu, got ",
              input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat,
              "winograd_conv3x3: expected float32 input, got ", input.scalar_type());
  const int64_t C = weight.size(1), K = weight.size(0);
  TORCH_CHECK(U.dim() == 3 && U.size(0) == 16 && U.size(1) == C && U.size(2) == K,
              "winograd_conv3x3: expected winograd_weight of shape [16, ", C, ", ", K,
              "] (from resnet_fused.ops.winograd_weight(weight)), got ", U.sizes());
  TORCH_CHECK(U.scalar_type() == at::kFloat && U.device().is_cpu(),
              "winograd_conv3x3: expected winograd_weight float32 on cpu, got ", U.scalar_type(),
              " on ", U.device());
}

Tensor direct(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
              const optional<Tensor>& residual, bool relu, bool assume_finite) {
  return conv_bias_act_cpu(input, weight, bias, residual, {1, 1}, {1, 1}, {1, 1}, 1, relu,
                           assume_finite);
}

Tensor winograd_conv3x3_cpu(const Tensor& input, const Tensor& weight, const Tensor& U,
                            const optional<Tensor>& bias, const optional<Tensor>& residual,
                            bool relu, bool assume_finite) {
  check_winograd_args(input, weight, U, bias, residual);
  const auto fmt = output_memory_format(input);
  const bool finite = assume_finite || (all_finite(input) && all_finite(weight));
  if (!avx512_kernels_supported() || !finite || input.numel() == 0 || weight.size(0) == 0) {
    return direct(input, weight, bias, residual, relu, assume_finite);
  }
#ifdef RESNET_FUSED_AVX512_KERNELS
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor u = U.contiguous();
  const optional<Tensor> b = bias ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  Tensor out = at::empty({input.size(0), weight.size(0), input.size(2), input.size(3)},
                         input.options().memory_format(cl));
  const Tensor r = residual ? residual->contiguous(cl) : Tensor();
  winograd_run(x, u, b, residual ? r.const_data_ptr<float>() : nullptr, out, relu);
  return out.contiguous(fmt);
#else
  return direct(input, weight, bias, residual, relu, assume_finite);
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
}

}  // namespace resnet_fused
