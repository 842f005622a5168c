// CPU conv1x1: a 1x1 convolution (ResNet's bottleneck and downsample convs) as one
// matrix product of the channels_last input, [N*H*W, C], with the weight, [C, K], on
// oneDNN's brgemm micro-kernel; bias, residual and ReLU are applied to each block of
// the product while it is in L1, before its one store (conv1x1_epilogue.h). It also
// skips what ATen's oneDNN convolution spends around oneDNN's kernel on each call
// (descriptors, primitive cache, scratchpad): 50-63 us alone, 70-220 us inside
// ResNet-50 at batch 1 (ONEDNN_VERBOSE's time against the op's).
//
// At stride s > 1 (the downsample convs that start ResNet's stages) the rows of the
// product are every s-th pixel of every s-th image row, gathered into contiguous memory
// before their products (run() says how).
//
// The weight comes in panels of kPanel or kNarrowPanel output channels (resnet_fused.ops.
// conv1x1_weight: [K / P, C, P]; conv1x1_epilogue.h says why two); each product block
// holds kPanel of them. With few rows per thread (ResNet's
// layer3/4, and batch 1), the threads split the panels, so each reads only its share
// of the weight, where oneDNN's convolution splits the rows and every thread reads
// all of it; with many, or with a weight small beside the rows, they split the rows
// (kSplitRowsFrom, kSplitRowsSmallWeightFrom). dispatch.py says where
// the model uses it.
//
// bfloat16 runs the same blocks on oneDNN's bfloat16 brgemm (the weight's rows in VNNI
// pairs), summed in float32 and rounded once, in the epilogue, where ATen's convolution
// rounds its product and then its sum with the residual; AVX-512 only (conv1x1.h).
//
// NaN and Inf propagate as in torch (the ReLU keeps NaN), so no operand is scanned.
// Where the kernel does not run (no brgemm for the dtype, a weight in other panels), the
// call goes to conv_bias_act.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/brgemm.h"
#include "cpu/conv1x1.h"
#include "cpu/conv1x1_epilogue.h"
#include "cpu/conv_bias_act.h"
#include "cpu/cpu_isa.h"
#include "cpu/kernel_runs.h"
#include "cpu/thread_scratch.h"

namespace resnet_fused {
namespace {

using at::Tensor;
using c10::optional;

using conv1x1::kNarrowPanel;
using conv1x1::kPanel;
constexpr int64_t kRowBlock = 128;  // output pixels per product (measured best of 32-256)

// From this many rows per thread the threads split the rows rather than the weight's
// panels: each then reads the input once (with panels, once per panel it takes) and
// all of the weight, which is then the smaller operand. Timed per op in ResNet-50
// (AMD EPYC Zen 4, 2 threads, two models alternating, one on oneDNN's convolution),
// ms per call at batch 8: rows won at 28x28 (3136 rows per thread; 128 -> 512 with the
// residual 4.42-4.50 against oneDNN's 4.74-4.77, panels 4.79-4.89 against 4.79-5.07)
// and at 56x56, and lost at 14x14 and 7x7 (784 and 196 rows per thread: 2048 -> 512 at
// 7x7 4.93 against 3.97, panels 3.85 against 4.10); at batch 1 panels won at 56x56 too
// (1568 rows per thread), with 128-row blocks that left one thread a block more.
constexpr int64_t kSplitRowsFrom = 2048;

// With a weight that fits in half of L2 they split the rows from fewer rows per thread,
// in blocks of equal size (~kRowBlock rows): ResNet-50's layer1 and layer2 1x1 convs
// at batch 1 (1568 and 392 rows per thread, weights of 16-512 KiB). Separate processes,
// alternating, ResNet-50 batch 1 (AMD EPYC Zen 4, 2 threads), medians of per-process
// medians: 34.24 vs 34.57 ms (8 processes each; the slowest two 37.1-37.3 against
// 40.4-40.9), AVX2 37.47 vs 37.95 (6 each), batch 8 unchanged (258.2 vs 258.6). Per op in
// the model the panels' split had run up to 0.45 ms slower per call in some processes
// (64 -> 256 at 56x56 0.98 against 0.53; 128 -> 512 with the residual 0.76 against
// 0.51), the rows' split did not. Also splitting layer3's rows (98 per thread, 1 MiB
// weights) was slower: 34.84 vs 34.28 ms.
constexpr int64_t kSplitRowsSmallWeightFrom = 256;
constexpr int64_t kSmallWeightBytes = 512 * 1024;

// Reductions longer than this (none in torchvision's ResNets) are summed in chunks of
// kReductionChunk channels: brgemm streams its whole weight panel once per few rows, and
// past ~2K channels the panel no longer stays in L2 beside the rows. 49 rows x 4608 ->
// 512 (layer4's stride-2 3x3 conv as a product over its im2col rows; AMD EPYC Zen 4, 2
// threads, cold caches): 3.06 ms in one piece, 1.24 in chunks of 1024, 1.30 of 256-512.
constexpr int64_t kLongReduction = 2048;
constexpr int64_t kReductionChunk = 1024;

}  // namespace

// Plain loops: the compiler vectorizes them for the baseline ISA.
void conv1x1::epilogue_plain(const float* c, const float* bias, const float* residual, float* out,
                             int64_t rows, int64_t ld, bool relu) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * kPanel;
    const float* res = residual ? residual + r * ld : nullptr;
    float* o = out + r * ld;
    for (int64_t j = 0; j < kPanel; ++j) {
      float v = cr[j] + (bias ? bias[j] : 0.0f);
      if (res) v += res[j];
      o[j] = relu && v < 0.0f ? 0.0f : v;  // NaN < 0 is false: NaN stays, as in torch.relu
    }
  }
}

bool conv1x1_bf16_kernel_available() {
  return cpu_isa() == CpuIsa::kAvx512 && brgemm_f32_available() && brgemm_bf16_available();
}

namespace {

// The ISA's own epilogue where the CPU has one (conv1x1_epilogue.h).
conv1x1::EpilogueFn pick_epilogue() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return &conv1x1::epilogue_avx512;
    case CpuIsa::kAvx2: return &conv1x1::epilogue_avx2;
    default: break;
  }
#endif
  return &conv1x1::epilogue_plain;
}

// Copies the input pixels of output rows [r0, r0 + n) at stride s, C elements each, to
// `rows` (contiguous).
template <class T>
void gather_rows(const T* x, int64_t C, int64_t H, int64_t W, int64_t s, int64_t r0, int64_t n,
                 T* rows) {
  const int64_t OH = (H - 1) / s + 1, OW = (W - 1) / s + 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i, ow = r % OW, oh = r / OW % OH, img = r / (OW * OH);
    std::copy_n(x + ((img * H + oh * s) * W + ow * s) * C, C, rows + i * C);
  }
}

// One product of the sum run() computes: the channels_last input (N, C, H, W) read at
// `stride`, and its weight in panels of P output channels ([K / P, C, P]; bfloat16 in
// VNNI row pairs, [K / P, C / 2, P, 2], the same offsets counted in elements).
template <class T>
struct Operand {
  const T* x;
  const T* w;
  int64_t C, H, W, stride, P;
};

// The product block's 64 columns from the operand's panels, rows [c0, c0 + k) of its
// reduction: block (+)= a @ w.
void product(int64_t n, int64_t k, const Operand<float>& op, const float* a, const float* w,
             float* block, bool accumulate) {
  for (int64_t j = 0; j < kPanel; j += op.P)
    brgemm_f32(n, op.P, k, /*lda=*/op.C, /*ldb=*/op.P, /*ldc=*/kPanel, a, w + j * op.C, block + j,
               accumulate);
}

void product(int64_t n, int64_t k, const Operand<c10::BFloat16>& op, const c10::BFloat16* a,
             const c10::BFloat16* w, float* block, bool accumulate) {
  for (int64_t j = 0; j < kPanel; j += op.P)
    brgemm_bf16(n, op.P, k, /*lda=*/op.C, /*ldb=*/op.P, /*ldc=*/kPanel, a, w + j * op.C,
                block + j, accumulate);
}

void epilogue(const float* c, const float* bias, const float* residual, float* out, int64_t rows,
              int64_t ld, bool relu) {
  static const conv1x1::EpilogueFn fn = pick_epilogue();
  fn(c, bias, residual, out, rows, ld, relu);
}

void epilogue(const float* c, const c10::BFloat16* bias, const c10::BFloat16* residual,
              c10::BFloat16* out, int64_t rows, int64_t ld, bool relu) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const auto bits = [](const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); };
  conv1x1::epilogue_bf16_avx512(c, bits(bias), bits(residual), reinterpret_cast<uint16_t*>(out),
                                rows, ld, relu);
#else
  // The AVX-512 kernels are built for x86-64 with GCC or Clang only; elsewhere cpu_isa()
  // is kNone, conv1x1_bf16_kernel_available() is false and bfloat16 never gets here.
  TORCH_CHECK(false, "conv1x1: the bfloat16 kernel is not built on this platform");
#endif
}

// out = act(sum of the operands' products + bias [+ residual]); all channels_last-
// contiguous, of element type T (float, or bfloat16 summed in float32), every operand
// giving out's rows; out may be residual.
template <class T>
void run(std::vector<Operand<T>> ops, const T* bias, const T* residual, Tensor& out, bool relu) {
  const int64_t K = out.size(1);
  const int64_t rows = out.numel() / K;
  const int64_t col_blocks = K / kPanel;  // of kPanel output channels
  T* o = out.data_ptr<T>();
  int64_t weight_bytes = 0;  // the largest operand's
  for (const auto& op : ops)
    weight_bytes = std::max(weight_bytes, op.C * K * static_cast<int64_t>(sizeof(T)));
  // Items are (column block, row block) pairs; each thread takes a contiguous range of
  // them, so the order decides what the threads split: column-major the weight's panels,
  // else the rows.
  const int64_t threads = at::get_num_threads();
  const bool split_rows =
      rows / threads >= kSplitRowsFrom ||
      (rows / threads >= kSplitRowsSmallWeightFrom && weight_bytes <= kSmallWeightBytes);
  int64_t row_block = kRowBlock;
  if (split_rows) {  // equal blocks, the same number per thread
    const int64_t per_thread = (rows + threads * kRowBlock - 1) / (threads * kRowBlock);
    row_block = (rows + threads * per_thread - 1) / (threads * per_thread);
  } else if (col_blocks * ((rows + row_block - 1) / row_block) < threads) {
    // Fewer items than threads (64 output channels over at most 128 rows): smaller row
    // blocks, so that every thread gets one.
    const int64_t per_panel = (threads + col_blocks - 1) / col_blocks;
    row_block = std::max<int64_t>(1, (rows + per_panel - 1) / per_panel);
  }
  const int64_t row_blocks = (rows + row_block - 1) / row_block;
  // At stride > 1, split by rows, each thread gathers each of its row blocks once, into
  // scratch. Split by panels, every thread reads every row block (once per panel it
  // takes), so the rows are gathered once, before the products, into a shared copy.
  std::vector<Tensor> subsampled;
  int64_t gathered_elems = 0;  // per thread, split by rows
  for (auto& op : ops) {
    if (op.stride == 1) continue;
    if (split_rows) {
      gathered_elems += row_block * op.C;
      continue;
    }
    subsampled.push_back(at::empty({rows, op.C}, out.options().memory_format(
                                                     at::MemoryFormat::Contiguous)));
    T* sub = subsampled.back().data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      gather_rows(op.x, op.C, op.H, op.W, op.stride, r0, r1 - r0, sub + r0 * op.C);
    });
    op = {sub, op.w, op.C, op.H, op.W, 1, op.P};
  }
  const int64_t gathered_floats = (gathered_elems * sizeof(T) + sizeof(float) - 1) / sizeof(float);
  at::parallel_for(0, col_blocks * row_blocks, 1, [&](int64_t first, int64_t last) {
    float* block = thread_scratch(row_block * kPanel + gathered_floats);
    int64_t gathered_r0 = -1;
    for (int64_t item = first; item < last; ++item) {
      const int64_t p = split_rows ? item % col_blocks : item / row_blocks;
      const int64_t r0 = (split_rows ? item / col_blocks : item % row_blocks) * row_block;
      const int64_t n = std::min(row_block, rows - r0);
      // the block's input rows, where gathered
      T* gathered = reinterpret_cast<T*>(block + row_block * kPanel);
      for (size_t i = 0; i < ops.size(); ++i) {
        const Operand<T>& op = ops[i];
        const T* a = op.x + r0 * op.C;
        if (op.stride > 1) {
          if (r0 != gathered_r0) gather_rows(op.x, op.C, op.H, op.W, op.stride, r0, n, gathered);
          a = gathered;
          gathered += row_block * op.C;
        }
        const int64_t chunk = op.C > kLongReduction ? kReductionChunk : op.C;
        for (int64_t c0 = 0; c0 < op.C; c0 += chunk) {
          const T* w = op.w + (p * kPanel / op.P * op.C + c0) * op.P;  // the block's first panel
          product(n, std::min(chunk, op.C - c0), op, a + c0, w, block,
                  /*accumulate=*/i > 0 || c0 > 0);
        }
      }
      gathered_r0 = r0;
      const int64_t at = r0 * K + p * kPanel;
      epilogue(block, bias ? bias + p * kPanel : nullptr, residual ? residual + at : nullptr,
               o + at, n, K, relu);
    }
    // On AMX CPUs the bfloat16 brgemm holds the tile registers until released.
    if (std::is_same<T, c10::BFloat16>::value) brgemm_release();
  });
}

// One product's input and weight panels, channels_last- and plain-contiguous.
struct Input {
  const Tensor& x;
  const Tensor& panels;
  int64_t stride;
};

template <class T>
void run_typed(const std::vector<Input>& inputs, const optional<Tensor>& bias,
               const Tensor& residual, Tensor& out, bool relu) {
  std::vector<Operand<T>> ops;
  for (const Input& in : inputs)
    ops.push_back({in.x.const_data_ptr<T>(), in.panels.const_data_ptr<T>(), in.x.size(1),
                   in.x.size(2), in.x.size(3), in.stride, in.panels.size(2)});
  run<T>(std::move(ops), bias ? bias->const_data_ptr<T>() : nullptr,
         residual.defined() ? residual.const_data_ptr<T>() : nullptr, out, relu);
}

// run() in out's element type; residual undefined for none.
void run(const std::vector<Input>& inputs, const optional<Tensor>& bias, const Tensor& residual,
         Tensor& out, bool relu) {
  if (out.scalar_type() == at::kBFloat16) {
    run_typed<c10::BFloat16>(inputs, bias, residual, out, relu);
  } else {
    run_typed<float>(inputs, bias, residual, out, relu);
  }
}

void check_conv1x1_args(const Tensor& input, const Tensor& weight, const Tensor& panels,
                        const optional<Tensor>& bias, const optional<Tensor>& residual,
                        int64_t stride, const char* op) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1, op,
              ": expected a 1x1 weight (K, C, 1, 1), got shape ", weight.sizes());
  check_conv_bias_act_args(input, weight, bias, residual, {stride, stride}, {0, 0}, {1, 1}, 1, op);
  TORCH_CHECK(input.device().is_cpu(), op, ": expected input on cpu, got ", input.device());
  const int64_t K = weight.size(0), C = weight.size(1);
  const bool typed = panels.scalar_type() == weight.scalar_type() && panels.device().is_cpu();
  if (weight.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(C % 2 == 0, op, ": expected an even number of input channels for bfloat16 (its "
                "weight panels hold rows in pairs), got ", C);
    TORCH_CHECK(typed && panels.dim() == 4 && panels.size(0) * panels.size(2) == K &&
                    panels.size(1) == C / 2 && panels.size(3) == 2,
                op, ": expected weight_panels of shape [K / P, ", C / 2,
                ", P, 2] with P * (K / P) = ", K,
                ", BFloat16 on cpu (resnet_fused.ops.conv1x1_weight(weight)); got ", panels.sizes(),
                " ", panels.scalar_type(), " on ", panels.device());
    return;
  }
  TORCH_CHECK(typed && panels.dim() == 3 && panels.size(0) * panels.size(2) == K &&
                  panels.size(1) == C,
              op, ": expected weight_panels of shape [K / P, ", C, ", P] with P * (K / P) = ", K,
              ", ", weight.scalar_type(), " on cpu (resnet_fused.ops.conv1x1_weight(weight)); got ",
              panels.sizes(), " ", panels.scalar_type(), " on ", panels.device());
}

// Whether the kernel computes this call (else conv_bias_act does).
bool kernel_runs(const Tensor& input, const Tensor& panels) {
  const int64_t P = panels.size(2);
  const auto dt = input.scalar_type();
  const bool runs = dt == at::kFloat ? brgemm_f32_available()
                                     : dt == at::kBFloat16 && conv1x1_bf16_kernel_available() &&
                                           brgemm_bf16_enabled();
  return runs && (P == kPanel || P == kNarrowPanel) && panels.size(0) * P % kPanel == 0 &&
         input.numel() > 0;
}

Tensor conv1x1_cpu(const Tensor& input, const Tensor& weight, const Tensor& panels,
                   const optional<Tensor>& bias, const optional<Tensor>& residual, bool relu,
                   int64_t stride) {
  constexpr const char* op = "conv1x1";
  check_conv1x1_args(input, weight, panels, bias, residual, stride, op);
  if (!kernel_runs(input, panels) || weight.size(0) == 0) {
    return conv_bias_act_cpu(input, weight, bias, residual, {stride, stride}, {0, 0}, {1, 1}, 1,
                             relu, /*assume_finite=*/false);
  }
  count_kernel_run(KernelRun::kConv1x1);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor w = panels.contiguous();
  const optional<Tensor> b = bias ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  const Tensor r = residual ? residual->contiguous(cl) : Tensor();
  Tensor out = at::empty({input.size(0), weight.size(0), (input.size(2) - 1) / stride + 1,
                          (input.size(3) - 1) / stride + 1},
                         input.options().memory_format(cl));
  run({{x, w, stride}}, b, r, out, relu);
  return out.contiguous(output_memory_format(input));
}

void conv1x1_add_relu_cpu_(Tensor& residual, const Tensor& input, const Tensor& weight,
                           const Tensor& panels, const optional<Tensor>& bias) {
  constexpr const char* op = "conv1x1_add_relu_";
  check_conv1x1_args(input, weight, panels, bias, residual, /*stride=*/1, op);
  const auto cl = at::MemoryFormat::ChannelsLast;
  // In place, each element is read once and then written by the same thread; the
  // residual must not share memory with what the product reads.
  const bool in_place = kernel_runs(input, panels) && weight.size(0) > 0 &&
                        residual.is_contiguous(cl) && !residual.is_alias_of(input) &&
                        !residual.is_alias_of(weight) && !residual.is_alias_of(panels) &&
                        !(bias && residual.is_alias_of(*bias));
  if (!in_place) {
    residual.copy_(conv1x1_cpu(input, weight, panels, bias, residual, /*relu=*/true, 1));
    return;
  }
  count_kernel_run(KernelRun::kConv1x1AddRelu);
  const optional<Tensor> b = bias ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  const Tensor x = input.contiguous(cl), w = panels.contiguous();
  run({{x, w, 1}}, b, residual, residual, /*relu=*/true);
}

// act(conv1x1(input) + conv1x1(input2, stride2) + bias): both products summed in one
// block per output tile, so neither is stored alone (ResNet's first bottleneck of each
// stage: its last conv and its downsample).
Tensor conv1x1_sum_cpu(const Tensor& input, const Tensor& weight, const Tensor& panels,
                       const Tensor& input2, const Tensor& weight2, const Tensor& panels2,
                       const optional<Tensor>& bias, int64_t stride2, bool relu) {
  constexpr const char* op = "conv1x1_sum";
  check_conv1x1_args(input, weight, panels, bias, c10::nullopt, 1, op);
  check_conv1x1_args(input2, weight2, panels2, c10::nullopt, c10::nullopt, stride2,
                     "conv1x1_sum's second convolution (input2, weight2, weight2_panels)");
  const int64_t H2 = (input2.size(2) - 1) / stride2 + 1, W2 = (input2.size(3) - 1) / stride2 + 1;
  TORCH_CHECK(input2.size(0) == input.size(0) && weight2.size(0) == weight.size(0) &&
                  H2 == input.size(2) && W2 == input.size(3),
              op, ": expected the two convolutions to give the same output shape; input ",
              input.sizes(), " with weight ", weight.sizes(), " gives [", input.size(0), ", ",
              weight.size(0), ", ", input.size(2), ", ", input.size(3), "], input2 ",
              input2.sizes(), " with weight2 ", weight2.sizes(), " at stride2 ", stride2,
              " gives [", input2.size(0), ", ", weight2.size(0), ", ", H2, ", ", W2, "]");
  TORCH_CHECK(input2.scalar_type() == input.scalar_type(), op,
              ": expected input2 of input's dtype ", input.scalar_type(), ", got ",
              input2.scalar_type());
  if (!kernel_runs(input, panels) || !kernel_runs(input2, panels2) || weight.size(0) == 0) {
    const Tensor other = conv1x1_cpu(input2, weight2, panels2, c10::nullopt, c10::nullopt,
                                     /*relu=*/false, stride2);
    return conv1x1_cpu(input, weight, panels, bias, other, relu, 1);
  }
  count_kernel_run(KernelRun::kConv1x1Sum);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl), x2 = input2.contiguous(cl);
  const Tensor w = panels.contiguous(), w2 = panels2.contiguous();
  const optional<Tensor> b = bias ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  Tensor out = at::empty({input.size(0), weight.size(0), input.size(2), input.size(3)},
                         input.options().memory_format(cl));
  run({{x, w, 1}, {x2, w2, stride2}}, b, Tensor(), out, relu);
  return out.contiguous(output_memory_format(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv1x1_sum", &conv1x1_sum_cpu);
  m.impl("conv1x1", &conv1x1_cpu);
  m.impl("conv1x1_add_relu_", &conv1x1_add_relu_cpu_);
}

}  // namespace resnet_fused
