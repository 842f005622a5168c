// CPU stem_conv: a float32 conv over few input channels (ResNet's stem: 3 channels, 7x7,
// stride 2, padding 3) by a direct kernel of our own, with bias, residual and ReLU
// applied before the one store. oneDNN, reached through ATen with channels_last tensors,
// runs ResNet's stem at ~90% of the FMA peak with AVX-512 but 52-62% with AVX2 (batch 1,
// AMD EPYC Zen 4, 2 threads), where this op takes 0.86-0.92x its time; ATen also spends
// ~25 us around each oneDNN call, which small inputs notice (dispatch.py's rule).
//
// This file holds the op: checks, the zero-padded copy of the input, the per-thread split
// and the choice of ISA. The kernel is stem_conv_kernel.h, compiled for AVX2 and for
// AVX-512. Without either, for other dtypes, and where K is not a multiple of 32, the
// call goes to conv_bias_act. NaN and Inf propagate as in torch's direct sum; a tap on
// the padding is a product with zero, as in torch's float64 convolution.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "cpu/conv_bias_act.h"
#include "cpu/cpu_isa.h"
#include "cpu/kernel_runs.h"
#include "cpu/stem_conv.h"
#include "cpu/stem_conv_problem.h"

namespace resnet_fused {

using at::Tensor;
using c10::optional;

bool stem_conv_kernel_available() { return cpu_isa() != CpuIsa::kNone; }

namespace {

void check_stem_args(const Tensor& input, const Tensor& weight, const Tensor& packed,
                     const optional<Tensor>& bias, const optional<Tensor>& residual,
                     at::IntArrayRef stride, at::IntArrayRef padding) {
  constexpr const char* op = "stem_conv";
  check_conv_bias_act_args(input, weight, bias, residual, stride, padding, {1, 1}, 1, op);
  TORCH_CHECK(input.device().is_cpu(), op, ": expected input on cpu, got ", input.device());
  TORCH_CHECK(stride[0] == stride[1] && (stride[0] == 1 || stride[0] == 2), op,
              ": expected stride (1, 1) or (2, 2), got ", stride);
  const int64_t K = weight.size(0), C = weight.size(1), R = weight.size(2), S = weight.size(3);
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == R && packed.size(1) == C &&
                  packed.size(2) == S && packed.size(3) == K &&
                  packed.scalar_type() == weight.scalar_type() && packed.device().is_cpu(),
              op, ": expected packed_weight of shape [", R, ", ", C, ", ", S, ", ", K, "] ",
              weight.scalar_type(), " on cpu (resnet_fused.ops.stem_conv_weight(weight)); got ",
              packed.sizes(), " ", packed.scalar_type(), " on ", packed.device());
}

// x's planes with their padding written out as zeros: [N, C, H + 2 ph, W + 2 pw], from
// any layout (NCHW rows are copied whole).
Tensor padded_planes(const Tensor& x, int64_t ph, int64_t pw) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  Tensor out = at::empty({N, C, Hp, Wp}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* in = x.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  at::parallel_for(0, N * C * Hp, 64, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t plane = row / Hp, h = row % Hp - ph;
      float* dst = o + row * Wp;
      if (h < 0 || h >= H) {
        std::memset(dst, 0, Wp * sizeof(float));
        continue;
      }
      const float* src = in + plane / C * sN + plane % C * sC + h * sH;
      std::memset(dst, 0, pw * sizeof(float));
      if (sW == 1) {
        std::memcpy(dst + pw, src, W * sizeof(float));
      } else {
        for (int64_t w = 0; w < W; ++w) dst[pw + w] = src[w * sW];
      }
      std::memset(dst + pw + W, 0, pw * sizeof(float));
    }
  });
  return out;
}

Tensor stem_conv_cpu(const Tensor& input, const Tensor& weight, const Tensor& packed,
                     const optional<Tensor>& bias, const optional<Tensor>& residual,
                     at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  check_stem_args(input, weight, packed, bias, residual, stride, padding);
  const auto out_size = conv_output_size(input, weight, stride, padding, {1, 1}, "stem_conv");
  if (!stem_conv_kernel_available() || input.scalar_type() != at::kFloat ||
      weight.size(0) % stem_conv::kBlock != 0 || input.numel() == 0 || out_size[2] == 0 ||
      out_size[3] == 0) {
    return conv_bias_act_cpu(input, weight, bias, residual, stride, padding, {1, 1}, 1, relu,
                             /*assume_finite=*/false);
  }
  count_kernel_run(KernelRun::kStemConv);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = padded_planes(input, padding[0], padding[1]);
  const Tensor w = packed.contiguous();
  const optional<Tensor> b = bias ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  const Tensor r = residual ? residual->contiguous(cl) : Tensor();
  stem_conv::Problem p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.Hp = x.size(2);
  p.Wp = x.size(3);
  p.K = weight.size(0);
  p.R = weight.size(2);
  p.S = weight.size(3);
  p.OH = out_size[2];
  p.OW = out_size[3];
  p.stride = stride[0];
  Tensor out = at::empty(out_size, input.options().memory_format(cl));
  p.input = x.const_data_ptr<float>();
  p.weight = w.const_data_ptr<float>();
  p.bias = b ? b->const_data_ptr<float>() : nullptr;
  p.residual = residual ? r.const_data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.relu = relu;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const auto run = cpu_isa() == CpuIsa::kAvx512 ? &stem_conv::run_rows_avx512
                                                  : &stem_conv::run_rows_avx2;
#else
  // The ISA kernels are built for x86-64 with GCC or Clang only; elsewhere cpu_isa() is
  // kNone and the call went to conv_bias_act above.
  TORCH_CHECK(false, "stem_conv: the stem kernel is not built on this platform");
  void (*run)(const stem_conv::Problem&, int64_t, int64_t) = nullptr;
#endif
  // Items are output rows, consecutive per thread: neighbouring rows share input rows.
  at::parallel_for(0, p.N * p.OH, 1, [&](int64_t first, int64_t last) { run(p, first, last); });
  return out.contiguous(output_memory_format(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("stem_conv", &stem_conv_cpu); }

}  // namespace resnet_fused
