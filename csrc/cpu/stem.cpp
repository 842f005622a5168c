// CPU resnet_stem: ResNet's stem, max_pool2d(relu(conv2d(x, w, stride 2, padding 3)
// + bias), 3x3, stride 2, padding 1) for a 7x7 weight, in one pass.
//
// The stem conv has 3 input channels, which oneDNN's direct kernel runs at half
// its usual speed, and its output is the largest activation of the net (25.7 MB
// at batch 8, 224x224), written once and read back by the max-pool. Here each
// thread takes a band of pooled rows of one image and, per stem row of that band:
//   1. gathers the 7x7xC input patches of the row (im2col, 147 floats a pixel
//      for C=3; one row of patches fits in L1/L2);
//   2. multiplies them by the weight with oneDNN's GEMM micro-kernel;
//   3. adds the bias and applies ReLU,
// then max-pools the band's stem rows straight into the output. The stem output
// exists only a band at a time, in L2.
//
// Same requirements and fallback as winograd.cpp: AVX-512 and cpublas::brgemm,
// finite operands (else conv_bias_act + ATen's max_pool2d compute it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/avx512.h"
#include "cpu/conv_bias_act.h"
#include "cpu/finite.h"

namespace resnet_fused {
namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kKernel = 7, kStride = 2, kPad = 3;  // the conv
constexpr int64_t kPoolKernel = 3, kPoolStride = 2, kPoolPad = 1;

int64_t conv_out(int64_t in) { return (in + 2 * kPad - kKernel) / kStride + 1; }
int64_t pool_out(int64_t in) { return (in + 2 * kPoolPad - kPoolKernel) / kPoolStride + 1; }

#ifdef RESNET_FUSED_AVX512_KERNELS

#define AVX512 RESNET_FUSED_AVX512

struct Geometry {
  int64_t H, W, C, K;      // input size, input and output channels
  int64_t Ho, Wo, Po, Qo;  // stem output, pooled output
  int64_t patch;           // kKernel * kKernel * C
};

// A[ox][(r, s, c)] = x[n, 2 oy - 3 + r, 2 ox - 3 + s, c], zero outside the image.
// A kernel row of a patch (7 pixels x C) is contiguous in channels_last memory, so
// it is copied 16 floats at a time, the lanes outside the image masked to zero
// (masked-off lanes of a load do not touch memory). Per-pixel memcpy calls
// measured 2x slower than the GEMM itself.
AVX512 void gather_patches(const float* x, float* A, int64_t n, int64_t oy, const Geometry& g) {
  const int64_t row = kKernel * g.C;
  for (int64_t ox = 0; ox < g.Wo; ++ox) {
    float* dst = A + ox * g.patch;
    const int64_t ix0 = kStride * ox - kPad;
    // Floats [lo, hi) of a kernel row lie inside the image.
    const int64_t lo = std::max<int64_t>(0, -ix0) * g.C;
    const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(kKernel, g.W - ix0) * g.C);
    for (int64_t r = 0; r < kKernel; ++r, dst += row) {
      const int64_t iy = kStride * oy - kPad + r;
      const bool inside = iy >= 0 && iy < g.H;
      const float* src = x + ((n * g.H + (inside ? iy : 0)) * g.W + ix0) * g.C;
      for (int64_t j = 0; j < row; j += 16) {
        const __mmask16 store = lanes(j, row);
        __mmask16 load = 0;
        if (inside) {
          const int64_t a = std::max<int64_t>(lo - j, 0), b = std::min<int64_t>(hi - j, 16);
          if (a < b) load = static_cast<__mmask16>(((1u << b) - 1u) & ~((1u << a) - 1u));
        }
        _mm512_mask_storeu_ps(dst + j, store, _mm512_maskz_loadu_ps(load, src + j));
      }
    }
  }
}

// y = relu(y + bias) over one stem row (Wo x K), in place; NaN propagates.
AVX512 void bias_relu(float* y, const float* bias, const Geometry& g) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < g.K; k += 16) {
    const __mmask16 m = lanes(k, g.K);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + k) : zero;
    for (int64_t ox = 0; ox < g.Wo; ++ox) {
      float* p = y + ox * g.K + k;
      const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), b);
      _mm512_mask_storeu_ps(p, m, _mm512_maskz_max_ps(0xFFFF, zero, v));
    }
  }
}

// out[n, py, :, :] = 3x3/2 max-pool of stem rows held in rows[oy - first_row].
// Every window holds at least one real element (padding 1 < kernel 3).
AVX512 void pool_row(const float* rows, int64_t first_row, float* out, int64_t n, int64_t py,
                     const Geometry& g) {
  const int64_t y_lo = std::max<int64_t>(0, kPoolStride * py - kPoolPad);
  const int64_t y_hi = std::min<int64_t>(g.Ho, kPoolStride * py - kPoolPad + kPoolKernel);
  for (int64_t px = 0; px < g.Qo; ++px) {
    const int64_t x_lo = std::max<int64_t>(0, kPoolStride * px - kPoolPad);
    const int64_t x_hi = std::min<int64_t>(g.Wo, kPoolStride * px - kPoolPad + kPoolKernel);
    float* dst = out + ((n * g.Po + py) * g.Qo + px) * g.K;
    for (int64_t k = 0; k < g.K; k += 16) {
      const __mmask16 m = lanes(k, g.K);
      __m512 best = _mm512_set1_ps(-INFINITY);
      for (int64_t y = y_lo; y < y_hi; ++y) {
        const float* src = rows + ((y - first_row) * g.Wo) * g.K + k;
        for (int64_t x = x_lo; x < x_hi; ++x) {
          // max(best, v) returns v when either is NaN; lanes already NaN keep it:
          // NaN propagates as in max_pool2d.
          const __m512 v = _mm512_maskz_loadu_ps(m, src + x * g.K);
          const __mmask16 nan_best = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
          best = _mm512_mask_max_ps(best, static_cast<__mmask16>(~nan_best), best, v);
        }
      }
      _mm512_mask_storeu_ps(dst + k, m, best);
    }
  }
}

#undef AVX512

void stem_run(const Tensor& x, const Tensor& w_rsck, const optional<Tensor>& bias, Tensor& out) {
  Geometry g;
  g.H = x.size(2);
  g.W = x.size(3);
  g.C = x.size(1);
  g.K = out.size(1);
  g.Ho = conv_out(g.H);
  g.Wo = conv_out(g.W);
  g.Po = out.size(2);
  g.Qo = out.size(3);
  g.patch = kKernel * kKernel * g.C;
  // Pooled rows per band: each band recomputes one stem row shared with the
  // previous band, so longer bands waste less; bounded so the band's stem rows
  // (2 per pooled row) stay near 1 MB.
  const int64_t row_bytes = g.Wo * g.K * static_cast<int64_t>(sizeof(float));
  const int64_t band = std::clamp<int64_t>((1 << 20) / (2 * row_bytes), 1, 8);
  const int64_t bands_per_image = (g.Po + band - 1) / band;

  const float* xp = x.const_data_ptr<float>();
  const float* wp = w_rsck.const_data_ptr<float>();
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0) * bands_per_image, 1, [&](int64_t first, int64_t last) {
    std::vector<float> patches(g.Wo * g.patch);
    std::vector<float> rows((2 * band + 1) * g.Wo * g.K);
    for (int64_t item = first; item < last; ++item) {
      const int64_t n = item / bands_per_image;
      const int64_t p0 = (item % bands_per_image) * band, p1 = std::min(g.Po, p0 + band);
      const int64_t y_lo = std::max<int64_t>(0, kPoolStride * p0 - kPoolPad);
      const int64_t y_hi = std::min<int64_t>(g.Ho, kPoolStride * (p1 - 1) - kPoolPad + kPoolKernel);
      for (int64_t oy = y_lo; oy < y_hi; ++oy) {
        float* y = rows.data() + (oy - y_lo) * g.Wo * g.K;
        gather_patches(xp, patches.data(), n, oy, g);
        gemm_f32(g.Wo, g.K, g.patch, patches.data(), g.patch, wp, g.K, y, g.K);
        bias_relu(y, bp, g);
      }
      for (int64_t py = p0; py < p1; ++py) pool_row(rows.data(), y_lo, op, n, py, g);
    }
  });
}

#endif  // RESNET_FUSED_AVX512_KERNELS

Tensor unfused(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias) {
  const Tensor y = conv_bias_act_cpu(input, weight, bias, c10::nullopt, {kStride, kStride},
                                     {kPad, kPad}, {1, 1}, 1, /*relu=*/true,
                                     /*assume_finite=*/false);
  return at::max_pool2d(y, {kPoolKernel, kPoolKernel}, {kPoolStride, kPoolStride},
                        {kPoolPad, kPoolPad});
}

Tensor resnet_stem_cpu(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                       bool assume_finite) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == kKernel && weight.size(3) == kKernel,
              "resnet_stem: expected a 7x7 weight (K, C, 7, 7), got shape ", weight.sizes());
  check_conv_bias_act_args(input, weight, bias, c10::nullopt, {kStride, kStride}, {kPad, kPad},
                           {1, 1}, 1, "resnet_stem");
  TORCH_CHECK(input.device().is_cpu(), "resnet_stem: expected input on cpu, got ", input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat, "resnet_stem: expected float32 input, got ",
              input.scalar_type());
  const bool finite = assume_finite || (all_finite(input) && all_finite(weight) &&
                                        (!bias || all_finite(*bias)));
  if (!avx512_kernels_supported() || !finite || input.numel() == 0 || weight.size(0) == 0) {
    return unfused(input, weight, bias);
  }
#ifdef RESNET_FUSED_AVX512_KERNELS
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  // B of the GEMM: (r, s, c) x k, matching the patch layout.
  const Tensor w = weight.permute({2, 3, 1, 0}).contiguous();
  const optional<Tensor> b = bias ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  Tensor out = at::empty({input.size(0), weight.size(0), pool_out(conv_out(input.size(2))),
                          pool_out(conv_out(input.size(3)))},
                         input.options().memory_format(cl));
  stem_run(x, w, b, out);
  return out.contiguous(output_memory_format(input));
#else
  return unfused(input, weight, bias);
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("resnet_stem", &resnet_stem_cpu);
}

}  // namespace resnet_fused
