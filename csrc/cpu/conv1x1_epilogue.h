// The epilogue of conv1x1's products: out = act(product + bias [+ residual]) for one
// block of rows x kPanel output channels, as a plain loop (any CPU) and
// compiled per vector ISA (kernels_avx2.cpp, kernels_avx512.cpp; the library itself
// is built for baseline x86-64, where the plain loop runs on 4-lane SSE: at 64-128
// input channels that was ~1/5 of the op). All of them give the same bits.
#pragma once

#include <cstdint>

namespace resnet_fused {
namespace conv1x1 {

constexpr int64_t kPanel = 64;  // output channels per product block and epilogue

// The weight comes in panels of kPanel or kPanel / 2 output channels (resnet_fused.ops.
// conv1x1_weight says which): oneDNN's AVX2 brgemm runs a product of 32 columns from a
// 32-wide panel at ~57 G multiply-adds/s per core, one of 64 from a 64-wide panel at
// ~42, and 32 columns read from a 64-wide panel at ~43 (one thread, warm operands, 49-196
// rows, 256-2048 channels; AMD EPYC Zen 4 capped by ONEDNN_MAX_CPU_ISA=AVX2). Its AVX-512
// kernel runs both widths at ~58.
constexpr int64_t kNarrowPanel = kPanel / 2;

// c: rows x kPanel, dense; out and residual (may be null, may be out): rows ld apart;
// bias: kPanel values or null. NaN stays NaN through the ReLU, as in torch.relu.
using EpilogueFn = void (*)(const float* c, const float* bias, const float* residual, float* out,
                            int64_t rows, int64_t ld, bool relu);

void epilogue_plain(const float* c, const float* bias, const float* residual, float* out,
                    int64_t rows, int64_t ld, bool relu);
void epilogue_avx2(const float* c, const float* bias, const float* residual, float* out,
                   int64_t rows, int64_t ld, bool relu);
void epilogue_avx512(const float* c, const float* bias, const float* residual, float* out,
                     int64_t rows, int64_t ld, bool relu);

// The same for bfloat16 bias, residual and out (raw bits): the sum in float32, rounded
// once, to nearest even, as torch rounds. AVX-512 only, as is conv1x1's bfloat16 kernel.
void epilogue_bf16_avx512(const float* c, const uint16_t* bias, const uint16_t* residual,
                          uint16_t* out, int64_t rows, int64_t ld, bool relu);

}  // namespace conv1x1
}  // namespace resnet_fused
