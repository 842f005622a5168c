// CPU grouped_conv3x3: the grouped 3x3, padding-1 convs of ResNeXt (32 or 64 groups of
// 4 to 64 channels) by a direct kernel of our own, with bias, residual and ReLU applied
// before the one store. oneDNN's grouped kernel, reached through ATen with channels_last
// tensors, ran these at 19-63 G multiply-adds/s alone (ResNeXt-50's, batch 1, AMD EPYC
// Zen 4, 2 threads; the groups of 4 channels slowest).
//
// This file holds the op: checks, the per-thread split and the choice of ISA. The kernel
// is grouped_conv_kernel.h, compiled for AVX2 and for AVX-512. Without either, and for
// a layout it does not compute (grouped_conv_problem.h's layout_fits), the call goes to
// conv_bias_act. NaN and Inf propagate as in torch's direct sum; a tap on the padding is
// a product with zero, as in torch's float64 convolution (oneDNN's skips it: the two
// differ where a non-finite weight meets the padding).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/conv_bias_act.h"
#include "cpu/cpu_isa.h"
#include "cpu/grouped_conv.h"
#include "cpu/kernel_runs.h"
#include "cpu/grouped_conv_problem.h"

namespace resnet_fused {

using at::Tensor;
using c10::optional;

bool grouped_conv_kernel_available() { return cpu_isa() != CpuIsa::kNone; }

namespace {

void check_grouped_args(const Tensor& input, const Tensor& weight, const Tensor& packed,
                        const optional<Tensor>& bias, const optional<Tensor>& residual,
                        int64_t stride) {
  constexpr const char* op = "grouped_conv3x3";
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, op,
              ": expected a 3x3 weight (K, C / groups, 3, 3), got shape ", weight.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": expected stride 1 or 2, got ", stride);
  TORCH_CHECK(input.dim() == 4 && weight.size(1) > 0 && input.size(1) % weight.size(1) == 0, op,
              ": expected input of shape (N, C, H, W) with C a multiple of weight.size(1) = ",
              weight.size(1), " (C / groups), got ", input.sizes());
  const int64_t groups = input.size(1) / weight.size(1);
  check_conv_bias_act_args(input, weight, bias, residual, {stride, stride}, {1, 1}, {1, 1}, groups,
                           op);
  TORCH_CHECK(input.device().is_cpu(), op, ": expected input on cpu, got ", input.device());
  const int64_t K = weight.size(0), Cg = weight.size(1), L = grouped_conv::block_channels(K / groups);
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) * L == K && packed.size(1) == 9 &&
                  packed.size(2) == Cg && packed.size(3) == L &&
                  packed.scalar_type() == weight.scalar_type() && packed.device().is_cpu(),
              op, ": expected packed_weight of shape [", K / L, ", 9, ", Cg, ", ", L, "] ",
              weight.scalar_type(), " on cpu (resnet_fused.ops.grouped_conv_weight(weight, ",
              groups, ")); got ", packed.sizes(), " ", packed.scalar_type(), " on ",
              packed.device());
}

Tensor grouped_conv3x3_cpu(const Tensor& input, const Tensor& weight, const Tensor& packed,
                           const optional<Tensor>& bias, const optional<Tensor>& residual,
                           int64_t stride, bool relu) {
  check_grouped_args(input, weight, packed, bias, residual, stride);
  const int64_t groups = input.size(1) / weight.size(1);
  const int64_t Cg = weight.size(1), Kg = weight.size(0) / groups;
  if (!grouped_conv_kernel_available() || input.scalar_type() != at::kFloat ||
      !grouped_conv::layout_fits(Cg, Kg) || input.numel() == 0 || weight.size(0) == 0) {
    return conv_bias_act_cpu(input, weight, bias, residual, {stride, stride}, {1, 1}, {1, 1},
                             groups, relu, /*assume_finite=*/false);
  }
  count_kernel_run(KernelRun::kGroupedConv);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor w = packed.contiguous();
  const optional<Tensor> b = bias ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  const Tensor r = residual ? residual->contiguous(cl) : Tensor();
  const Tensor zeros = at::zeros({std::max<int64_t>(Cg, grouped_conv::kMinBlock)},
                                 input.options());
  grouped_conv::Problem p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.K = weight.size(0);
  p.OH = (p.H - 1) / stride + 1;
  p.OW = (p.W - 1) / stride + 1;
  p.stride = stride;
  p.Cg = Cg;
  p.Kg = Kg;
  p.L = grouped_conv::block_channels(Kg);
  Tensor out = at::empty({p.N, p.K, p.OH, p.OW}, input.options().memory_format(cl));
  p.input = x.const_data_ptr<float>();
  p.weight = w.const_data_ptr<float>();
  p.bias = b ? b->const_data_ptr<float>() : nullptr;
  p.residual = residual ? r.const_data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.zeros = zeros.const_data_ptr<float>();
  p.relu = relu;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const auto run = cpu_isa() == CpuIsa::kAvx512 ? &grouped_conv::run_rows_avx512
                                                  : &grouped_conv::run_rows_avx2;
#else
  // The ISA kernels are built for x86-64 with GCC or Clang only; elsewhere cpu_isa() is
  // kNone and the call went to conv_bias_act above.
  TORCH_CHECK(false, "grouped_conv3x3: the grouped kernel is not built on this platform");
  void (*run)(const grouped_conv::Problem&, int64_t, int64_t) = nullptr;
#endif
  // Row-major items, each one output row of one block: a thread reads whole input
  // pixels, where block-major items read 64-byte slices of them, up to 2.1x slower at
  // batch 8 (2.43 vs 5.20 ms for 256 channels at 56x56, stride 2; alone, AMD EPYC Zen 4,
  // 2 threads). Block-major items saved 0.55 ms of 162 in ResNeXt-101 32x8d at batch 1,
  // whose weights outweigh its inputs (README).
  at::parallel_for(0, p.K / p.L * p.N * p.OH, 1,
                   [&](int64_t first, int64_t last) { run(p, first, last); });
  return out.contiguous(output_memory_format(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("grouped_conv3x3", &grouped_conv3x3_cpu);
}

}  // namespace resnet_fused
