// CPU winograd_conv3x3: 3x3, padding-1 convolutions (ResNet's 3x3 convs) by
// Winograd's minimal filtering. At stride 1, F(2x2, 3x3) spends 16 multiply-adds per
// channel pair on a 2x2 output tile instead of 36 (2.25x less arithmetic than
// oneDNN's direct kernel); F(4x4, 3x3) spends 36 on a 4x4 tile instead of 144 (4x
// less), at the price of larger transforms and a larger rounding error. The
// winograd_weight's shape, [16, K / P, C, P] or [36, K / P, C, P] (panels of P output
// channels), selects which. At stride 2 (the stage transitions), F(2x2, 3x3) spends 25
// on a 2x2 tile instead of 36 (1.44x less), with exact transforms (winograd_kernel.h);
// its winograd_weight is [4, 4, K / P, C, P].
//
// bfloat16 input runs F(2x2) with V and U in bfloat16 (ATen's bfloat16 brgemm, U in
// VNNI row pairs), on AVX-512 and for channel counts that are multiples of 16.
//
// winograd_conv3d runs the same kernel on the frames of a channels_last_3d clip, for a
// 3-D conv of 3x3 spatial taps (stride 1, 'same' padding): each temporal tap's products
// are added into the same Winograd-domain sums, and each output is transformed once.
//
// This file holds the ops: checks, the per-thread split and the choice of ISA.
// The kernel itself is winograd_kernel.h, compiled for AVX2 and for AVX-512.
// Without either (or without an fp32 brgemm in this torch, brgemm.h), for NaN/Inf operands
// (whose transforms would turn an Inf into NaN where a direct convolution keeps
// it), for images smaller than one output tile and for F(4x4) with fewer than 16
// input channels, the call goes to conv_bias_act.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/brgemm.h"
#include "cpu/cpu_isa.h"
#include "cpu/conv_bias_act.h"
#include "cpu/finite.h"
#include "cpu/kernel_runs.h"
#include "cpu/thread_scratch.h"
#include "cpu/winograd.h"
#include "cpu/winograd_problem.h"

namespace resnet_fused {

using at::Tensor;
using c10::optional;

bool winograd_kernel_available() {
  return cpu_isa() != CpuIsa::kNone && brgemm_f32_available();
}

bool winograd_bf16_kernel_available() {
  return winograd_kernel_available() && cpu_isa() == CpuIsa::kAvx512 && brgemm_bf16_available();
}

namespace {

// winograd::GemmFn: row-major operands, A dense.
void gemm_f32(int64_t m, int64_t n, int64_t k, int64_t ldb, int64_t ldc, const void* a,
              const void* b, float* c, bool accumulate) {
  brgemm_f32(m, n, k, k, ldb, ldc, static_cast<const float*>(a), static_cast<const float*>(b), c,
             accumulate);
}

void gemm_bf16(int64_t m, int64_t n, int64_t k, int64_t ldb, int64_t ldc, const void* a,
               const void* b, float* c, bool accumulate) {
  brgemm_bf16(m, n, k, k, ldb, ldc, static_cast<const c10::BFloat16*>(a),
              static_cast<const c10::BFloat16*>(b), c, accumulate);
}

// Tiles per block: enough rows for the GEMM micro-kernel to run at full speed
// (measured best at 64-128 on ResNet's shapes), and a multiple of the thread
// count in blocks so no thread idles at the end.
int64_t tiles_per_block(int64_t tiles, int64_t threads, int64_t max_tiles) {
  const int64_t rounds = (tiles + threads * max_tiles - 1) / (threads * max_tiles);
  return std::max<int64_t>(1, (tiles + threads * rounds - 1) / (threads * rounds));
}

// All channels_last(_3d)-contiguous, float32 or (with a bfloat16 U) bfloat16; residual
// may be null. A 5-D input is winograd_conv3d's: U then holds one weight per temporal tap.
void winograd_run(const Tensor& input, const Tensor& U, const float* bias, const void* residual,
                  Tensor& out, bool relu, int64_t stride) {
  winograd::Problem p;
  const bool volume = input.dim() == 5;
  const Tensor& U2 = volume ? U[0] : U;  // one tap's, as winograd_conv3x3 takes it
  p.input = input.const_data_ptr();
  p.U = U.const_data_ptr();
  p.bias = bias;
  p.residual = residual;
  p.out = out.data_ptr();
  p.relu = relu;
  p.bf16 = input.scalar_type() == at::kBFloat16;
  p.H = input.size(-2);
  p.W = input.size(-1);
  p.C = input.size(1);
  p.K = out.size(1);
  p.Ho = out.size(-2);
  p.Wo = out.size(-1);
  p.stride = static_cast<int>(stride);
  p.tile = stride == 1 && U2.size(0) == 36 ? 4 : 2;  // bfloat16: 16 only
  p.alpha = stride == 2 ? 5 : p.tile + 2;
  p.tiles_h = (p.Ho + p.tile - 1) / p.tile;
  p.tiles_w = (p.Wo + p.tile - 1) / p.tile;
  const int64_t images = volume ? input.size(0) * input.size(2) : input.size(0);
  p.tiles = images * p.tiles_h * p.tiles_w;
  // F(4x4) blocks hold as many output pixels as F(2x2)'s (24 tiles of 16 vs 96 of 4).
  // Stride 2's (2x2 tiles of 25 points) take 48: 0.89-0.90 ms against 0.91-0.95 with 24
  // at batch 1 (128 and 256 channels, cold weights), the same at batch 8.
  const int64_t threads = at::get_num_threads();
  const int64_t max_block = p.alpha == 6 ? 24 : p.alpha == 5 ? 48 : 96;
  p.block = tiles_per_block(p.tiles, threads, max_block);
  p.u_panel = U2.size(p.bf16 ? 3 : -1);
  p.k_slices = 1;
  p.k_slice = p.K;
  // Each block reads all of U, alpha^2 * C * K, and its V and M, alpha^2 * tiles *
  // (C + K). Where U is the larger and comes in panels, the threads share one block of
  // all the tiles (or one per group of threads) and split its output channels, so U is
  // read once per call instead of once per block (resnet_fused/dispatch.py's
  // _winograd_splits decides the same way). Measured on AMD EPYC Zen 4, 2 threads,
  // cold weights, alternating, split vs one block per thread, ms: 512 channels at
  // 7x7, F(2x2), batch 1: 1.04 vs 1.44; F(4x4), batch 4: 2.36 vs 3.45, and with AVX2,
  // batch 8: 4.97 vs 7.55; 256 channels at 14x14, F(4x4), batch 2: 1.04 vs 1.13.
  const int64_t panels = p.K / p.u_panel;
  const bool weight_bound = p.C * p.K > p.tiles * (p.C + p.K);
  if (threads > 1 && panels > 1 && weight_bound) {
    p.k_slices = std::min(threads, panels);
    // Each thread of a group transforms the group's block: its V is per thread, so
    // blocks stay within 4x the usual size (more blocks then, each reading its slice).
    const int64_t groups = (threads + p.k_slices - 1) / p.k_slices;
    p.block = std::min((p.tiles + groups - 1) / groups, 4 * max_block);
    p.k_slice = (panels + p.k_slices - 1) / p.k_slices * p.u_panel;
  }
  if (volume) {
    p.taps = U.size(0);
    p.frames = input.size(2);
    p.u_tap = U.numel() / p.taps;
  }
  p.m_cols = p.k_slice;
  // A padded stride keeps the 16 (36) slabs of a tile off the same L1 sets (16 KiB
  // apart they all collided: measured 3x slower transforms).
  auto padded = [](int64_t n) { return (n + 15) / 16 * 16 + 16; };
  p.v_stride = padded(p.block * p.C);
  p.m_stride = padded(p.block * p.m_cols);
  p.gemm = p.bf16 ? &gemm_bf16 : &gemm_f32;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const auto run = cpu_isa() == CpuIsa::kAvx512 ? &winograd::run_blocks_avx512
                                                  : &winograd::run_blocks_avx2;
#else
  // The ISA kernels are built for x86-64 with GCC or Clang only; elsewhere cpu_isa() is
  // kNone, winograd_kernel_available() is false and the op never gets here.
  TORCH_CHECK(false, "winograd_conv3x3, winograd_conv3d: the Winograd kernel is not built on "
              "this platform");
  void (*run)(const winograd::Problem&, int64_t, int64_t, float*) = nullptr;
#endif
  const int64_t scratch = winograd::scratch_floats(p);
  const int64_t blocks = (p.tiles + p.block - 1) / p.block;
  at::parallel_for(0, blocks * p.k_slices, 1, [&](int64_t first, int64_t last) {
    // A few MB at most for ResNet's shapes (split calls: less than U).
    run(p, first, last, thread_scratch(scratch));
    // On AMX CPUs the bfloat16 brgemm holds the tile registers until released.
    if (p.bf16) brgemm_release();
  });
}

}  // namespace

namespace {

// The weight comes in panels of P output channels (resnet_fused.ops.winograd_panel: 64,
// or 32 where oneDNN's brgemm runs AVX2 code, where that divides K, else P = K); the
// products take P from its shape.
void check_winograd_args(const Tensor& input, const Tensor& weight, const Tensor& U,
                         const optional<Tensor>& bias, const optional<Tensor>& residual,
                         int64_t stride, const char* op = "winograd_conv3x3") {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              op, ": expected a 3x3 weight (K, C, 3, 3), got shape ", weight.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": expected stride 1 or 2, got ",
              stride);
  check_conv_bias_act_args(input, weight, bias, residual, {stride, stride}, {1, 1}, {1, 1}, 1, op);
  TORCH_CHECK(input.device().is_cpu(), op, ": expected input on cpu, got ",
              input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16,
              op, ": expected float32 or bfloat16 input, got ", input.scalar_type());
  const int64_t C = weight.size(1), K = weight.size(0);
  if (input.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(stride == 1, op, ": bfloat16 input runs at stride 1 only, got "
                "stride ", stride);
    TORCH_CHECK(U.dim() == 5 && U.size(0) == 16 && 2 * U.size(2) == C && U.size(3) > 0 &&
                    U.size(1) * U.size(3) == K && U.size(4) == 2 &&
                    U.scalar_type() == at::kBFloat16 && U.device().is_cpu(),
                op, ": for bfloat16 input, expected winograd_weight of shape [16, ",
                K, " / P, ", C / 2, ", P, 2] bfloat16 (F(2x2, 3x3) in panels of P output "
                "channels, rows in VNNI pairs, from resnet_fused.ops.winograd_weight of a bfloat16 "
                "weight with an even C); got ", U.sizes(), " ", U.scalar_type());
    return;
  }
  const auto panels_fit = [&](int64_t from) {
    return U.size(from + 1) == C && U.size(from + 2) > 0 && U.size(from) * U.size(from + 2) == K;
  };
  if (stride == 2) {
    TORCH_CHECK(U.dim() == 5 && U.size(0) == 4 && U.size(1) == 4 && panels_fit(2),
                op, ": at stride 2, expected winograd_weight of shape [4, 4, ",
                K, " / P, ", C, ", P] (the 4 x 4 distinct matrices of F(2x2, 3x3) at "
                "stride 2 in panels of P output channels, from resnet_fused.ops.winograd_weight("
                "weight, tile=2, stride=2)); got ", U.sizes());
  } else {
    TORCH_CHECK(U.dim() == 4 && (U.size(0) == 16 || U.size(0) == 36) && panels_fit(1),
                op, ": expected winograd_weight of shape [16, ", K, " / P, ", C,
                ", P] (F(2x2, 3x3)) or [36, ", K, " / P, ", C,
                ", P] (F(4x4, 3x3)), the transformed weight in panels of P output channels, "
                "from resnet_fused.ops.winograd_weight(weight, tile=2|4); got ",
                U.sizes());
  }
  TORCH_CHECK(U.scalar_type() == at::kFloat && U.device().is_cpu(),
              op, ": expected winograd_weight float32 on cpu, got ", U.scalar_type(),
              " on ", U.device());
}

constexpr int64_t kMinChannelsF4 = 16;  // below it, F(4x4) calls compute directly

Tensor direct(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
              const optional<Tensor>& residual, bool relu, bool assume_finite, int64_t stride) {
  return conv_bias_act_cpu(input, weight, bias, residual, {stride, stride}, {1, 1}, {1, 1}, 1,
                           relu, assume_finite);
}

// Whether the Winograd kernel computes this call (else conv_bias_act does, the same).
bool winograd_takes(const Tensor& input, const Tensor& weight, const Tensor& U, int64_t stride,
                    bool assume_finite) {
  const bool finite = assume_finite || (all_finite(input) && all_finite(weight));
  // An output smaller than one tile is mostly padding: Winograd would spend its
  // multiplies on zeros, and the weight terms that cancel on the padding would add
  // rounding error the direct sum never has. F(4x4)'s transforms add a rounding
  // error of their own, independent of the reduction length, which the tolerance of
  // a short reduction does not cover: measured up to 2.1x it with 1-4 channels,
  // 0.84x with 8 and at most 0.73x from 16 (tests/common_utils.py's rule).
  const int64_t tile = stride == 1 && U.size(0) == 36 ? 4 : 2;  // one tap's U for a 3-D conv
  const int64_t out_h = (input.size(-2) - 1) / stride + 1, out_w = (input.size(-1) - 1) / stride + 1;
  const bool sub_tile = out_h < tile || out_w < tile;
  const bool short_reduction = tile == 4 && input.size(1) < kMinChannelsF4;
  // bfloat16: AVX-512 with the bfloat16 brgemm (oneDNN not turned off), whole 16-lane
  // vectors of channels.
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  const bool bf16_ok = !bf16 || (winograd_bf16_kernel_available() && brgemm_bf16_enabled() &&
                                 input.size(1) % 16 == 0 && weight.size(0) % 16 == 0);
  return winograd_kernel_available() && bf16_ok && finite && !sub_tile && !short_reduction &&
         input.numel() != 0 && weight.size(0) != 0;
}

Tensor winograd_conv3x3_cpu(const Tensor& input, const Tensor& weight, const Tensor& U,
                            const optional<Tensor>& bias, const optional<Tensor>& residual,
                            int64_t stride, bool relu, bool assume_finite) {
  check_winograd_args(input, weight, U, bias, residual, stride);
  const auto fmt = output_memory_format(input);
  if (!winograd_takes(input, weight, U, stride, assume_finite)) {
    return direct(input, weight, bias, residual, relu, assume_finite, stride);
  }
  count_kernel_run(KernelRun::kWinograd);
  const int64_t out_h = (input.size(2) - 1) / stride + 1, out_w = (input.size(3) - 1) / stride + 1;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor u = U.contiguous();
  const optional<Tensor> b =
      bias ? optional<Tensor>(bias->to(at::kFloat).contiguous()) : c10::nullopt;
  Tensor out = at::empty({input.size(0), weight.size(0), out_h, out_w},
                         input.options().memory_format(cl));
  const Tensor r = residual ? residual->contiguous(cl) : Tensor();
  winograd_run(x, u, b ? b->const_data_ptr<float>() : nullptr,
               residual ? r.const_data_ptr() : nullptr, out, relu, stride);
  return out.contiguous(fmt);
}

void check_winograd3d_args(const Tensor& input, const Tensor& weight, const Tensor& U,
                           const optional<Tensor>& bias, const optional<Tensor>& residual) {
  TORCH_CHECK(input.dim() == 5, "winograd_conv3d: expected input to be 5-D (N, C, T, H, W), got ",
              input.dim(), "-D with shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 5 && weight.size(2) % 2 == 1 && weight.size(3) == 3 &&
                  weight.size(4) == 3,
              "winograd_conv3d: expected a (K, C, kt, 3, 3) weight with an odd number kt of "
              "temporal taps, got shape ", weight.sizes());
  const int64_t kt = weight.size(2);
  check_conv_bias_act_args(input, weight, bias, residual, {1, 1, 1}, {kt / 2, 1, 1}, {1, 1, 1}, 1,
                           "winograd_conv3d", /*volumes=*/true);
  TORCH_CHECK(input.device().is_cpu(), "winograd_conv3d: expected input on cpu, got ",
              input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16,
              "winograd_conv3d: expected float32 or bfloat16 input, got ", input.scalar_type());
  TORCH_CHECK(U.dim() >= 1 && U.size(0) == kt,
              "winograd_conv3d: expected winograd_weight to hold one weight per temporal tap, "
              "[", kt, ", ...] (resnet_fused.ops.winograd_weight of the 5-D weight); got ",
              U.sizes());
  // Each tap's as winograd_conv3x3 checks it at stride 1, on a view of the frames
  // (the first of each clip: only the shapes matter).
  const Tensor frames = input.as_strided({input.size(0), input.size(1), input.size(3),
                                          input.size(4)},
                                         {input.stride(0), input.stride(1), input.stride(3),
                                          input.stride(4)});
  check_winograd_args(frames, weight.select(2, 0), U[0], bias, c10::nullopt, 1,
                      "winograd_conv3d (one temporal tap's weight)");
}

// A 3-D conv of 3x3 spatial taps (kt x 3 x 3, stride 1, padding (kt / 2, 1, 1)): each
// temporal tap a 2-D Winograd conv over the frames, summed in the Winograd domain, so
// that each output is transformed, biased and stored once (winograd_kernel.h's run_taps).
Tensor winograd_conv3d_cpu(const Tensor& input, const Tensor& weight, const Tensor& U,
                           const optional<Tensor>& bias, const optional<Tensor>& residual,
                           bool relu, bool assume_finite) {
  check_winograd3d_args(input, weight, U, bias, residual);
  const int64_t kt = weight.size(2);
  const auto fmt = output_memory_format(input);
  if (!winograd_takes(input, weight, U[0], 1, assume_finite)) {
    return conv_bias_act_cpu(input, weight, bias, residual, {1, 1, 1}, {kt / 2, 1, 1}, {1, 1, 1},
                             1, relu, assume_finite);
  }
  count_kernel_run(KernelRun::kWinograd3d);
  const auto cl = at::MemoryFormat::ChannelsLast3d;
  const Tensor x = input.contiguous(cl);
  const Tensor u = U.contiguous();
  const optional<Tensor> b =
      bias ? optional<Tensor>(bias->to(at::kFloat).contiguous()) : c10::nullopt;
  Tensor out = at::empty({input.size(0), weight.size(0), input.size(2), input.size(3),
                          input.size(4)}, input.options().memory_format(cl));
  const Tensor r = residual ? residual->contiguous(cl) : Tensor();
  winograd_run(x, u, b ? b->const_data_ptr<float>() : nullptr,
               residual ? r.const_data_ptr() : nullptr, out, relu, 1);
  return out.contiguous(fmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("winograd_conv3d", &winograd_conv3d_cpu);
}

}  // namespace resnet_fused
